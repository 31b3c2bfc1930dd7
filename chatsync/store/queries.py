"""Finding and correcting stored conversations: one implementation for the CLI and the HTTP API.

Lists are ordered newest first and paged by keyset (``created_at, id`` of the last row), so page 1,000 is
as fast as page 1; every filter maps onto an index or a cheap predicate.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, Engine, and_, false, literal, or_, select, text, true, tuple_, update
from sqlalchemy.sql import ColumnElement

from chatsync.errors import ConversationNotFound, UsageError
from chatsync.normalize import transcript
from chatsync.store import audit, changes, rollups
from chatsync.store.audit import WhatsAppChange
from chatsync.store.engine import lock_for_writing
from chatsync.store.tables import conversations as c
from chatsync.store.tables import whatsapp_audit
from chatsync.timeutil import as_utc, day_end, day_start, iso_z
from chatsync.whatsapp import AUTO_SOURCES

LIST_KEYS = [
    "id",
    "chatbot_id",
    "created_at",
    "last_message_at",
    "source",
    "customer",
    "country",
    "message_count",
    "whatsapp_number",
    "whatsapp_source",
]
_LIST_COLUMNS = [c.c[k] for k in LIST_KEYS]


@dataclass(frozen=True)
class ConversationFilter:
    """Which conversations a list, a report or an API call is about."""

    chatbot_ids: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    since: date | None = None  # UTC days unless the caller converts bounds itself
    until: date | None = None
    has_whatsapp: bool | None = None
    number: str | None = None  # E.164, already normalised by the rule
    search: str | None = None
    visible_chatbot_ids: tuple[str, ...] | None = None  # None: no restriction (CLI); () sees nothing
    created_from: datetime | None = None  # exact bounds, for time zones other than UTC
    created_before: datetime | None = None


def conditions(filters: ConversationFilter, dialect: str) -> list[ColumnElement[bool]]:
    """The WHERE clauses of a filter (shared by lists and analytics)."""
    where: list[ColumnElement[bool]] = []
    if filters.visible_chatbot_ids is not None:
        where.append(
            c.c.chatbot_id.in_(filters.visible_chatbot_ids) if filters.visible_chatbot_ids else false()
        )
    if filters.chatbot_ids:
        where.append(c.c.chatbot_id.in_(filters.chatbot_ids))
    if filters.sources:
        named = [s for s in filters.sources if s != "Unspecified"]
        clause: ColumnElement[bool] = c.c.source.in_(filters.sources)
        if len(named) != len(filters.sources):
            clause = or_(clause, c.c.source.is_(None))
        where.append(clause)
    if filters.since:
        where.append(c.c.created_at >= day_start(filters.since))
    if filters.until:
        where.append(c.c.created_at < day_end(filters.until))
    if filters.created_from:
        where.append(c.c.created_at >= filters.created_from)
    if filters.created_before:
        where.append(c.c.created_at < filters.created_before)
    if filters.has_whatsapp is True:
        where.append(c.c.whatsapp_number.is_not(None))
    elif filters.has_whatsapp is False:
        where.append(c.c.whatsapp_number.is_(None))
    if filters.number:
        where.append(c.c.whatsapp_number == filters.number)
    if filters.search:
        where.append(_search(filters.search, dialect))
    return where


def _search(needle: str, dialect: str) -> ColumnElement[bool]:
    """Case-insensitive substring of any message's content, in any script (``École`` finds ``école``)."""
    if dialect == "postgresql":
        pattern = "%" + needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        clause = text(
            "EXISTS (SELECT 1 FROM jsonb_array_elements(CASE WHEN jsonb_typeof(conversations.messages) = 'array' "
            "THEN conversations.messages ELSE '[]'::jsonb END) AS m "
            "WHERE m->>'content' ILIKE :pattern ESCAPE '\\')"
        ).bindparams(pattern=pattern)
    else:
        # SQLite's lower() and LIKE fold ASCII only: Python's casefold, registered on every connection
        # (chatsync.store.engine), folds every script.
        clause = text(
            "EXISTS (SELECT 1 FROM json_each(conversations.messages) AS m "
            "WHERE instr(chatsync_casefold(json_extract(m.value, '$.content')), :needle) > 0)"
        ).bindparams(needle=needle.casefold())
    return clause  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------- cursor
