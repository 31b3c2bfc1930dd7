"""Upserts: conversations, sync checkpoints, runs and the quarantine. Callers own the transaction.

New conversations are bulk-loaded the fastest way each database offers: ``COPY`` on PostgreSQL, one
``executemany`` on SQLite, with the values already in the form the database stores (JSON as text, SQLite's
datetime text), so no per-value work is left to SQLAlchemy. Every write function runs in the caller's
transaction, so a page of a sync and whatever else the caller adds to that transaction commit together.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import JSON, Connection, and_, bindparam, case, delete, select, text, update
from sqlalchemy.exc import DBAPIError

from chatsync.jsonbody import UndecodableRecord, UnreadableNumber
from chatsync.normalize import repaired_text
from chatsync.store import audit, changes, leads, rollups
from chatsync.store.engine import insert_for, is_among, lock_for_writing
from chatsync.store.tables import chatbots, conversations, quarantine, sync_days, sync_runs
from chatsync.whatsapp import number_in_force, region_of

# Columns that come from Chatbase (and the rule) and are rewritten when a conversation changes.
DATA_COLUMNS = (
    "chatbot_id",
    "created_at",
    "last_message_at",
    "source",
    "customer",
    "country",
    "min_score",
    "status",
    "title",
    "chatbase_user_id",
    "messages",
    "raw",
    "content_hash",
    "message_count",
    "user_messages",
    "assistant_messages",
    "response_steps",
    "response_seconds",
    "first_response_seconds",
    "unanswered",
    "answers_feedback_known",
    "answers_rated_up",
    "answers_rated_down",
    "wa_outcome",
    "wa_extracted",
    "wa_form",
    "wa_channel",
    "wa_matched",
    "wa_reasons",
)
# The rule's number for the conversation (chatsync.whatsapp.number_in_force over the chat, the sender's
# number, the lead and the form); a person's manual value beats it and is never overwritten.
AUTO_COLUMNS = {
    "whatsapp_number": "auto_number",
    "whatsapp_source": "auto_source",
    "whatsapp_region": "auto_region",
}


class JsonText(str):
    """A JSON value already encoded (by :func:`encode_json`): stored as it is, never encoded again.

    The sync's worker processes encode a conversation's messages and raw fields, so the writer only
    passes the text on."""

    __slots__ = ()


def encode_json(value: Any) -> JsonText:
    """``value`` as compact UTF-8 JSON text, the way chatsync stores JSON columns.

    orjson when it can write the value (it refuses integers beyond 64 bits), else the standard library;
    both give text that decodes to the same value. Raises ValueError/TypeError for what JSON cannot hold.
    """
    import orjson

    try:
        return JsonText(orjson.dumps(value).decode())
    except TypeError:
        return JsonText(json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False))


def decoded_json(value: Any) -> Any:
    """The Python value of a JSON column value that may be :class:`JsonText`."""
    return json.loads(value) if isinstance(value, JsonText) else value


@dataclass
class UpsertCounts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    captured: int = 0
    repaired: list[str] = field(default_factory=list)  # ids written with unstorable text replaced

    def add(self, other: UpsertCounts) -> None:
        self.inserted += other.inserted
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.captured += other.captured
        self.repaired += other.repaired


def upsert_counts(rows: Iterable[dict[str, Any]], known_hashes: Mapping[str, str]) -> UpsertCounts:
    """What upserting ``rows`` (one per id) over conversations stored with ``known_hashes`` (id → content
    hash) does: new ids inserted, other hashes updated, the same hash unchanged; those with a number the
    rule found captured; the ids written with text repaired."""
    counts = UpsertCounts()
    for row in rows:
        stored = known_hashes.get(row["id"])
        if stored == row["content_hash"]:
            counts.unchanged += 1
        else:
            if stored is None:
                counts.inserted += 1
            else:
                counts.updated += 1
            if row.get("text_repaired"):
                counts.repaired.append(row["id"])
        counts.captured += bool(row["wa_extracted"])
    return counts


def upsert_conversations(
    connection: Connection,
    rows: Iterable[dict[str, Any]],
    now: datetime,
    known_hashes: Mapping[str, str] | None = None,
) -> UpsertCounts:
    """Insert new conversations, rewrite changed ones, skip unchanged ones (same content hash).

    ``known_hashes``: the stored hashes of these ids when the caller has already read them (the sync
    engine does, to skip unchanged conversations before normalising); otherwise they are read here.
    """
    batch = {row["id"]: row for row in rows}  # the last copy of a conversation in a batch wins
    if not batch:
        return UpsertCounts()
    if known_hashes is None:
        known_hashes = dict(
            connection.execute(
                select(conversations.c.id, conversations.c.content_hash).where(
                    conversations.c.id.in_(list(batch))
                )
            ).all()
        )
    known = known_hashes
    fresh = [r for i, r in batch.items() if i not in known]
    changed = [r for i, r in batch.items() if i in known and known[i] != r["content_hash"]]
    counts = upsert_counts(batch.values(), known)
    if fresh:
        # Before any row is locked: a lead arriving now waits for this page, or this page for it.
        leads.hold_against_leads(connection)
    # Existing rows first: every writer locks the conversations it changes before any rollup row, so a
    # sync and a person's set-whatsapp on the same conversation cannot wait on each other in a cycle.
    if changed:
        apply_rule_results(connection, changed, now, DATA_COLUMNS, announce=False)
    if fresh:
        stored = [
            {
                "id": r["id"],
                **{c: r[c] for c in DATA_COLUMNS},
                **{c: r[a] for c, a in AUTO_COLUMNS.items()},
                "first_synced_at": now,
                "synced_at": now,
            }
            for r in fresh
        ]
        insert_conversations(connection, stored)
        rollups.track(connection, before=[], after=stored)
        # Lead forms that arrived before their conversation: one lookup per page, usually finding none.
        leads.apply_pending(connection, [r["id"] for r in fresh], now)
    # Last, so the change log's lock is held only from here to the commit (chatsync.store.changes).
    changes.record_conversations(connection, changes.conversation_items([*changed, *fresh]), now)
    return counts


# The columns of a new conversation, in the order the bulk load sends them.
INSERT_COLUMNS = ("id", *DATA_COLUMNS, *AUTO_COLUMNS, "first_synced_at", "synced_at")
_JSON_COLUMNS = frozenset(c.name for c in conversations.columns if isinstance(c.type, JSON))


def insert_conversations(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert new conversations (dicts of :data:`INSERT_COLUMNS`) in one bulk load.

    A row whose id is already stored makes the whole statement fail (IntegrityError), as a plain INSERT
    does: the caller decides what to do with the batch.
    """
    if not rows:
        return
    values = _insert_values(connection, rows)
    names = ", ".join(INSERT_COLUMNS)
    if connection.dialect.name == "postgresql":
        # COPY, the fastest bulk load PostgreSQL offers, straight into the table: the rows are new, and a
        # stored id fails the COPY as it would an INSERT. One round trip where a staging table took four
        # (create, COPY, INSERT … SELECT, empty it), each a wait for the server's share of two busy cores.
        import psycopg

        statement = f"COPY conversations ({names}) FROM STDIN"
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            with cursor.copy(statement) as copy:
                for value in values:
                    copy.write_row(value)
        except psycopg.Error as exc:
            # As SQLAlchemy raises it for its own statements, so that callers tell a lost connection or a
            # statement timeout (OperationalError) from a row the table refuses (IntegrityError, DataError)
            raise DBAPIError.instance(
                statement, None, exc, psycopg.Error, dialect=connection.dialect
            ) from exc
        finally:
            cursor.close()
        return
    marks = ", ".join("?" for _ in INSERT_COLUMNS)
    connection.exec_driver_sql(f"INSERT INTO conversations ({names}) VALUES ({marks})", values)


