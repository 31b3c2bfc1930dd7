"""Lead forms: stored from the ``leads.submit`` webhook and the ``get-leads`` backfill, and applied to the
conversations they were filled in.

A webhook lead names its conversation. Its number (the phone read by the WhatsApp rule) is kept on the
conversation as ``wa_lead`` (the latest lead's, when there are several) and becomes the conversation's
number by precedence (chatsync.whatsapp.number_in_force): a person's value, the chat reply and the
WhatsApp sender's own number beat it; it beats the form. A lead for a conversation not synced yet is kept
and applied by the sync page that stores the conversation (:func:`apply_pending`), in that page's
transaction. ``get-leads`` rows carry no conversation id: they only count. One lead received both ways
(same chatbot, name, email and phone, within a day) is one row holding both keys, so it counts once.

A webhook lead and the sync page that stores its conversation could each read before the other commits
and miss the other. On PostgreSQL they take a transaction-level advisory lock first (shared by sync pages,
which then run side by side; exclusive for a lead), so one of them sees the other. SQLite has one writer
at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, false, func, select, text, update
from sqlalchemy.sql import ColumnElement

from chatsync.store import audit, changes, rollups
from chatsync.store.engine import is_among, lock_for_writing
from chatsync.store.queries import ConversationFilter
from chatsync.store.tables import conversations as c
from chatsync.store.tables import leads
from chatsync.whatsapp import MANUAL, number_in_force, region_of

_LEAD_LOCK = 0x63686174_6C656164  # "chat" "lead": a lead against the sync pages storing conversations
# A lead received by webhook and by backfill is one lead when its fields match within this time.
TWIN_WINDOW = timedelta(days=1)
_CANDIDATE_COLUMNS = ("id", "chatbot_id", "wa_extracted", "wa_channel", "wa_form", "wa_lead")


@dataclass(frozen=True)
class Lead:
    """A lead form as chatsync stores it.

    ``number``: E.164 of ``phone`` by the WhatsApp rule, or None. ``submitted_at``: Chatbase's
    ``created_at`` for a backfilled lead, when the webhook arrived for a webhook lead (UTC, aware).
    ``raw``: what was received, under ``"webhook"`` or ``"get-leads"``. ``delivery`` (webhook) and
    ``chatbase_id`` (backfill) identify a lead again when it is received again.
    """

    chatbot_id: str
    name: str | None
    email: str | None
    phone: str | None
    number: str | None
    submitted_at: datetime
    raw: dict[str, Any]
    conversation_id: str | None = None
    chatbase_id: str | None = None
    delivery: str | None = None


@dataclass
class BackfillCounts:
    """What a backfill did with the leads it read."""

    stored: int = 0  # new leads
    merged: int = 0  # leads the webhook had delivered already: now known both ways
    unchanged: int = 0  # already backfilled
    skipped: list[str] = field(default_factory=list)  # why unreadable rows were not stored

    def add(self, other: BackfillCounts) -> None:
        self.stored += other.stored
        self.merged += other.merged
        self.unchanged += other.unchanged
        self.skipped += other.skipped


# ---------------------------------------------------------------------------------------------- locking
def hold_against_leads(connection: Connection) -> None:
    """Make a lead that arrives now wait until this transaction commits (or this one wait for it).

    Taken first, before any row is locked, by the writers that read leads and then write conversations: a
    sync page storing new conversations and a ``reextract`` batch. On PostgreSQL a shared advisory lock, so
    those writers still run side by side; on SQLite the write lock.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": _LEAD_LOCK})
    else:
        lock_for_writing(connection)


def _hold_for_lead(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LEAD_LOCK})
    else:
        lock_for_writing(connection)


# ---------------------------------------------------------------------------------------------- storing
def _values(lead: Lead, now: datetime) -> dict[str, Any]:
    return {
        "chatbot_id": lead.chatbot_id,
        "chatbase_id": lead.chatbase_id,
        "delivery": lead.delivery,
        "conversation_id": lead.conversation_id,
        "name": lead.name,
        "email": lead.email,
        "phone": lead.phone,
        "number": lead.number,
        "submitted_at": lead.submitted_at,
        "received_at": now,
        "raw": lead.raw,
    }


def _same_person(lead: Lead) -> Any:
    return and_(
        leads.c.chatbot_id == lead.chatbot_id,
        leads.c.name.is_not_distinct_from(lead.name),
        leads.c.email.is_not_distinct_from(lead.email),
        leads.c.phone.is_not_distinct_from(lead.phone),
    )


