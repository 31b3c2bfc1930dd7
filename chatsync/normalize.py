"""Raw Chatbase JSON → the row chatsync stores. No I/O.

Only ``id``, ``created_at`` and ``messages`` can be counted on; everything else is optional and the whole
object is kept, so a field chatsync does not know yet is never lost. Per-conversation figures that the
report aggregates (message counts, response times, drop-off) are computed here once, at sync time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from chatsync.chatbase import SOURCES
from chatsync.config import WhatsAppRule
from chatsync.errors import BadRecord, InvalidNumber
from chatsync.timeutil import iso_z, parse_timestamp
from chatsync.whatsapp import (
    ASSISTANT_ROLES,
    USER_ROLES,
    extract_conversation,
    iter_roles_and_contents,
    normalize_number,
    region_of,
)

MAX_MESSAGE_CHARS = 200_000  # Chatbase caps typed messages far below this; larger is a broken record
MAX_MESSAGES = 10_000


@dataclass(frozen=True)
class WhatsAppFinding:
    """What the chat and the form say about the user's number (a person's manual value is stored apart)."""

    outcome: str
    extracted: str | None
    matched: str | None
    reasons: list[str]
    form: str | None

    @property
    def number(self) -> str | None:
        return self.extracted or self.form

    @property
    def source(self) -> str | None:
        return "extracted" if self.extracted else "form" if self.form else None


def _message_time(message: dict[str, Any], position: int) -> datetime | None:
    for key in ("createdAt", "created_at"):
        value = message.get(key)
        if value not in (None, ""):
            try:
                return parse_timestamp(value)
            except (ValueError, OverflowError, OSError):
                raise BadRecord(f"message {position} has an unparsable {key}: {str(value)[:40]!r}") from None
    return None


def customer_label(customer: object) -> str | None:
    """Chatbase's string as sent; for an object its email, else name, else id; None when absent or empty."""
    if isinstance(customer, str):
        return customer.strip() or None
    if isinstance(customer, dict):
        for key in ("email", "name", "id"):
            value = customer.get(key)
            if value not in (None, "") and str(value).strip():
                return str(value).strip()
    return None


def find_whatsapp(raw_messages: list[Any], form_phone: object, rule: WhatsAppRule) -> WhatsAppFinding:
    """Apply the rule to the chat, then fall back to ``form_submission.phone`` when the chat gave nothing."""
    found = extract_conversation(
        iter_roles_and_contents(m for m in raw_messages if isinstance(m, dict)), rule
    )
    form = None
    if isinstance(form_phone, str | int) and str(form_phone).strip():
        try:
            form = normalize_number(str(form_phone), rule)
        except InvalidNumber:
            form = None
    return WhatsAppFinding(found.outcome, found.number, found.matched, found.reasons, form)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def content_hash(canonical: str) -> str:
    """The fingerprint that tells an unchanged conversation from a changed one."""
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def normalize_conversation(raw: object, chatbot_id: str, rule: WhatsAppRule) -> dict[str, Any]:
    """Validate one raw conversation and compute its row; raises BadRecord with the reason otherwise."""
    if not isinstance(raw, dict):
        raise BadRecord("record is not a JSON object")
    conversation_id = raw.get("id")
    if isinstance(conversation_id, int) and not isinstance(conversation_id, bool):
        conversation_id = str(conversation_id)
    if not isinstance(conversation_id, str) or not conversation_id.strip():
        raise BadRecord("record has no id")
    messages = raw.get("messages")
    if messages is None:
        messages = []
    if not isinstance(messages, list):
        raise BadRecord(f"messages is a {type(messages).__name__}, not a list")
    if len(messages) > MAX_MESSAGES:
        raise BadRecord(f"more than {MAX_MESSAGES} messages")
    text = canonical_json(raw)
    if "\\u0000" in text:
        raise BadRecord("contains a NUL character, which the database cannot store")
    try:
        created_at = parse_timestamp(raw.get("created_at"))
    except (ValueError, OverflowError, OSError):
        raise BadRecord(f"unparsable created_at: {str(raw.get('created_at'))[:40]!r}") from None
    last_value = raw.get("last_message_at") or raw.get("updated_at")
    last_message_at = None
    if last_value not in (None, ""):
        try:
            last_message_at = parse_timestamp(last_value)
        except (ValueError, OverflowError, OSError):
            raise BadRecord(f"unparsable last_message_at: {str(last_value)[:40]!r}") from None

    roles: list[str] = []
    times: list[datetime | None] = []
    contents: list[str] = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecord(f"message {position} is not an object")
        content = message.get("content")
        if isinstance(content, str) and len(content) > MAX_MESSAGE_CHARS:
            raise BadRecord(
                f"message {position} is {len(content):,} characters (limit {MAX_MESSAGE_CHARS:,})"
            )
        roles.append(_role(message.get("role")))
        times.append(_message_time(message, position))
        contents.append(content if isinstance(content, str) else "")

    figures = conversation_figures(roles, times, contents)
    form = raw.get("form_submission")
    finding = find_whatsapp(messages, form.get("phone") if isinstance(form, dict) else None, rule)
    bot = raw.get("chatbot_id")
    rest = {k: v for k, v in raw.items() if k != "messages"}
    source = raw.get("source")
    country = raw.get("country")
    min_score = raw.get("min_score")
    return {
        "id": conversation_id,
        "chatbot_id": str(bot) if bot not in (None, "") else chatbot_id,
        "created_at": created_at,
        "last_message_at": last_message_at or max((t for t in times if t), default=None),
        "source": source_name(source),
        "customer": customer_label(raw.get("customer")),
        "country": str(country).upper() if isinstance(country, str) and country.strip() else None,
        "min_score": float(min_score)
        if isinstance(min_score, int | float) and not isinstance(min_score, bool)
        else None,
        "messages": messages,
        "raw": rest,
        "content_hash": content_hash(text),
        **figures,
        "wa_outcome": finding.outcome,
        "wa_extracted": finding.extracted,
        "wa_form": finding.form,
        "wa_matched": finding.matched,
        "wa_reasons": finding.reasons or None,
        "auto_number": finding.number,
        "auto_source": finding.source,
        "auto_region": region_of(finding.number) if finding.number else None,
    }