def _insert_values(connection: Connection, rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Each row's values in INSERT_COLUMNS order as the driver is given them: JSON as text (None stays
    NULL), and whatever SQLAlchemy's own type would do for the rest (SQLite's datetime text, so keys and
    range filters match rows written through SQLAlchemy). The values are picked in one C call a row, and
    only the few columns that need it are converted."""
    dialect = connection.dialect
    convert: list[tuple[int, Callable[[Any], Any]]] = []
    for at, name in enumerate(INSERT_COLUMNS):
        if name in _JSON_COLUMNS:
            convert.append((at, _json_value))
        elif dialect.name != "postgresql":
            process = conversations.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                convert.append((at, process))
    pick = operator.itemgetter(*INSERT_COLUMNS)
    out = []
    for row in rows:
        value = list(pick(row))
        for at, encode in convert:
            value[at] = encode(value[at])
        out.append(tuple(value))
    return out


def _json_value(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, JsonText) else encode_json(value)


def stored_fingerprints(connection: Connection, ids: list[str]) -> dict[str, tuple[str, bool]]:
    """Content hash of each stored conversation among ``ids``, and whether the chat gave its number."""
    if not ids:
        return {}
    rows = connection.execute(
        select(conversations.c.id, conversations.c.content_hash, conversations.c.wa_extracted).where(
            is_among(connection, conversations.c.id, ids)
        )
    ).all()
    return {r.id: (r.content_hash, r.wa_extracted is not None) for r in rows}


def stored_raw(connection: Connection, ids: list[str]) -> dict[str, Any]:
    """The stored ``raw`` (every field Chatbase sent but the messages) of each conversation among ``ids``."""
    if not ids:
        return {}
    rows = connection.execute(
        select(conversations.c.id, conversations.c.raw).where(conversations.c.id.in_(ids))
    ).all()
    return {r.id: r.raw for r in rows}


def apply_rule_results(
    connection: Connection,
    rows: list[dict[str, Any]],
    now: datetime,
    columns: Iterable[str],
    announce: bool = True,
    by: str = audit.BY_SYNC,
) -> None:
    """Rewrite ``columns`` and the automatic number of existing conversations, keeping manual numbers.

    The number is the precedence over the rows' chat, sender and form numbers and the lead stored with
    the conversation (``wa_lead``, unless ``columns`` rewrites it too). The report's rollups move from the
    rows as they were to the rows as stored (a manual number stays); each changed number is audited as
    made ``by``. ``announce``: append the rewrite to the change log (a caller that writes more afterwards
    does it last).
    """
    columns = tuple(columns)
    manual = conversations.c.whatsapp_source == "manual"
    values: dict[str, Any] = {c: bindparam(f"v_{c}") for c in columns}
    for column, auto in AUTO_COLUMNS.items():
        values[column] = case((manual, conversations.c[column]), else_=bindparam(f"v_{auto}"))
    values["synced_at"] = now
    statement = update(conversations).where(conversations.c.id == bindparam("v_id")).values(**values)
    ids = [r["id"] for r in rows]
    lock_for_writing(connection)
    before = rollups.stored(connection, ids, lock=True, extra=("id", "wa_lead"))
    stored_leads = {row["id"]: row["wa_lead"] for row in before}
    params = []
    for r in rows:
        number, source = number_in_force(
            extracted=r["wa_extracted"],
            channel=r["wa_channel"],
            lead=r["wa_lead"] if "wa_lead" in columns else stored_leads.get(r["id"]),
            form=r["wa_form"],
        )
        params.append(
            {
                "v_id": r["id"],
                **{f"v_{c}": decoded_json(r[c]) for c in columns},  # a worker's JSON may come encoded
                "v_auto_number": number,
                "v_auto_source": source,
                "v_auto_region": region_of(number) if number else None,
            }
        )
    connection.execute(statement, params)
    after = rollups.stored(connection, ids, extra=("id",))
    rollups.track(connection, before, after)
    audit.record_changes(connection, audit.changes_between(before, after), by, now)
    if announce:
        owners = dict(
            connection.execute(
                select(conversations.c.id, conversations.c.chatbot_id).where(conversations.c.id.in_(ids))
            ).all()
        )
        changes.record_conversations(connection, [(i, owners[i]) for i in ids if i in owners], now)


def mark_days_fetched(
    connection: Connection, chatbot_id: str, scope: str, days: Iterable[date], fetched_at: datetime
) -> None:
    rows = [{"chatbot_id": chatbot_id, "scope": scope, "day": d, "fetched_at": fetched_at} for d in days]
    if not rows:
        return
    statement = insert_for(connection, sync_days)
    statement = statement.on_conflict_do_update(
        index_elements=["chatbot_id", "scope", "day"], set_={"fetched_at": statement.excluded.fetched_at}
    )
    connection.execute(statement, rows)


def fetched_days(
    connection: Connection, chatbot_id: str, scopes: Iterable[str], start: date, end: date
) -> dict[date, datetime]:
    """When each day of a range was last fetched under any of ``scopes`` (the latest wins)."""
    from chatsync.timeutil import as_utc

    rows = connection.execute(
        select(sync_days.c.day, sync_days.c.fetched_at).where(
            and_(
                sync_days.c.chatbot_id == chatbot_id,
                sync_days.c.scope.in_(list(scopes)),
                sync_days.c.day >= start,
                sync_days.c.day <= end,
            )
        )
    ).all()
    out: dict[date, datetime] = {}
    for day, fetched_at in rows:
        moment = as_utc(fetched_at)
        if day not in out or out[day] < moment:
            out[day] = moment
    return out


def count_conversations(connection: Connection, chatbot_id: str, start: date, end: date) -> int:
    """How many conversations of a chatbot are stored with creation in the UTC days ``start..end``."""
    from sqlalchemy import func

    from chatsync.timeutil import day_end, day_start

    return int(
        connection.execute(
            select(func.count()).where(
                conversations.c.chatbot_id == chatbot_id,
                conversations.c.created_at >= day_start(start),
                conversations.c.created_at < day_end(end),
            )
        ).scalar_one()
    )


def release_from_quarantine(connection: Connection, chatbot_id: str, conversation_ids: list[str]) -> None:
    """Drop the quarantined copies of these conversations: a newer copy was just stored, so what was
    quarantined is no longer what Chatbase sends (and a retry must not bring it back).

    A chatbot with nothing quarantined (the usual case, and every page of a sync) costs a one-row check
    instead of the DELETE (2 ms a page on SQLite)."""
    keys = [i for i in conversation_ids if len(i) <= 128]
    if keys and connection.execute(_HOLDS_QUARANTINED, {"chatbot_id": chatbot_id}).first() is not None:
        connection.execute(
            quarantine.delete().where(
                quarantine.c.chatbot_id == chatbot_id, is_among(connection, quarantine.c.record_key, keys)
            )
        )


_HOLDS_QUARANTINED = text("SELECT 1 FROM quarantine WHERE chatbot_id = :chatbot_id LIMIT 1")


def quarantine_record(
    connection: Connection, chatbot_id: str, record: object, reason: str, run_id: str, now: datetime
) -> None:
    """Keep a record Chatbase sent that cannot be stored, with the reason, once per record."""
    text = quarantine_text(record)
    conversation_id = record_id_text(record)
    raw_id = _sent_id(record)
    if conversation_id is not None and len(conversation_id) <= 128 and conversation_id == str(raw_id):
        key = conversation_id
    else:  # no id, a long one, or one holding characters no database keeps: two must never share a key
        key = (
            "sha256:"
            + hashlib.sha256(json.dumps(raw_id if raw_id is not None else text).encode()).hexdigest()[:40]
        )
    statement = insert_for(connection, quarantine).values(
        chatbot_id=chatbot_id,
        record_key=key,
        conversation_id=conversation_id[:128] if conversation_id else None,
        reason=reason,
        raw=text,
        first_seen_at=now,
        last_seen_at=now,
        run_id=run_id,
    )
    statement = statement.on_conflict_do_update(
        index_elements=["chatbot_id", "record_key"],
        set_={"reason": reason, "raw": text, "last_seen_at": now, "run_id": run_id},
    )
    connection.execute(statement)


def quarantine_text(record: object) -> str:
    """The record as ASCII JSON (every character escaped, so any database holds it exactly); a number too
    long for Python's int stays a JSON number, so a retry reads the record as it arrived."""
    if isinstance(record, UndecodableRecord):
        return record.text
    numbers: dict[str, str] = {}

    def keep(value: object) -> object:
        if isinstance(value, UnreadableNumber):
            token = f"__chatsync_number_{len(numbers)}__"
            numbers[f'"{token}"'] = value.text
            return token
        return str(value)

    try:
        text = json.dumps(record, ensure_ascii=True, default=keep, sort_keys=True)
    except (RecursionError, ValueError, TypeError):
        return json.dumps({"id": record_id_text(record), "chatsync": "record too deeply nested to keep"})
    for token, digits in numbers.items():
        text = text.replace(token, digits, 1)
    return text