def encode_cursor(created_at: datetime, conversation_id: str) -> str:
    raw = json.dumps([iso_z(created_at), conversation_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    from chatsync.timeutil import parse_timestamp

    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, conversation_id = json.loads(base64.urlsafe_b64decode(padded))
        if not isinstance(created, str) or not isinstance(conversation_id, str):
            raise ValueError("not a cursor chatsync wrote")
        return parse_timestamp(created), conversation_id
    except Exception:
        raise UsageError("invalid cursor: pass back the next_cursor of the previous page unchanged") from None


def _row(mapping: Any) -> dict[str, Any]:
    out = {k: mapping[k] for k in LIST_KEYS}
    out["created_at"] = iso_z(as_utc(out["created_at"]))
    out["last_message_at"] = iso_z(as_utc(out["last_message_at"])) if out["last_message_at"] else None
    return out


def list_statement(filters: ConversationFilter, dialect: str, limit: int, cursor: str | None = None) -> Any:
    """The SELECT behind a list page: newest first, keyset after ``cursor``, one row more than asked."""
    where = conditions(filters, dialect)
    if cursor:
        created, conversation_id = decode_cursor(cursor)
        where.append(
            tuple_(c.c.created_at, c.c.id) < tuple_(literal(created, c.c.created_at.type), conversation_id)
        )
    return (
        select(*_LIST_COLUMNS)
        .where(and_(true(), *where))
        .order_by(c.c.created_at.desc(), c.c.id.desc())
        .limit(limit + 1)
    )


def list_page(
    connection: Connection, filters: ConversationFilter, limit: int, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page, newest first, and the cursor of the next page (None at the end)."""
    statement = list_statement(filters, connection.dialect.name, limit, cursor)
    rows = connection.execute(statement).mappings().all()
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(as_utc(rows[-1]["created_at"]), rows[-1]["id"]) if more and rows else None
    return [_row(r) for r in rows], next_cursor


def iter_conversations(
    engine: Engine, filters: ConversationFilter, limit: int | None, page_size: int = 500
) -> Iterator[dict[str, Any]]:
    """Stream matches page by page (bounded memory, one short transaction per page)."""
    cursor: str | None = None
    left = limit
    while left is None or left > 0:
        size = page_size if left is None else min(page_size, left)
        with engine.connect() as connection:
            rows, cursor = list_page(connection, filters, size, cursor)
        yield from rows
        if left is not None:
            left -= len(rows)
        if cursor is None:
            return


def holds_conversations(connection: Connection) -> bool:
    """Whether any conversation is stored at all (one index probe): tells "nothing matches" from "nothing
    synced into this database yet"."""
    return connection.execute(select(c.c.id).limit(1)).first() is not None


# ------------------------------------------------------------------------------------------------------ show
def get_conversation(
    connection: Connection,
    conversation_id: str,
    visible_chatbot_ids: Sequence[str] | None = None,
    with_finding: bool = False,
) -> dict[str, Any]:
    """One conversation with its transcript and WhatsApp audit trail; invisible is the same as missing.

    ``with_finding`` adds what the rule found (outcome, matched text, rejected candidates) and the number
    each source gives (``sources``: extracted, channel, lead, form; None where it gave none), for people
    asking why a number was or was not stored.
    """
    where = [c.c.id == conversation_id]
    if visible_chatbot_ids is not None:
        where.append(c.c.chatbot_id.in_(list(visible_chatbot_ids)) if visible_chatbot_ids else false())
    row = (
        connection.execute(
            select(
                *_LIST_COLUMNS,
                c.c.messages,
                c.c.title,
                c.c.status,
                c.c.wa_outcome,
                c.c.wa_matched,
                c.c.wa_reasons,
                *[c.c[f"wa_{source}"] for source in AUTO_SOURCES],
            ).where(and_(true(), *where))
        )
        .mappings()
        .first()
    )
    if row is None:
        raise ConversationNotFound(conversation_id)
    out = _row(row)
    out["title"], out["status"] = row["title"], row["status"]  # API v2 only
    out["messages"] = transcript(row["messages"] if isinstance(row["messages"], list) else [])
    out["whatsapp_audit"] = audit_trail(connection, conversation_id)
    if with_finding:
        out["whatsapp_finding"] = {
            "outcome": row["wa_outcome"],
            "matched": row["wa_matched"],
            "rejected": row["wa_reasons"] or [],
            "sources": {source: row[f"wa_{source}"] for source in AUTO_SOURCES},
        }
    return out


def audit_trail(connection: Connection, conversation_id: str) -> list[dict[str, Any]]:
    rows = connection.execute(
        select(whatsapp_audit)
        .where(whatsapp_audit.c.conversation_id == conversation_id)
        .order_by(whatsapp_audit.c.id)
    ).mappings()
    return [
        {
            "at": iso_z(as_utc(r["at"])),
            "by": r["by"],
            "old": r["old"],
            "new": r["new"],
            "old_source": r["old_source"],
            "new_source": r["new_source"],
        }
        for r in rows
    ]


# ------------------------------------------------------------------------------------------------ set number
def set_whatsapp(
    connection: Connection,
    conversation_id: str,
    *,
    number: str | None,
    auto: bool,
    by: str,
    now: datetime,
    visible_chatbot_ids: Sequence[str] | None = None,
) -> WhatsAppChange:
    """Store a person's number (``number``), a person's "no number" (None), or hand back to the rule (auto:
    the number by precedence over the chat, the sender's number, the lead and the form).

    The change and its audit row are written in the caller's transaction.
    """
    from chatsync.whatsapp import MANUAL, number_in_force, region_of

    lock_for_writing(connection)
    where = [c.c.id == conversation_id]
    if visible_chatbot_ids is not None:
        where.append(c.c.chatbot_id.in_(list(visible_chatbot_ids)) if visible_chatbot_ids else false())
    current = connection.execute(
        select(
            *[c.c[k] for k in rollups.REPORT_COLUMNS],
            c.c.wa_extracted,
            c.c.wa_channel,
            c.c.wa_lead,
            c.c.wa_form,
        )
        .where(and_(true(), *where))
        .with_for_update()
    ).first()
    if current is None:
        raise ConversationNotFound(conversation_id)
    if auto:
        new, new_source = number_in_force(
            extracted=current.wa_extracted,
            channel=current.wa_channel,
            lead=current.wa_lead,
            form=current.wa_form,
        )
    else:
        new, new_source = number, MANUAL
    change = WhatsAppChange(
        conversation_id, current.whatsapp_number, new, current.whatsapp_source, new_source
    )
    if not change.changed:
        return change
    number_columns = {
        "whatsapp_number": new,
        "whatsapp_source": new_source,
        "whatsapp_region": region_of(new) if new else None,
    }
    connection.execute(update(c).where(c.c.id == conversation_id).values(**number_columns))
    before = current._mapping
    rollups.track(connection, [before], [{**before, **number_columns}])
    audit.record_changes(connection, [change], by, now)
    changes.record_conversations(connection, [(conversation_id, current.chatbot_id)], now)
    return change