def source_name(value: object) -> str | None:
    """Chatbase's canonical spelling of a source (the OpenAPI lists lowercase variants); others as sent."""
    if value in (None, ""):
        return None
    text = str(value).strip()
    return next((known for known in SOURCES if known.lower() == text.lower()), text)


def _role(value: object) -> str:
    role = str(value or "").strip().lower()
    if role in ASSISTANT_ROLES:
        return "assistant"
    if role in USER_ROLES:
        return "user"
    return role or "unknown"


def conversation_figures(
    roles: list[str], times: list[datetime | None], contents: list[str]
) -> dict[str, Any]:
    """Per-conversation numbers the report sums: counts by role, response times, whether it was left asking."""
    response_seconds: list[float] = []
    first_response: float | None = None
    steps = 0
    first_step_seen = False
    for i in range(len(roles) - 1):
        if roles[i] == "user" and roles[i + 1] == "assistant":
            steps += 1
            asked, answered = times[i], times[i + 1]
            timed = asked is not None and answered is not None
            if timed:
                seconds = round(max(0.0, (answered - asked).total_seconds()), 3)  # type: ignore[operator]
                response_seconds.append(seconds)
            if not first_step_seen:
                first_step_seen = True
                first_response = response_seconds[-1] if timed else None
    last_asks = bool(roles) and roles[-1] == "assistant" and contents[-1].rstrip().endswith(("?", "？"))
    return {
        "message_count": len(roles),
        "user_messages": sum(1 for r in roles if r == "user"),
        "assistant_messages": sum(1 for r in roles if r == "assistant"),
        "response_steps": steps,
        "response_seconds": response_seconds or None,
        "first_response_seconds": first_response,
        "unanswered": last_asks,
    }


def transcript(messages: list[Any]) -> list[dict[str, Any]]:
    """Stored raw messages as ``show`` prints them: role, content and the time where Chatbase sent one."""
    out = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        try:
            moment = _message_time(message, position)
        except BadRecord:
            moment = None
        content = message.get("content")
        out.append(
            {
                "role": _role(message.get("role")),
                "content": content if isinstance(content, str) else "",
                "created_at": iso_z(moment),
            }
        )
    return out