def receive_webhook_lead(connection: Connection, lead: Lead, now: datetime) -> str:
    """Store a webhook lead (``lead.delivery`` set) and apply it to its conversation, in the caller's
    transaction. Returns what happened: ``duplicate`` (this delivery was stored before: nothing changes),
    ``applied`` (its conversation is stored and now has the lead's number as ``wa_lead``), ``pending`` (its
    conversation is not synced yet: the sync that stores it applies the lead) or ``stored`` (kept and
    counted; no conversation or no usable number to apply)."""
    _hold_for_lead(connection)
    seen = connection.execute(select(leads.c.id).where(leads.c.delivery == lead.delivery)).first()
    if seen is not None:
        return "duplicate"
    twin = connection.execute(
        select(leads.c.id, leads.c.raw)
        .where(
            _same_person(lead),
            leads.c.delivery.is_(None),
            leads.c.chatbase_id.is_not(None),
            leads.c.submitted_at.between(now - TWIN_WINDOW, now + TWIN_WINDOW),
        )
        .order_by(leads.c.submitted_at, leads.c.id)
        .limit(1)
    ).first()
    if twin is None:
        connection.execute(leads.insert().values(**_values(lead, now)))
    else:  # backfilled first: the row gains the delivery, the conversation and the webhook's payload
        connection.execute(
            update(leads)
            .where(leads.c.id == twin.id)
            .values(
                delivery=lead.delivery,
                conversation_id=lead.conversation_id,
                number=lead.number,
                raw={**(twin.raw or {}), **lead.raw},
            )
        )
    if lead.conversation_id is None or lead.number is None:
        return "stored"
    found = _lead_numbers(connection, [lead.conversation_id])
    matched = _apply(connection, found, now, audit.BY_LEAD_WEBHOOK, announce=True)
    return "applied" if matched else "pending"


def save_backfilled(connection: Connection, page: Sequence[Lead], now: datetime) -> BackfillCounts:
    """Store one page of ``get-leads`` rows of one chatbot (``chatbase_id`` set) in the caller's transaction;
    a row stored before is left as it is, a lead the webhook delivered already gains its ``chatbase_id``."""
    counts = BackfillCounts()
    if not page:
        return counts
    _hold_for_lead(connection)
    chatbot_id = page[0].chatbot_id
    batch = {lead.chatbase_id: lead for lead in page}  # a row repeated within a page is one lead
    known = set(
        connection.execute(
            select(leads.c.chatbase_id).where(
                leads.c.chatbot_id == chatbot_id, leads.c.chatbase_id.in_(list(batch))
            )
        ).scalars()
    )
    counts.unchanged = len(page) - len(batch) + len(known)
    new = [lead for key, lead in batch.items() if key not in known]
    if not new:
        return counts
    twins = list(
        connection.execute(
            select(leads.c.id, leads.c.name, leads.c.email, leads.c.phone, leads.c.submitted_at, leads.c.raw)
            .where(
                leads.c.chatbot_id == chatbot_id,
                leads.c.chatbase_id.is_(None),
                leads.c.delivery.is_not(None),
                leads.c.submitted_at >= min(lead.submitted_at for lead in new) - TWIN_WINDOW,
                leads.c.submitted_at <= max(lead.submitted_at for lead in new) + TWIN_WINDOW,
            )
            .order_by(leads.c.submitted_at, leads.c.id)
        ).all()
    )
    fresh = []
    for lead in new:
        twin = next(
            (
                t
                for t in twins
                if (t.name, t.email, t.phone) == (lead.name, lead.email, lead.phone)
                and abs(_aware(t.submitted_at) - lead.submitted_at) <= TWIN_WINDOW
            ),
            None,
        )
        if twin is None:
            fresh.append(_values(lead, now))
            continue
        twins.remove(twin)
        connection.execute(
            update(leads)
            .where(leads.c.id == twin.id)
            .values(
                chatbase_id=lead.chatbase_id,
                submitted_at=lead.submitted_at,
                raw={**(twin.raw or {}), **lead.raw},
            )
        )
        counts.merged += 1
    if fresh:
        connection.execute(leads.insert(), fresh)
    counts.stored = len(fresh)
    return counts


def _aware(moment: datetime) -> datetime:
    from chatsync.timeutil import as_utc

    return as_utc(moment)


# --------------------------------------------------------------------------------------------- applying
def apply_pending(connection: Connection, conversation_ids: list[str], now: datetime) -> None:
    """Apply the leads that arrived before these newly stored conversations (the sync's write path, after
    :func:`hold_against_leads`); the caller announces the conversations in the change log."""
    if conversation_ids:
        _apply(connection, _lead_numbers(connection, conversation_ids), now, audit.BY_SYNC, announce=False)


_Entry = tuple[str, str, datetime, int]  # chatbot id, number, submitted at, row id


