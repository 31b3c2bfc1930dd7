"""The report's rollups, kept in step with ``conversations`` by every write, in the write's transaction.

An all-time report over a million conversations cannot afford to read them all, so each conversation's
contribution to the figures (counters per UTC hour, value counts for distributions, its user key) is added
when it is stored and taken away when it changes. One method, :meth:`Contributions.add`, says what a
stored conversation contributes; the writers pass the stored rows before and after a change, and
:func:`rebuild` recomputes everything from ``conversations`` with the same method.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, select, text

from chatsync.store.tables import ROLLUP_COUNTERS, report_hours, report_users, report_values
from chatsync.store.tables import conversations as c
from chatsync.timeutil import as_utc

# The stored columns a conversation's contribution depends on.
REPORT_COLUMNS = (
    "chatbot_id",
    "source",
    "created_at",
    "customer",
    "country",
    "message_count",
    "user_messages",
    "assistant_messages",
    "response_steps",
    "response_seconds",
    "first_response_seconds",
    "unanswered",
    "status",
    "answers_feedback_known",
    "answers_rated_up",
    "answers_rated_down",
    "wa_outcome",
    "whatsapp_number",
    "whatsapp_source",
    "whatsapp_region",
)
REPLIED = ("captured", "not_found", "ambiguous")  # outcomes with a user reply after the prompt
TAKEN_OVER = "taken_over"  # the Chatbase status of a conversation a person took over from the bot
_in_counter_order = operator.itemgetter(*ROLLUP_COUNTERS)
_ROWS_PER_STATEMENT = 10_000  # a rebuild adds up to a row per conversation; keep each statement modest


def source_key(source: str | None) -> str:
    return source or ""


def user_key(number: str | None, customer: str | None) -> str | None:
    """The spec's user key (number, else customer), hashed to a fixed width for the key column."""
    key = number if number is not None else customer
    return None if key is None else hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def seconds_key(value: float) -> str:
    """Response times are stored to the millisecond, so this text round-trips to the same float."""
    return f"{float(value):.3f}"


@dataclass
class Contributions:
    """Net change to the three rollups; ``add`` a stored row with sign +1 (stored) or -1 (replaced)."""

    hours: dict[tuple[str, str, datetime], list[int]] = field(default_factory=dict)
    values: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    users: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def add(self, row: Mapping[Any, Any], sign: int = 1) -> None:
        chatbot, source = row["chatbot_id"], source_key(row["source"])
        number, outcome = row["whatsapp_number"], row["wa_outcome"]
        key = user_key(number, row["customer"])
        times = row["response_seconds"] or []
        status = row["status"]
        first = row["first_response_seconds"]
        figures = {
            "conversations": 1,
            "messages": row["message_count"],
            "user_messages": row["user_messages"],
            "assistant_messages": row["assistant_messages"],
            "keyed": key is not None,
            "engaged": row["user_messages"] >= 2,
            "with_steps": row["response_steps"] > 0,
            "with_pairs": row["response_seconds"] is not None,
            "with_first": first is not None,
            "unanswered": bool(row["unanswered"]),
            "prompted": outcome != "no_prompt",
            "replied": outcome in REPLIED,
            "captured": outcome == "captured",
            "manual": row["whatsapp_source"] == "manual",
            "from_form": row["whatsapp_source"] == "form",
            "with_number": number is not None,
            "from_channel": row["whatsapp_source"] == "channel",
            "from_lead": row["whatsapp_source"] == "lead",
            "missed_no_reply": outcome == "no_reply",
            "missed_not_found": outcome == "not_found",
            "missed_ambiguous": outcome == "ambiguous",
            "with_status": status is not None,
            "taken_over": status == TAKEN_OVER,
            "with_feedback": row["answers_feedback_known"] is not None,
            "answers_feedback_known": row["answers_feedback_known"] or 0,
            "answers_rated_up": row["answers_rated_up"] or 0,
            "answers_rated_down": row["answers_rated_down"] or 0,
        }
        hour = as_utc(row["created_at"]).replace(minute=0, second=0, microsecond=0)
        key_of_hour = (chatbot, source, hour)
        counters = self.hours.get(key_of_hour)
        if counters is None:
            counters = self.hours[key_of_hour] = [0] * len(ROLLUP_COUNTERS)
        # (bools count as 0 and 1; one C call picks the figures in the counters' order)
        step = _in_counter_order(figures)
        counters[:] = map(operator.add if sign > 0 else operator.sub, counters, step)
        values = self.values
        values[(chatbot, source, "length", str(row["message_count"]))] += sign
        country = row["country"]
        values[(chatbot, source, "country", "Unknown" if country is None else country)] += sign
        if number is not None:
            region = row["whatsapp_region"]
            values[(chatbot, source, "region", "Unknown" if region is None else region)] += sign
        for seconds in times:
            values[(chatbot, source, "response", seconds_key(seconds))] += sign
        if first is not None:
            values[(chatbot, source, "first_response", seconds_key(first))] += sign
        if status is not None:
            values[(chatbot, source, "status", status)] += sign
        if key is not None:
            self.users[(chatbot, source, key)] += sign

    def write(self, connection: Connection) -> None:
        """Add the net change to the rollups, in key order so concurrent writers lock rows alike."""
        hours: list[list[Any]] = [[*k, *v] for k, v in sorted(self.hours.items()) if any(v)]
        values: list[list[Any]] = [[*k, n] for k, n in sorted(self.values.items()) if n]
        users: list[list[Any]] = [[*k, n] for k, n in sorted(self.users.items()) if n]
        for table, rows in ((report_hours, hours), (report_values, values), (report_users, users)):
            _add(connection, table, rows)
            # Rows whose count fell to zero describe nothing any more.
            width = len(table.primary_key)
            _drop_empty(connection, table, [row[:width] for row in rows if row[width] < 0])


