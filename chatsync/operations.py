"""What an operator asks after a night of cron runs: did the last run work, how old is the data, what was
quarantined, and can it be stored now. One implementation for ``chatsync status`` and ``chatsync quarantine``.

No HTTP here: a quarantined record is normalised again from the raw JSON chatsync kept when it arrived.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, delete, func, select, true, update
from sqlalchemy.sql import ColumnElement

from chatsync.config import WhatsAppRule, mask_url
from chatsync.errors import BadRecord, LockHeld, NotFound
from chatsync.store import writes
from chatsync.store.tables import chatbots, conversations, quarantine, sync_runs
from chatsync.timeutil import as_utc, iso_z

RUN_SCAN_LIMIT = 10_000
DOCTOR_BUDGET = timedelta(
    seconds=8
)  # how long doctor rides out a Chatbase that does not answer  # runs read, newest first, to find each chatbot's last run (a year of 15-minute runs)


# ------------------------------------------------------------------------------------------------ status
@dataclass
class ChatbotStatus:
    """One chatbot as ``chatsync status`` shows it; times are aware UTC, ages seconds."""

    chatbot_id: str
    last_run: dict[str, Any] | None  # {"run_id", "status", "started_at", "finished_at", "summary", "error"}
    last_good_sync_at: datetime | None  # the end of the last sync that fetched this chatbot completely
    newest_conversation_at: datetime | None
    conversations: int
    quarantined: int
    stale: bool = False  # last good sync older than the allowed age, or none at all

    def as_dict(self, now: datetime) -> dict[str, Any]:
        good = self.last_good_sync_at
        return {
            "chatbot_id": self.chatbot_id,
            "last_run": self.last_run,
            "last_good_sync_at": iso_z(good),
            "last_good_sync_age_seconds": round((now - good).total_seconds()) if good else None,
            "newest_conversation_at": iso_z(self.newest_conversation_at),
            "conversations": self.conversations,
            "quarantined": self.quarantined,
            "stale": self.stale,
        }


def chatbot_statuses(
    connection: Connection, chatbot_ids: Iterable[str], now: datetime, max_age: timedelta | None = None
) -> list[ChatbotStatus]:
    """Each chatbot of ``chatbot_ids`` (every chatbot chatsync knows when empty), most recent facts first.

    A chatbot is ``stale`` when ``max_age`` is given and its last good sync is older than that, or missing.
    """
    from chatsync.store.locks import sync_held

    wanted = list(dict.fromkeys(chatbot_ids))
    known = {r.id: r for r in connection.execute(select(chatbots)).all()}
    ids = wanted or sorted(known)
    counts = _per_chatbot(
        connection,
        ids,
        select(conversations.c.chatbot_id, func.count(), func.max(conversations.c.created_at)).group_by(
            conversations.c.chatbot_id
        ),
    )
    held = _per_chatbot(
        connection, ids, select(quarantine.c.chatbot_id, func.count()).group_by(quarantine.c.chatbot_id)
    )
    runs, syncing = _last_runs(connection, set(ids))
    alive: dict[str, bool | None] = {}  # by run id
    for run in runs.values():
        if run["status"] != "running":
            continue
        if run["run_id"] not in alive:
            # A run syncs its chatbots one after another, holding the lock of the one it is on, the last
            # it lists (a chatbot it is done with is free while the run goes on)
            alive[run["run_id"]] = sync_held(connection.engine, syncing[run["run_id"]])
        if alive[run["run_id"]] is False:
            # that lock is free: the process ended without writing how (SIGKILL, a power cut); the
            # next sync records it so
            run["status"] = "interrupted"
            run["error"] = (
                run["error"]
                or "the sync ended without recording how (killed, or its database was away as it ended: its "
                "JSON line or log says which); the next sync continues"
            )
    out = []
    for chatbot_id in ids:
        row = known.get(chatbot_id)
        good = as_utc(row.last_synced_at) if row is not None and row.last_synced_at else None
        count, newest = counts.get(chatbot_id, (0, None))
        status = ChatbotStatus(
            chatbot_id,
            runs.get(chatbot_id),
            good,
            as_utc(newest) if newest else None,
            int(count),
            int(held.get(chatbot_id, (0,))[0]),
        )
        status.stale = max_age is not None and (good is None or now - good > max_age)
        out.append(status)
    return out


def _per_chatbot(connection: Connection, ids: list[str], statement: Any) -> dict[str, tuple[Any, ...]]:
    if not ids:
        return {}
    column = statement.selected_columns[0]
    return {r[0]: tuple(r[1:]) for r in connection.execute(statement.where(column.in_(ids))).all()}


def _last_runs(connection: Connection, ids: set[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The newest run that included each chatbot (a run may sync several), and by run id the chatbot
    each of those runs listed last (the one it is syncing, if it still runs)."""
    found: dict[str, dict[str, Any]] = {}
    last: dict[str, str] = {}
    rows = connection.execute(
        select(sync_runs).order_by(sync_runs.c.started_at.desc()).limit(RUN_SCAN_LIMIT)
    ).mappings()
    for run in rows:
        summary = run["summary"] if isinstance(run["summary"], dict) else {}
        # the chatbots a run that did not end well had synced to the end: its failure is not theirs
        synced_despite = set(summary.get("synced") or [])
        for chatbot_id in set(run["chatbot_ids"] or []) & (ids - set(found)):
            ours = chatbot_id not in synced_despite
            last[run["id"]] = run["chatbot_ids"][-1]
            found[chatbot_id] = {
                "run_id": run["id"],
                "status": run["status"] if ours else "ok",
                "started_at": iso_z(as_utc(run["started_at"])),
                "finished_at": iso_z(as_utc(run["finished_at"])) if run["finished_at"] else None,
                "summary": run["summary"],
                "error": run["error"] if ours else None,
            }
        if len(found) == len(ids):
            break
    return found, last