def _lead_numbers(connection: Connection, conversation_ids: list[str]) -> dict[str, list[_Entry]]:
    """The leads with a number of each conversation among ``conversation_ids``."""
    rows = connection.execute(
        select(
            leads.c.conversation_id, leads.c.chatbot_id, leads.c.number, leads.c.submitted_at, leads.c.id
        ).where(is_among(connection, leads.c.conversation_id, conversation_ids), leads.c.number.is_not(None))
    ).all()
    found: dict[str, list[_Entry]] = {}
    for conversation_id, chatbot_id, number, submitted_at, row_id in rows:
        found.setdefault(conversation_id, []).append((chatbot_id, number, _aware(submitted_at), row_id))
    return found


def latest_number(entries: Iterable[_Entry], chatbot_id: str) -> str | None:
    """The number of the latest lead of the conversation's own chatbot, or None."""
    own = [entry for entry in entries if entry[0] == chatbot_id]
    return max(own, key=lambda entry: (entry[2], entry[3]))[1] if own else None


def _apply(
    connection: Connection, found: dict[str, list[_Entry]], now: datetime, by: str, announce: bool
) -> list[str]:
    """Set ``wa_lead`` and the number in force of the stored conversations in ``found``; returns the ids of
    those stored (whether or not their number changed)."""
    if not found:
        return []
    lock_for_writing(connection)
    stored = rollups.stored(connection, sorted(found), lock=True, extra=_CANDIDATE_COLUMNS)
    before, params = [], []
    for row in stored:
        lead = latest_number(found[row["id"]], row["chatbot_id"])
        if lead is None or lead == row["wa_lead"]:
            continue
        number: str | None = row["whatsapp_number"]
        source: str | None = MANUAL
        region: str | None = row["whatsapp_region"]
        if row["whatsapp_source"] != MANUAL:  # a person's value is never replaced
            number, source = number_in_force(
                extracted=row["wa_extracted"], channel=row["wa_channel"], lead=lead, form=row["wa_form"]
            )
            region = region_of(number) if number else None
        before.append(row)
        params.append({"v_id": row["id"], "v_lead": lead, "v_n": number, "v_s": source, "v_r": region})
    if params:
        connection.execute(
            update(c)
            .where(c.c.id == bindparam("v_id"))
            .values(
                wa_lead=bindparam("v_lead"),
                whatsapp_number=bindparam("v_n"),
                whatsapp_source=bindparam("v_s"),
                whatsapp_region=bindparam("v_r"),
            ),
            params,
        )
        ids = [p["v_id"] for p in params]
        after = rollups.stored(connection, ids, extra=("id",))
        rollups.track(connection, before, after)
        audit.record_changes(connection, audit.changes_between(before, after), by, now)
        if announce:
            changes.record_conversations(connection, [(r["id"], r["chatbot_id"]) for r in before], now)
    return [row["id"] for row in stored if latest_number(found[row["id"]], row["chatbot_id"]) is not None]


def renormalized_numbers(
    connection: Connection, conversation_ids: list[str], number_of: Any
) -> dict[str, list[_Entry]]:
    """Read the phones of these conversations' leads again with ``number_of`` (phone → E.164 or None),
    store the numbers that changed, and return the leads with a number as :func:`latest_number` takes them
    (``reextract``, after the rule's settings changed)."""
    if not conversation_ids:
        return {}
    rows = connection.execute(
        select(
            leads.c.id,
            leads.c.conversation_id,
            leads.c.chatbot_id,
            leads.c.phone,
            leads.c.number,
            leads.c.submitted_at,
        ).where(leads.c.conversation_id.in_(conversation_ids))
    ).all()
    found: dict[str, list[_Entry]] = {}
    rewrites = []
    for row in rows:
        number = number_of(row.phone)
        if number != row.number:
            rewrites.append({"v_id": row.id, "v_number": number})
        if number is not None:
            found.setdefault(row.conversation_id, []).append(
                (row.chatbot_id, number, _aware(row.submitted_at), row.id)
            )
    if rewrites:
        connection.execute(
            update(leads).where(leads.c.id == bindparam("v_id")).values(number=bindparam("v_number")),
            rewrites,
        )
    return found


# --------------------------------------------------------------------------------------------- counting
def count_leads(
    connection: Connection, filters: ConversationFilter, start: datetime | None, end: datetime | None
) -> int | None:
    """Leads submitted in ``start..end`` (end exclusive) of the filter's chatbots; None under a source
    filter (a lead has no source of its own)."""
    if filters.sources:
        return None
    where: list[ColumnElement[bool]] = []
    if filters.visible_chatbot_ids is not None:
        visible = filters.visible_chatbot_ids
        where.append(leads.c.chatbot_id.in_(visible) if visible else false())
    if filters.chatbot_ids:
        where.append(leads.c.chatbot_id.in_(filters.chatbot_ids))
    if start is not None:
        where.append(leads.c.submitted_at >= start)
    if end is not None:
        where.append(leads.c.submitted_at < end)
    return int(connection.execute(select(func.count()).select_from(leads).where(*where)).scalar_one())
