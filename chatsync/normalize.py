"""Raw Chatbase JSON → the row chatsync stores. No I/O.

Only ``id``, ``created_at`` and ``messages`` can be counted on; everything else is optional and the whole
object is kept, so a field chatsync does not know yet is never lost. Per-conversation figures that the
report aggregates (message counts, response times, drop-off, answers rated up and down) are computed here
once, at sync time. An API v2 export record arrives already in v1's shape
(:func:`chatsync.chatbase_records.record_from_export`), keeping what only v2 sends: ``status``,
``title``, ``userId``, and per message ``parts``, an epoch-seconds ``createdAt`` and ``feedback``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from chatsync.config import WhatsAppRule
from chatsync.errors import BadRecord
from chatsync.jsonbody import UndecodableRecord
from chatsync.sources import SOURCES
from chatsync.timeutil import iso_z, parse_timestamp
from chatsync.whatsapp import (
    ASSISTANT_ROLES,
    USER_ROLES,
    channel_number,
    extract_conversation,
    form_number,
    iter_roles_and_contents,
    number_in_force,
    region_of,
)

MAX_MESSAGE_CHARS = 200_000  # Chatbase caps typed messages far below this; larger is a broken record
MAX_MESSAGES = 10_000
# Widths of the columns Chatbase's values land in (store/tables.py): a longer value is a broken record,
# refused here the same way on every database rather than by PostgreSQL alone.
MAX_ID_CHARS = 128
MAX_SOURCE_CHARS = 64
MAX_COUNTRY_CHARS = 16
MAX_STATUS_CHARS = 32
MAX_TITLE_CHARS = 1000
MAX_CHATBASE_USER_ID_CHARS = 256
REPLACEMENT_CHARACTER = "\ufffd"
# Text no database can hold: NUL (PostgreSQL text and JSONB refuse it) and UTF-16 surrogates that are not
# part of a pair (JavaScript produces them when it cuts an emoji in half; they are not UTF-8 encodable).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


@dataclass(frozen=True)
class WhatsAppFinding:
    """What a conversation's record says about the user's number: the chat reply, ``form_submission.phone``
    and, on a WhatsApp conversation, the sender's own number. Leads and a person's value are stored apart."""

    outcome: str
    extracted: str | None
    matched: str | None
    reasons: list[str]
    form: str | None
    channel: str | None = None

    @property
    def number(self) -> str | None:
        return self.in_force[0]

    @property
    def source(self) -> str | None:
        return self.in_force[1]

    @property
    def in_force(self) -> tuple[str | None, str | None]:
        """The number and source the record alone gives, by precedence (no lead known)."""
        return number_in_force(extracted=self.extracted, channel=self.channel, lead=None, form=self.form)


def _message_time(message: dict[str, Any], position: int) -> datetime | None:
    """A message's time: ``createdAt`` (v2: epoch seconds; v1: ISO 8601 when sent), else ``created_at``;
    None when it has neither. Raises BadRecord for one that is not a time."""
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


# The fields of a WhatsApp conversation's record that may carry the sender's own number: API v2's
# ``userId`` and API v1's ``customer`` when it is a string. An assumption to confirm against a real account.
SENDER_FIELDS = ("userId", "customer")
WHATSAPP = "WhatsApp"


def sender_number(record: Mapping[str, Any]) -> str | None:
    """The WhatsApp sender's own number (E.164) on a conversation whose source is WhatsApp, read from
    :data:`SENDER_FIELDS` by :func:`chatsync.whatsapp.channel_number`; None on any other source, when
    neither field holds one, or when the two hold different numbers."""
    if source_name(record.get("source")) != WHATSAPP:
        return None
    numbers = {n for n in (channel_number(record.get(f)) for f in SENDER_FIELDS) if n}
    return numbers.pop() if len(numbers) == 1 else None


def find_whatsapp(raw_messages: list[Any], record: Mapping[str, Any], rule: WhatsAppRule) -> WhatsAppFinding:
    """Apply the rule to the chat, and read ``form_submission.phone`` and the WhatsApp sender's number of
    ``record`` (the conversation's other fields: those of the stored ``raw`` are enough)."""
    found = extract_conversation(
        iter_roles_and_contents(m for m in raw_messages if isinstance(m, dict)), rule
    )
    form_submission = record.get("form_submission")
    form = form_number(form_submission.get("phone") if isinstance(form_submission, dict) else None, rule)
    return WhatsAppFinding(
        found.outcome, found.number, found.matched, found.reasons, form, sender_number(record)
    )


def canonical_json(obj: Any) -> str:
    """The one JSON text of a record as the standard library writes it: sorted keys, UTF-8 characters as
    they are, no spaces (lead deliveries are named by it; conversation hashes before v2 were of it).

    Raises ValueError for a number JSON cannot write (NaN, infinities: ``1e400`` decodes to one),
    TypeError for a value that is not JSON, RecursionError for nesting deeper than Python's limit.
    """
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# The content hash names its algorithm: "v2" and 30 hex digits of SHA-256 over the record's canonical JSON
# as orjson writes it (sorted keys, no spaces; about ten times faster than the standard library, which was
# 15 % of a reading worker's time). A hash written before (32 hex digits, over :func:`canonical_json`) is
# compared by its own algorithm (:func:`same_content`), so upgrading rewrites nothing that did not change.
# orjson's text is part of the definition: 3.11.7 began writing 1e+16 where 3.11.6 wrote 1e16, so the
# dependency is pinned from 3.11.7 and a test holds orjson to the form (a change means a new version here).
HASH_VERSION = "v2"


def content_hash(canonical: bytes) -> str:
    """The fingerprint that tells an unchanged conversation from a changed one: of the stored form's
    canonical JSON (UTF-8 bytes, :attr:`Storable.canonical`), 32 characters."""
    return HASH_VERSION + hashlib.sha256(canonical).hexdigest()[:30]


def same_content(form: Storable, stored_hash: str) -> bool:
    """Whether ``stored_hash`` (a conversation's stored ``content_hash``) is the hash of ``form``, by the
    algorithm that wrote it: :func:`content_hash`, or for a hash written before v2, 32 hex digits of
    SHA-256 over :func:`canonical_json`."""
    if stored_hash.startswith(HASH_VERSION):
        return content_hash(form.canonical) == stored_hash
    return hashlib.sha256(canonical_json(form.record).encode()).hexdigest()[:32] == stored_hash


@dataclass(frozen=True)
class Storable:
    """A record in the form chatsync stores, its canonical JSON (UTF-8) and whether text had to be
    repaired."""

    record: Any
    canonical: bytes
    repaired: bool


def storable(raw: Any) -> Storable:
    """The record with text no database can hold (NUL, lone surrogates) replaced by U+FFFD.

    Everything else is kept exactly. Raises BadRecord when the record cannot be written as JSON at all
    (a non-finite or over-long number, nesting deeper than Python can follow).
    """
    text = _canonical(raw)
    if text is not None and b"\\u0000" not in text:
        return Storable(raw, text, False)
    repaired = _repair(raw)
    text = _canonical(repaired)
    if text is None:  # (cannot happen: the repair replaced every lone surrogate)
        raise BadRecord("holds text that cannot be written as UTF-8")
    return Storable(repaired, text, True)


def _canonical(obj: Any) -> bytes | None:
    """The record's canonical JSON as UTF-8: as orjson writes it with sorted keys, or where orjson cannot
    (integers beyond 64 bits, nesting deeper than 255 levels, lone surrogates) as the standard library
    does. None when it holds a lone surrogate (not UTF-8 at all); BadRecord when it is not JSON."""
    try:
        text: bytes | None = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # (orjson.JSONEncodeError is one)
        text = None
    # orjson writes NaN and the infinities as null: where a null appears, the standard library, which
    # refuses them, says whether one is a number after all.
    if text is None or b"null" in text:
        try:
            standard = canonical_json(obj)
        except RecursionError:
            raise BadRecord("nested too deeply to store") from None
        except ValueError:
            raise BadRecord("holds a number that is not finite (NaN, Infinity or beyond 1e308)") from None
        except TypeError:
            raise BadRecord("holds an integer too long to store exactly (over 4,300 digits)") from None
        if text is None:
            try:
                text = standard.encode()
            except UnicodeEncodeError:
                return None
    return text


def unstorable(text: str) -> bool:
    """Whether ``text`` holds a character no database keeps: NUL (PostgreSQL text and JSONB refuse it) or a
    lone UTF-16 surrogate (not UTF-8 at all)."""
    return _UNSTORABLE.search(text) is not None


def repaired_text(text: str) -> str:
    """``text`` with every character no database keeps (see :func:`unstorable`) replaced by U+FFFD."""
    return _UNSTORABLE.sub(REPLACEMENT_CHARACTER, text)


def _repair(value: Any) -> Any:
    if isinstance(value, str):
        return repaired_text(value)
    if isinstance(value, list):
        return [_repair(item) for item in value]
    if isinstance(value, dict):
        repaired = {_repair(key): _repair(item) for key, item in value.items()}
        if len(repaired) != len(value):
            raise BadRecord("two keys become the same once unstorable characters are replaced")
        return repaired
    return value


def normalize_conversation(raw: object, chatbot_id: str, rule: WhatsAppRule) -> dict[str, Any]:
    """Validate one raw conversation and compute its row; raises BadRecord with the reason otherwise.

    Text no database can hold is repaired first (see :func:`storable`), so the row stores the record
    exactly but for those characters.
    """
    if isinstance(raw, UndecodableRecord):
        raise BadRecord(raw.reason)
    if not isinstance(raw, dict):
        raise BadRecord("record is not a JSON object")
    conversation_id = raw.get("id")
    if isinstance(conversation_id, int) and not isinstance(conversation_id, bool):
        conversation_id = str(conversation_id)
    if not isinstance(conversation_id, str) or not conversation_id.strip():
        raise BadRecord("record has no id")
    if unstorable(conversation_id):
        raise BadRecord("id holds characters no database can store (NUL or half an emoji)")
    form = storable(raw)
    record: dict[str, Any] = form.record
    conversation_id = str(record["id"])
    if len(conversation_id) > MAX_ID_CHARS:
        raise BadRecord(f"id is {len(conversation_id):,} characters (limit {MAX_ID_CHARS})")
    messages = record.get("messages")
    if messages is None:
        messages = []
    if not isinstance(messages, list):
        raise BadRecord(f"messages is a {type(messages).__name__}, not a list")
    if len(messages) > MAX_MESSAGES:
        raise BadRecord(f"more than {MAX_MESSAGES} messages")
    try:
        created_at = parse_timestamp(record.get("created_at"))
    except (ValueError, OverflowError, OSError):
        raise BadRecord(f"unparsable created_at: {str(record.get('created_at'))[:40]!r}") from None
    last_value = record.get("last_message_at") or record.get("updated_at")
    last_message_at = None
    if last_value not in (None, ""):
        try:
            last_message_at = parse_timestamp(last_value)
        except (ValueError, OverflowError, OSError):
            raise BadRecord(f"unparsable last_message_at: {str(last_value)[:40]!r}") from None

    roles: list[str] = []
    times: list[datetime | None] = []
    contents: list[str] = []
    tools_only: list[bool] = []
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
        tools_only.append(tool_calls_only(message))

    figures = conversation_figures(roles, times, contents, tools_only)
    feedback = answer_feedback(messages, roles, tools_only)
    finding = find_whatsapp(messages, record, rule)
    rest = {k: v for k, v in record.items() if k != "messages"}
    return {
        "id": conversation_id,
        "chatbot_id": _chatbot_of(record.get("chatbot_id"), chatbot_id),
        "created_at": created_at,
        "last_message_at": last_message_at or max((t for t in times if t), default=None),
        "source": _short_text(source_name(record.get("source")), MAX_SOURCE_CHARS, "source"),
        "customer": customer_label(record.get("customer")),
        "country": _country(record.get("country")),
        "min_score": _score(record.get("min_score")),
        "status": _short_text(_text(record.get("status")), MAX_STATUS_CHARS, "status"),
        "title": _short_text(_text(record.get("title")), MAX_TITLE_CHARS, "title"),
        "chatbase_user_id": _short_text(
            _text(record.get("userId"), numbers=True), MAX_CHATBASE_USER_ID_CHARS, "userId"
        ),
        "messages": messages,
        "raw": rest,
        "content_hash": content_hash(form.canonical),
        "text_repaired": form.repaired,
        **figures,
        **feedback,
        "wa_outcome": finding.outcome,
        "wa_extracted": finding.extracted,
        "wa_form": finding.form,
        "wa_channel": finding.channel,
        "wa_matched": finding.matched,
        "wa_reasons": finding.reasons or None,
        "auto_number": finding.number,
        "auto_source": finding.source,
        "auto_region": region_of(finding.number) if finding.number else None,
    }


# What API v1 sends of a conversation and the v2 export does not: kept when v2 updates a v1 copy.
V1_ONLY_FIELDS = ("customer", "country", "form_submission")  # in v1's answer, not in the v2 export
V2_ONLY_FIELDS = ("title", "status", "userId")  # in the v2 export, not in v1's answer


def with_fields_kept(
    record: Mapping[str, Any], stored_raw: object, fields: tuple[str, ...]
) -> dict[str, Any] | None:
    """``record`` with those of ``fields`` that the stored copy of the same conversation has and it lacks,
    or None when there is nothing to keep.

    A chatbot synced through one API version and then the other so keeps what only the first sends:
    through v2 after v1 (:data:`V1_ONLY_FIELDS`), the user's country, the customer and the lead form;
    through v1 after v2 (:data:`V2_ONLY_FIELDS`), the title, the status and the WhatsApp sender's
    ``userId``. The other API saying nothing about them is not the same as their being gone.
    """
    if not isinstance(stored_raw, Mapping):
        return None
    kept = {k: stored_raw[k] for k in fields if k in stored_raw and k not in record}
    return {**record, **kept} if kept else None


def stored_id(raw: object) -> str | None:
    """The id a record is stored under (an integer id as text), or None when it has none that could be
    stored: none at all, one over 128 characters, or one holding characters no database keeps (replacing
    them would give two conversations one id)."""
    if not isinstance(raw, dict):
        return None
    value = raw.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or unstorable(value):
        return None
    return value if len(value) <= MAX_ID_CHARS else None


def _chatbot_of(value: object, requested: str) -> str:
    """The chatbot that was asked for. A record naming another one is a BadRecord: stored under the
    chatbot it names, it would be shown to whoever may see that one (the HTTP API grants by chatbot) and
    counted in its report, from a sync that never asked for it (a property test's record with
    ``"chatbot_id": 0`` was once stored as chatbot "0")."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and value.strip():
        if len(value) > MAX_ID_CHARS:
            raise BadRecord(f"chatbot_id is {len(value):,} characters (limit {MAX_ID_CHARS})")
        if value != requested:
            raise BadRecord(
                f"the record names chatbot {value[:40]!r}, not {requested!r} whose conversations were asked for"
            )
    return requested


def _short_text(value: str | None, limit: int, name: str) -> str | None:
    if value is not None and len(value) > limit:
        raise BadRecord(f"{name} is {len(value):,} characters (limit {limit})")
    return value


def _text(value: object, numbers: bool = False) -> str | None:
    """Text as sent, without surrounding spaces; an integer as its digits when ``numbers``; anything else
    (absent, null, empty, another type) is None, and the raw record keeps what was sent."""
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def _country(value: object) -> str | None:
    """Chatbase's country code in capitals; anything but a short text is no country."""
    if not isinstance(value, str) or not value.strip():
        return None
    return _short_text(value.strip().upper(), MAX_COUNTRY_CHARS, "country")


def _score(value: object) -> float | None:
    """``min_score`` as a float when it is a finite number, else None (the raw record keeps it)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        score = float(value)
    except OverflowError:
        return None
    return score if math.isfinite(score) else None


def source_name(value: object) -> str | None:
    """Chatbase's canonical spelling of a source (the OpenAPI lists lowercase variants); others as sent.

    Anything but non-empty text is no source (the raw record keeps what was sent)."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    return next((known for known in SOURCES if known.lower() == text.lower()), text)


def _role(value: object) -> str:
    role = str(value or "").strip().lower()
    if role in ASSISTANT_ROLES:
        return "assistant"
    if role in USER_ROLES:
        return "user"
    return role or "unknown"


TOOL_PART_TYPES = frozenset({"tool-call", "tool-result"})


def tool_calls_only(message: Mapping[str, Any]) -> bool:
    """Whether an API v2 message holds only tool calls: its ``content`` is empty and its ``parts`` include
    a ``tool-call`` or ``tool-result``. Such an assistant message is the bot at work, not a reply."""
    content = message.get("content")
    parts = message.get("parts")
    if (isinstance(content, str) and content.strip()) or not isinstance(parts, list):
        return False
    return any(isinstance(part, dict) and part.get("type") in TOOL_PART_TYPES for part in parts)


def conversation_figures(
    roles: list[str],
    times: list[datetime | None],
    contents: list[str],
    tools_only: list[bool] | None = None,
) -> dict[str, Any]:
    """Per-conversation numbers the report sums: counts by role, response times, whether it was left asking.

    ``roles``, ``times`` and ``contents`` hold one entry per message (``tools_only``, when given, too).
    Every message counts in the message counts; the user→assistant steps that response times are
    measured on, and the question the user was left with, skip assistant messages that hold only tool
    calls: the next assistant message with text answers. Times are seconds rounded to the millisecond.
    """
    shown = [i for i in range(len(roles)) if not (tools_only and tools_only[i] and roles[i] == "assistant")]
    response_seconds: list[float] = []
    first_response: float | None = None
    steps = 0
    first_step_seen = False
    for i, j in itertools.pairwise(shown):
        if roles[i] == "user" and roles[j] == "assistant":
            steps += 1
            asked, answered = times[i], times[j]
            timed = asked is not None and answered is not None
            if timed:
                seconds = round(max(0.0, (answered - asked).total_seconds()), 3)  # type: ignore[operator]
                response_seconds.append(seconds)
            if not first_step_seen:
                first_step_seen = True
                first_response = response_seconds[-1] if timed else None
    last = shown[-1] if shown else None
    last_asks = (
        last is not None and roles[last] == "assistant" and contents[last].rstrip().endswith(("?", "？"))
    )
    return {
        "message_count": len(roles),
        "user_messages": sum(1 for r in roles if r == "user"),
        "assistant_messages": sum(1 for r in roles if r == "assistant"),
        "response_steps": steps,
        "response_seconds": response_seconds or None,
        "first_response_seconds": first_response,
        "unanswered": last_asks,
    }


# The thumbs a user gives an answer, as the API v2 export sends it on assistant messages (null: not rated).
FEEDBACK_VALUES = frozenset({"positive", "negative", None})


def answer_feedback(
    messages: list[dict[str, Any]], roles: list[str], tools_only: list[bool]
) -> dict[str, int | None]:
    """How the user rated the conversation's answers: ``answers_feedback_known`` (answers whose record
    carries ``feedback``: ``"positive"``, ``"negative"`` or null for not rated), ``answers_rated_up`` and
    ``answers_rated_down``. An answer is an assistant message that is not tool calls only.

    All three are None when no answer carries feedback (API v1 sends none): the data cannot say, which
    is not the same as nobody rating anything. A value other than those three is not feedback chatsync
    knows and counts as not carried (the raw record keeps it).
    """
    known = up = down = 0
    for message, role, tools in zip(messages, roles, tools_only, strict=True):
        if role != "assistant" or tools or "feedback" not in message:
            continue
        rating = message["feedback"]
        if isinstance(rating, str | None) and rating in FEEDBACK_VALUES:
            known += 1
            up += rating == "positive"
            down += rating == "negative"
    if not known:
        return {"answers_feedback_known": None, "answers_rated_up": None, "answers_rated_down": None}
    return {"answers_feedback_known": known, "answers_rated_up": up, "answers_rated_down": down}


def transcript(messages: list[Any]) -> list[dict[str, Any]]:
    """Stored raw messages as ``show`` prints them: role, content, the time where Chatbase sent one, and
    from API v2 the user's rating (``feedback``: ``positive``, ``negative``, else None) and the names of the
    tools the bot called (``tools``, from the message's ``tool-call`` parts; empty for anything else)."""
    out = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        try:
            moment = _message_time(message, position)
        except BadRecord:
            moment = None
        content = message.get("content")
        rating = message.get("feedback")
        parts = message.get("parts")
        tools = [
            str(part.get("toolName") or "tool")
            for part in (parts if isinstance(parts, list) else [])
            if isinstance(part, dict) and part.get("type") == "tool-call"
        ]
        out.append(
            {
                "role": _role(message.get("role")),
                "content": content if isinstance(content, str) else "",
                "created_at": iso_z(moment),
                "feedback": rating if rating in ("positive", "negative") else None,
                "tools": tools,
            }
        )
    return out
