"""Chatbase lead forms: the signed ``leads.submit`` webhook and the ``get-leads`` backfill.

What arrives is read here (signature, shape, the phone by the WhatsApp rule); storing and applying a lead
to its conversation is :mod:`chatsync.store.leads`. The backfill fetches with the Chatbase client and
saves each page in one transaction: fetching and saving meet only in :func:`backfill_leads`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING

from chatsync.config import WhatsAppRule
from chatsync.errors import BadLead, BadRecord
from chatsync.normalize import canonical_json, storable
from chatsync.whatsapp import form_number

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from chatsync.chatbase import ChatbaseClient
    from chatsync.store.leads import BackfillCounts, Lead

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "x-chatbase-signature"
LEADS_SUBMIT = "leads.submit"
MAX_ID_CHARS = 128  # the width of the id columns


def signature_matches(body: bytes, header: str | None, secret: str) -> bool:
    """Whether ``header`` is Chatbase's signature of the raw ``body``: the hex HMAC-SHA1 of the exact bytes
    keyed with ``secret`` (either case), compared in constant time. A missing header never matches."""
    if not header or not secret:
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
    return hmac.compare_digest(expected, header.strip().lower().encode("ascii", "replace").decode())


def _text(value: object, name: str, number_too: bool = False) -> str | None:
    """A lead's text field as sent (NUL and lone surrogates as U+FFFD), None when absent or empty; anything
    but text (or, ``number_too``, a whole number: a phone) is refused."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, str | int)
        or (isinstance(value, int) and not number_too)
    ):
        raise BadLead(f"{name} is not a string")
    text = str(_storable(value)).strip()
    return text or None


def _key(value: object, name: str, required: bool) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise BadLead(f"{name} is missing")
        return None
    if not isinstance(value, str):
        raise BadLead(f"{name} is not a string")
    if len(value) > MAX_ID_CHARS or any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise BadLead(f"{name} is not an id (control characters, or over {MAX_ID_CHARS} characters)")
    return value


def _storable(value: object) -> object:
    """``value`` with NUL and lone surrogates replaced by U+FFFD; BadLead when it cannot be stored at all."""
    try:
        return storable(value).record
    except BadRecord as exc:
        raise BadLead(exc.reason) from None


def lead_from_webhook(event: object, rule: WhatsAppRule, now: datetime) -> Lead | None:
    """The lead of a verified ``leads.submit`` event: ``{"eventType", "chatbotId", "payload":
    {"conversationId", "customerEmail", "customerName", "customerPhone"}}``; None for another event type.

    ``delivery`` is a hash of the event's canonical JSON, so a redelivery is recognised however its JSON is
    spaced or ordered. Text no database holds (NUL, lone surrogates) is replaced by U+FFFD, as in a synced
    conversation; an id holding such characters is refused. Raises BadLead naming what is wrong.
    """
    from chatsync.store.leads import Lead

    if not isinstance(event, dict):
        raise BadLead("the body is not a JSON object")
    kind = event.get("eventType")
    if kind != LEADS_SUBMIT:
        if isinstance(kind, str) and kind:
            return None
        raise BadLead("eventType is missing")
    chatbot_id = _key(event.get("chatbotId"), "chatbotId", required=True)
    payload = event.get("payload")
    if not isinstance(payload, dict):
        raise BadLead("payload is not an object")
    phone = _text(payload.get("customerPhone"), "customerPhone", number_too=True)
    assert chatbot_id is not None
    kept = _storable(event)
    return Lead(
        chatbot_id=chatbot_id,
        conversation_id=_key(payload.get("conversationId"), "conversationId", required=False),
        name=_text(payload.get("customerName"), "customerName"),
        email=_text(payload.get("customerEmail"), "customerEmail"),
        phone=phone,
        number=form_number(phone, rule),
        submitted_at=now,
        raw={"webhook": kept},
        delivery=hashlib.sha256(canonical_json(kept).encode()).hexdigest(),
    )


def lead_from_row(row: object, chatbot_id: str, rule: WhatsAppRule) -> Lead:
    """A ``get-leads`` row (``id``, ``name``, ``email``, ``phone``, ``created_at``) of ``chatbot_id`` as a
    lead with no conversation; raises BadLead naming what is wrong."""
    from chatsync.store.leads import Lead
    from chatsync.timeutil import parse_timestamp

    if not isinstance(row, dict):
        raise BadLead("the row is not a JSON object")
    chatbase_id = _key(row.get("id"), "id", required=True)
    try:
        submitted = parse_timestamp(row.get("created_at"))
    except (ValueError, OverflowError, OSError, TypeError):
        raise BadLead(f"unparsable created_at: {str(row.get('created_at'))[:40]!r}") from None
    phone = _text(row.get("phone"), "phone", number_too=True)
    return Lead(
        chatbot_id=chatbot_id,
        chatbase_id=chatbase_id,
        name=_text(row.get("name"), "name"),
        email=_text(row.get("email"), "email"),
        phone=phone,
        number=form_number(phone, rule),
        submitted_at=submitted,
        raw={"get-leads": _storable(row)},
    )


@dataclass(frozen=True)
class LeadsProgress:
    """After each page of a backfill: the chatbot and what was done so far."""

    chatbot_id: str
    read: int
    counts: BackfillCounts


def backfill_leads(
    engine: Engine,
    client: ChatbaseClient,
    chatbot_ids: Iterable[str],
    rule: WhatsAppRule,
    since: date | None = None,
    until: date | None = None,
    progress: Callable[[LeadsProgress], None] | None = None,
) -> dict[str, BackfillCounts]:
    """Page through ``get-leads`` of each chatbot (UTC days ``since..until``, inclusive) and store every
    lead, one transaction per page. Running it again stores nothing twice. Rows that are not leads are
    skipped with the reason (logged, and kept in the counts)."""
    from chatsync.store.leads import BackfillCounts, save_backfilled
    from chatsync.timeutil import utcnow

    done: dict[str, BackfillCounts] = {}
    for chatbot_id in chatbot_ids:
        counts = done[chatbot_id] = BackfillCounts()
        read = 0
        for rows, _last in client.iter_leads(chatbot_id, since, until):
            page: list[Lead] = []
            skipped = []
            for row in rows:
                try:
                    page.append(lead_from_row(row, chatbot_id, rule))
                except BadLead as exc:
                    skipped.append(exc.reason)
            for reason in skipped:
                log.warning("skipped a get-leads row of chatbot %s: %s", chatbot_id, reason)
            with engine.begin() as connection:
                saved = save_backfilled(connection, page, utcnow())
            saved.skipped = skipped
            counts.add(saved)
            read += len(rows)
            if progress:
                progress(LeadsProgress(chatbot_id, read, counts))
    return done