def record_id_text(record: object) -> str | None:
    """A record's id as text with unstorable characters replaced, for the quarantine's key."""
    sent = id_as_sent(record)
    return None if sent is None else repaired_text(sent)


def id_as_sent(record: object) -> str | None:
    """A record's id as text exactly as Chatbase sent it, unstorable characters and all; None when it has
    no usable id (missing, blank, not a string or an integer).

    The quarantine keys a record whose id it must repair by a hash of this, so two ids that repair alike
    (lone surrogates, NUL) never share a row, nor take the row of a stored conversation whose id is the
    repaired text."""
    value = _sent_id(record)
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        return None
    return str(value)


def _sent_id(record: object) -> object:
    """The ``id`` field of a record (or of one that could not be decoded) as decoded, any type; else None."""
    if isinstance(record, UndecodableRecord):
        return record.id
    return record.get("id") if isinstance(record, dict) else None


def remember_chatbot(
    connection: Connection, chatbot_id: str, first_day: date | None = None, synced_at: datetime | None = None
) -> None:
    values: dict[str, Any] = {"id": chatbot_id}
    updates: dict[str, Any] = {}
    if first_day is not None:
        values["first_day"] = updates["first_day"] = first_day
    if synced_at is not None:
        values["last_synced_at"] = updates["last_synced_at"] = synced_at
    statement = insert_for(connection, chatbots).values(**values)
    if updates:
        statement = statement.on_conflict_do_update(index_elements=["id"], set_=updates)
    else:
        statement = statement.on_conflict_do_nothing(index_elements=["id"])
    connection.execute(statement)