# -------------------------------------------------------------------------------------------- quarantine
QUARANTINE_KEYS = ["id", "chatbot_id", "conversation_id", "reason", "first_seen_at", "last_seen_at", "run_id"]


def _quarantine_row(row: Any) -> dict[str, Any]:
    out = {k: row[k] for k in QUARANTINE_KEYS}
    out["first_seen_at"] = iso_z(as_utc(row["first_seen_at"]))
    out["last_seen_at"] = iso_z(as_utc(row["last_seen_at"]))
    return out


def list_quarantined(connection: Connection, chatbot_ids: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Quarantined records, most recently seen first, without their raw JSON (``show`` has it)."""
    where = quarantine.c.chatbot_id.in_(chatbot_ids) if chatbot_ids else true()
    statement = (
        select(quarantine).where(where).order_by(quarantine.c.last_seen_at.desc(), quarantine.c.id.desc())
    )
    for row in connection.execute(statement).mappings():
        yield _quarantine_row(row)


QUARANTINE_ID_LIMIT = 2**31  # quarantine.id is a 32-bit integer on PostgreSQL


def get_quarantined(connection: Connection, quarantine_id: int) -> dict[str, Any]:
    """One quarantined record with its raw JSON as received (``raw``: text). Raises NotFound."""
    row = (
        connection.execute(select(quarantine).where(quarantine.c.id == quarantine_id)).mappings().first()
        if 0 < quarantine_id < QUARANTINE_ID_LIMIT  # the column's range: a larger id is simply not there
        else None
    )
    if row is None:
        raise NotFound(f"quarantined record {quarantine_id} not found: `chatsync quarantine list` shows them")
    return {**_quarantine_row(row), "raw": row["raw"]}


@dataclass
class RetryCounts:
    """What ``quarantine retry`` did: records stored now, and those still refused (with their reasons)."""

    examined: int = 0
    stored: int = 0
    still_refused: int = 0
    skipped_chatbots: list[str] = field(default_factory=list)  # a sync held their lock


def retry_quarantined(
    engine: Engine,
    rule: WhatsAppRule,
    chatbot_ids: tuple[str, ...] = (),
    quarantine_ids: tuple[int, ...] = (),
    now: datetime | None = None,
) -> RetryCounts:
    """Normalise quarantined records again (after an upgrade fixed what refused them) and store those that
    pass; the others keep their row with today's reason.

    Each chatbot's records are retried under its sync lock, so a retry never races a sync writing the same
    conversation; a chatbot whose lock is held is skipped and named.
    """
    from chatsync.jsonbody import decode_body
    from chatsync.normalize import normalize_conversation
    from chatsync.store.locks import chatbot_lock
    from chatsync.timeutil import utcnow

    now = now or utcnow()
    counts = RetryCounts()
    where: list[ColumnElement[bool]] = [true()]
    if chatbot_ids:
        where.append(quarantine.c.chatbot_id.in_(chatbot_ids))
    if quarantine_ids:
        # ids past the column's range are simply not there (the driver would refuse them as parameters)
        where.append(quarantine.c.id.in_([i for i in quarantine_ids if 0 < i < QUARANTINE_ID_LIMIT]))
    with engine.connect() as connection:
        targets = connection.execute(
            select(quarantine.c.chatbot_id, func.count())
            .where(and_(*where))
            .group_by(quarantine.c.chatbot_id)
        ).all()
        if quarantine_ids and not targets:
            raise NotFound(
                f"quarantined record {', '.join(map(str, quarantine_ids))} not found: "
                "`chatsync quarantine list` shows them"
            )
    for chatbot_id, _ in targets:
        try:
            with chatbot_lock(engine, chatbot_id):
                with engine.connect() as connection:
                    rows = connection.execute(
                        select(quarantine.c.id, quarantine.c.raw).where(
                            and_(*where, quarantine.c.chatbot_id == chatbot_id)
                        )
                    ).all()
                for quarantine_id, raw in rows:
                    counts.examined += 1
                    record = _decode_kept(raw, decode_body)
                    try:
                        row = normalize_conversation(record, chatbot_id, rule)
                    except BadRecord as exc:
                        counts.still_refused += 1
                        with engine.begin() as connection:
                            connection.execute(
                                update(quarantine)
                                .where(quarantine.c.id == quarantine_id)
                                .values(reason=exc.reason)
                            )
                        continue
                    with engine.begin() as connection:
                        writes.upsert_conversations(connection, [row], now)
                        connection.execute(delete(quarantine).where(quarantine.c.id == quarantine_id))
                    counts.stored += 1
        except LockHeld:
            counts.skipped_chatbots.append(chatbot_id)
    return counts


def _decode_kept(raw: str, decode: Any) -> Any:
    """The record from the quarantine's raw text: ASCII JSON, or the start of an undecodable item."""
    from chatsync.jsonbody import UndecodableRecord, int_or_unreadable

    try:
        return json.loads(raw, parse_int=int_or_unreadable)  # a 5,000-digit number stays one
    except RecursionError:
        pass
    except ValueError:
        return UndecodableRecord(raw, "only the start of this record was kept, so it cannot be stored")
    try:
        page = decode(('{"data": [' + raw + "]}").encode())
    except ValueError:
        return UndecodableRecord(raw, "only the start of this record was kept, so it cannot be stored")
    return page["data"][0]


# ------------------------------------------------------------------------------------------------ doctor
@dataclass(frozen=True)
class Check:
    """One line of ``chatsync doctor``: what was checked, whether it passed, what was found or what to do."""

    name: str
    ok: bool
    detail: str
    configuration: bool = False  # a failure the operator fixes in the settings (exit 4)
    warning: bool = False  # passed, with something worth knowing


def run_checks(settings: Any, check_chatbase: bool = True) -> list[Check]:
    """Database reachable and at the schema this chatsync knows; the key and every chatbot id answered by
    one ``size=1`` request each; each chatbot's sync lock free. Changes nothing (no upgrade, no lock kept)."""
    from chatsync.errors import ChatsyncError, ConfigError, DatabaseUnreachable, SchemaTooNew
    from chatsync.store.engine import (
        current_revision,
        head_revision,
        known_revisions,
        open_engine,
        refuse_foreign_tables,
    )

    checks: list[Check] = []
    url = mask_url(settings.database_url)
    engine = None
    current = False  # the schema is this chatsync's: its lock table is there to check
    missing = _missing_sqlite_file(settings.database_url)
    try:
        if missing is not None:
            raise _NotYet(missing)
        engine = open_engine(settings.database_url, create=False)  # a check never makes a database
        try:
            found = current_revision(engine)
        except Exception as exc:
            raise DatabaseUnreachable(exc) from None
        head = head_revision()
        current = found == head
        if found is None:
            with engine.connect() as connection:
                refuse_foreign_tables(connection)  # another application's tables: a ConfigError
        if current:
            checks.append(Check("database", True, f"{url} answers, schema {found} (current)"))
        elif found is None or found in known_revisions():
            checks.append(
                Check(
                    "database",
                    True,
                    f"{url} answers, schema {found or 'empty'}: the next command upgrades it to {head}",
                    warning=True,
                )
            )
        else:
            checks.append(
                Check(
                    "database",
                    False,
                    f"{url}: {SchemaTooNew(found, head)}",
                )
            )
    except _NotYet as exc:
        checks.append(
            Check(
                "database",
                True,
                f"no database at {exc} yet: the first sync creates it (if it should exist, check "
                "CHATSYNC_DATABASE_URL)",
                warning=True,
            )
        )
    except ConfigError as exc:
        checks.append(Check("database", False, str(exc), configuration=True))
        engine = None
    except ChatsyncError as exc:
        checks.append(Check("database", False, f"{url}: {exc}", configuration=True))
        engine = None
    ids = settings.chatbot_ids
    if not ids:
        checks.append(
            Check(
                "chatbots",
                False,
                "CHATBASE_CHATBOT_ID is not set: export it or pass --chatbot-id",
                configuration=True,
            )
        )
    if check_chatbase:
        checks.extend(_chatbase_checks(settings, ids))
    if engine is not None:
        if current:  # an empty or older schema has no lock to check (and doctor never upgrades it)
            checks.extend(_lock_checks(engine, ids))
        engine.dispose()
    return checks


class _NotYet(Exception):
    """The SQLite file the settings name does not exist yet."""


def _missing_sqlite_file(url: str) -> str | None:
    """The path of a SQLite database URL whose file does not exist (doctor must not create it)."""
    from pathlib import Path

    from sqlalchemy.engine import make_url

    from chatsync.config import normalize_database_url

    try:
        parsed = make_url(normalize_database_url(url))
    except Exception:
        return None
    database = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database).expanduser()
    return None if path.is_file() else str(path)