def _add(connection: Connection, table: Any, rows: list[list[Any]]) -> None:
    """Add rows of (key…, counts…) to a rollup; a key already there gets the sums.

    A page of a sync brings ~430 rollup rows (measured on the emulator's data: ~325 distribution values,
    ~85 user keys, ~25 hours). PostgreSQL takes them as one JSON parameter in one statement: half the
    time of psycopg's ``executemany``. SQLite takes them as one ``executemany`` of plain tuples handed
    straight to the driver: two thirds of the time of the JSON statement, which re-reads each row's JSON
    once per column.
    """
    if not rows:
        return
    keys = [column.name for column in table.primary_key]
    names = [column.name for column in table.columns]
    counts = [name for name in names if name not in keys]
    sums = ", ".join(f"{name} = {table.name}.{name} + excluded.{name}" for name in counts)
    upsert = f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sums}"
    if connection.dialect.name != "postgresql":
        if "hour" in names:
            # the text SQLAlchemy itself stores for a DateTime, so keys and range filters match
            at, encode = names.index("hour"), _sqlite_datetime(connection)
            assert encode is not None
            values = [(*row[:at], encode(row[at]), *row[at + 1 :]) for row in rows]
        else:
            values = [tuple(row) for row in rows]
        marks = ", ".join("?" for _ in names)
        connection.exec_driver_sql(
            f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({marks}) {upsert}", values
        )
        return
    types = {name: "timestamptz" if name == "hour" else "int" if name in counts else "text" for name in names}
    picks = ", ".join(f"CAST(r->>{i} AS {types[name]})" for i, name in enumerate(names))
    statement = text(
        f"INSERT INTO {table.name} ({', '.join(names)}) SELECT {picks} "
        f"FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS r {upsert}"
    )
    rows = [[_iso(v) if isinstance(v, datetime) else v for v in row] for row in rows]
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        connection.execute(statement, {"rows": json.dumps(rows[start : start + _ROWS_PER_STATEMENT])})


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def _sqlite_datetime(connection: Connection) -> Callable[[Any], Any] | None:
    hour_type = report_hours.c.hour.type
    return hour_type.dialect_impl(connection.dialect).bind_processor(connection.dialect)


def _drop_empty(connection: Connection, table: Any, keys: list[list[Any]]) -> None:
    if not keys:
        return
    columns = [column.name for column in table.primary_key]
    count = next(column.name for column in table.columns if column.name not in columns)
    where = and_(*[table.c[k] == bindparam(f"k_{k}") for k in columns], table.c[count] <= 0)
    connection.execute(
        delete(table).where(where), [dict(zip([f"k_{k}" for k in columns], key, strict=True)) for key in keys]
    )


def stored(
    connection: Connection, ids: list[str], lock: bool = False, extra: tuple[str, ...] = ()
) -> list[Mapping[Any, Any]]:
    """The report columns (and ``extra`` columns) of stored conversations among ``ids``; ``lock`` them
    before changing them."""
    if not ids:
        return []
    names = [*REPORT_COLUMNS, *(name for name in extra if name not in REPORT_COLUMNS)]
    statement = select(*[c.c[name] for name in names]).where(c.c.id.in_(ids))
    if lock:
        statement = statement.with_for_update()
    return list(connection.execute(statement).mappings().all())


def track(
    connection: Connection, before: Iterable[Mapping[Any, Any]], after: Iterable[Mapping[Any, Any]]
) -> None:
    """Move the rollups from ``before`` (stored rows now replaced) to ``after`` (their stored successors)."""
    change = Contributions()
    for row in before:
        change.add(row, -1)
    for row in after:
        change.add(row, +1)
    change.write(connection)


def rebuild(
    connection: Connection, batch_size: int = 10_000, progress: Callable[[int], None] | None = None
) -> int:
    """Recompute every rollup from ``conversations`` (after a migration, or if someone edited rows by hand).

    Writers wait until this commits, so no conversation is counted twice or missed.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("LOCK TABLE conversations IN SHARE MODE"))
    for table in (report_hours, report_values, report_users):
        connection.execute(delete(table))
    total = Contributions()
    seen = 0
    statement = select(*[c.c[name] for name in REPORT_COLUMNS]).execution_options(yield_per=batch_size)
    result = connection.execute(statement)
    for row in result.mappings():
        total.add(row)
        seen += 1
        if progress is not None and seen % batch_size == 0:
            progress(seen)
    total.write(connection)
    if progress is not None:
        progress(seen)
    return seen