def forget_chatbot_if_empty(connection: Connection, chatbot_id: str) -> bool:
    """Delete the chatbot's row when nothing was ever stored or synced for it (no conversation, no
    quarantined record, no first day, no complete sync): what a sync of a mistyped id leaves. True when
    deleted. Its runs stay in ``sync_runs``, the history of what was tried."""
    holds = (
        select(conversations.c.id).where(conversations.c.chatbot_id == chatbot_id).limit(1).exists()
        | select(quarantine.c.id).where(quarantine.c.chatbot_id == chatbot_id).limit(1).exists()
        | select(sync_days.c.chatbot_id).where(sync_days.c.chatbot_id == chatbot_id).limit(1).exists()
    )
    deleted = connection.execute(
        delete(chatbots).where(
            chatbots.c.id == chatbot_id,
            chatbots.c.first_day.is_(None),
            chatbots.c.last_synced_at.is_(None),
            ~holds,
        )
    )
    return bool(deleted.rowcount)


def chatbot_first_day(connection: Connection, chatbot_id: str) -> date | None:
    return connection.execute(select(chatbots.c.first_day).where(chatbots.c.id == chatbot_id)).scalar()


def synced_since(connection: Connection, chatbot_id: str, moment: datetime) -> bool:
    """Whether a sync of the chatbot completed at or after ``moment`` (``chatbots.last_synced_at``)."""
    from chatsync.timeutil import as_utc

    last = connection.execute(select(chatbots.c.last_synced_at).where(chatbots.c.id == chatbot_id)).scalar()
    return last is not None and as_utc(last) >= moment