def _chatbase_checks(settings: Any, ids: tuple[str, ...]) -> list[Check]:
    from chatsync.chatbase import api_root, open_client
    from chatsync.errors import ChatbaseRejected, ChatbaseUnavailable, ChatsyncError

    if not settings.api_key:
        return [
            Check(
                "key", False, "CHATBASE_API_KEY is not set: export it or pass --api-key", configuration=True
            )
        ]
    out: list[Check] = []
    answered = False  # Chatbase answered at least one request with something other than 401
    budget = min(settings.retry_budget, DOCTOR_BUDGET)  # a check, not a sync: give up sooner
    root, variable = api_root(settings)
    root = mask_url(root)  # (a proxy's URL may carry a password)
    with open_client(settings, retry_budget=budget) as client:
        for chatbot_id in ids:
            name = f"chatbot {chatbot_id}"
            try:
                client.fetch_page(chatbot_id, 1, None, None, size=1)  # one conversation of API v1 or v2
            except ChatbaseRejected as exc:
                if exc.status == 401:
                    return [*out, Check("key", False, str(exc), configuration=True)]
                answered = True
                out.append(Check(name, False, str(exc), configuration=True))
                continue
            except ChatbaseUnavailable as exc:
                out.append(
                    Check(
                        name,
                        False,
                        f"Chatbase did not answer at {root} within {budget.total_seconds():g} s "
                        f"({exc.last or exc}): check {variable} and the network",
                    )
                )
                continue
            except ChatsyncError as exc:
                out.append(Check(name, False, str(exc)))
                continue
            answered = True
            out.append(
                Check(
                    name, True, f"Chatbase API {settings.api_version} answers for it at {root} with this key"
                )
            )
    if answered:
        out.insert(0, Check("key", True, "accepted by Chatbase"))
    else:
        out.insert(0, Check("key", True, "not checked: Chatbase did not answer", warning=True))
    return out


def _lock_checks(engine: Engine, ids: tuple[str, ...]) -> list[Check]:
    from chatsync.store.locks import sync_held

    out = []
    for chatbot_id in ids:
        if sync_held(engine, chatbot_id):
            out.append(
                Check(f"lock {chatbot_id}", True, "held: a sync of this chatbot is running now", warning=True)
            )
        else:
            out.append(Check(f"lock {chatbot_id}", True, "free"))
    return out