def set_run_chatbots(connection: Connection, run_id: str, chatbot_ids: list[str]) -> None:
    """The chatbots a run has taken on so far (a shared run adds them as it gets their locks)."""
    connection.execute(update(sync_runs).where(sync_runs.c.id == run_id).values(chatbot_ids=chatbot_ids))


def start_run(connection: Connection, run_id: str, chatbot_ids: list[str], now: datetime) -> None:
    """Record a run as running. Written again (its first commit's answer lost), it changes nothing."""
    # A run that was killed never finished its row: say so rather than leave it "running" forever.
    for row in connection.execute(
        select(sync_runs.c.id, sync_runs.c.chatbot_ids).where(
            sync_runs.c.status == "running", sync_runs.c.id != run_id
        )
    ).all():
        if set(row.chatbot_ids or []) & set(chatbot_ids):
            connection.execute(update(sync_runs).where(sync_runs.c.id == row.id).values(status="interrupted"))
    connection.execute(
        insert_for(connection, sync_runs)
        .values(id=run_id, chatbot_ids=chatbot_ids, status="running", started_at=now)
        .on_conflict_do_nothing(index_elements=["id"])
    )


def finish_run(
    connection: Connection,
    run_id: str,
    status: str,
    summary: dict[str, Any],
    error: str | None,
    now: datetime,
) -> None:
    """Record how a run ended, and tell the change feed once: written again (its first commit's answer
    lost), it changes nothing."""
    ended = connection.execute(
        update(sync_runs)
        .where(sync_runs.c.id == run_id, sync_runs.c.finished_at.is_(None))
        .values(status=status, finished_at=now, summary=summary, error=error)
    )
    if ended.rowcount:
        changes.prune(connection, now)
        changes.record_sync_finished(connection, run_id, now)


def record_failed_run(
    connection: Connection,
    run_id: str,
    chatbot_ids: list[str],
    summary: dict[str, Any],
    error: str,
    now: datetime,
) -> None:
    """Record a run that could not start (its chatbot was already syncing, say) as failed, with the reason.

    Unlike :func:`start_run` it leaves other runs alone: the sync that is running is not interrupted.
    """
    connection.execute(
        sync_runs.insert().values(
            id=run_id,
            chatbot_ids=chatbot_ids,
            status="failed",
            started_at=now,
            finished_at=now,
            summary=summary,
            error=error,
        )
    )
    changes.record_sync_finished(connection, run_id, now)
