"""Raw Chatbase records → rows: what is refused, and the per-conversation figures."""

from __future__ import annotations

import hashlib
import json

import orjson
import pytest

from chatsync.config import WhatsAppRule
from chatsync.errors import BadRecord
from chatsync.normalize import (
    customer_label,
    normalize_conversation,
    same_content,
    storable,
    transcript,
)


def _raw(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"id": "c1", "created_at": "2024-05-01T08:00:00Z", "messages": []}
    base.update(fields)
    return base


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ("not an object", "not a JSON object"),
        ({"created_at": "2024-05-01T08:00:00Z", "messages": []}, "no id"),
        (_raw(messages={"role": "user"}), "not a list"),
        (_raw(id="x" * 129), "id is 129 characters"),
        (_raw(source="s" * 65), "source is 65 characters"),
        (_raw(chatbot_id="b" * 129), "chatbot_id is 129 characters"),
        (_raw(chatbot_id="other-bot"), "the record names chatbot 'other-bot', not 'bot'"),
        (_raw(chatbot_id=0), "the record names chatbot '0', not 'bot'"),
        (_raw(status="s" * 33), "status is 33 characters"),
        (_raw(title="t" * 1001), "title is 1,001 characters"),
        (_raw(userId="u" * 257), "userId is 257 characters"),
        (_raw(extra=float("inf")), "not finite"),
        (_raw(extra=float("nan")), "not finite"),
        (_raw(messages=[{"role": "user", "content": "x" * 1_048_576}]), r"characters \(limit"),
        (_raw(created_at="soon"), "unparsable created_at"),
        (_raw(last_message_at="later"), "unparsable last_message_at"),
        (_raw(messages=[{"role": "user", "content": "hi", "createdAt": "nope"}]), "unparsable createdAt"),
        (_raw(messages=["hi"]), "message 0 is not an object"),
    ],
)
def test_records_that_cannot_be_stored_say_why(record: object, reason: str) -> None:
    with pytest.raises(BadRecord, match=reason):
        normalize_conversation(record, "bot", WhatsAppRule())


def test_figures_count_roles_response_times_and_unanswered_questions() -> None:
    messages = [
        {"role": "user", "content": "hi", "createdAt": "2024-05-01T08:00:00Z"},
        {"role": "assistant", "content": "hello", "createdAt": "2024-05-01T08:00:02Z"},
        {"role": "user", "content": "price?", "created_at": "2024-05-01T08:01:00Z"},
        {"role": "assistant", "content": "HK$680"},
        {"role": "user", "content": "ok", "createdAt": "2024-05-01T08:02:00Z"},
        {"role": "assistant", "content": "Anything else？", "createdAt": "2024-05-01T08:02:05.5Z"},
    ]
    row = normalize_conversation(_raw(messages=messages), "bot", WhatsAppRule())
    assert (row["message_count"], row["user_messages"], row["assistant_messages"]) == (6, 3, 3)
    assert row["response_steps"] == 3
    assert row["response_seconds"] == [2.0, 5.5]  # the untimed step is not guessed
    assert row["first_response_seconds"] == 2.0
    assert row["unanswered"] is True
    assert row["last_message_at"].isoformat() == "2024-05-01T08:02:05.500000+00:00"
    assert row["chatbot_id"] == "bot"


def test_a_record_is_stored_under_the_chatbot_asked_for() -> None:
    for same in ("bot", None, "", "  "):  # naming the chatbot asked for, or none: stored under it
        assert normalize_conversation(_raw(chatbot_id=same), "bot", WhatsAppRule())["chatbot_id"] == "bot"
    assert normalize_conversation(_raw(chatbot_id=123), "123", WhatsAppRule())["chatbot_id"] == "123"


def test_unknown_fields_are_kept_and_the_hash_tracks_content() -> None:
    first = normalize_conversation(_raw(brand_new_field={"x": 1}), "bot", WhatsAppRule())
    second = normalize_conversation(_raw(brand_new_field={"x": 2}), "bot", WhatsAppRule())
    assert first["raw"]["brand_new_field"] == {"x": 1}
    assert first["content_hash"] != second["content_hash"]


def test_the_content_hash_is_versioned_and_stable_for_what_orjson_cannot_write() -> None:
    rule = WhatsAppRule()
    row = normalize_conversation(_raw(score=0.00001), "bot", rule)
    assert row["content_hash"].startswith("v2") and len(row["content_hash"]) == 32
    assert normalize_conversation(_raw(score=0.00001), "bot", rule)["content_hash"] == row["content_hash"]
    # Integers beyond 64 bits are hashed through the standard library: still one hash per content.
    big = normalize_conversation(_raw(extra=2**70), "bot", rule)["content_hash"]
    assert big == normalize_conversation(_raw(extra=2**70), "bot", rule)["content_hash"]
    assert big != normalize_conversation(_raw(extra=2**70 + 1), "bot", rule)["content_hash"]
    form = storable(_raw(score=0.00001))
    assert same_content(form, row["content_hash"])
    # A hash written before v2: the standard library's compact sorted JSON, SHA-256, 32 hex digits.
    text = json.dumps(_raw(score=0.00001), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    legacy = hashlib.sha256(text.encode()).hexdigest()[:32]
    assert same_content(form, legacy)
    assert not same_content(storable(_raw(score=0.00002)), legacy)
    assert not same_content(storable(_raw(score=0.00002)), row["content_hash"])


def test_orjson_writes_the_form_the_v2_hash_is_defined_on() -> None:
    """The v2 content hash is of orjson's text. An orjson that wrote these differently (3.11.6 wrote 1e16)
    would make stored hashes stale: rewrites and announced changes for content that did not change. If
    this fails after an upgrade, the hash needs a new version (chatsync.normalize.HASH_VERSION)."""
    values = [1e16, 1e-05, 0.1, 1.5e300, -0.0, 123.0, 2**64 - 1, -(2**63), "é😀\u2028\x7f\x00\n"]
    assert orjson.dumps({"b": values, "a": None}, option=orjson.OPT_SORT_KEYS) == (
        b'{"a":null,"b":[1e+16,0.00001,0.1,1.5e+300,-0.0,123.0,18446744073709551615,'
        b'-9223372036854775808,"\xc3\xa9\xf0\x9f\x98\x80\xe2\x80\xa8\x7f\\u0000\\n"]}'
    )
    nested: object = 1
    for _ in range(254):
        nested = [nested]
    orjson.dumps(nested)
    # What orjson refuses is hashed through the standard library instead.
    for refused in (2**64, -(2**63) - 1, [nested], "\ud800"):
        with pytest.raises(TypeError):
            orjson.dumps(refused)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_number_that_is_not_finite_is_refused_beside_nulls_and_without_them(value: float) -> None:
    # (orjson writes these as null; the standard library says which null was one)
    for record in (_raw(extra=value), _raw(extra=[None, value], other=None), _raw(note="null", x=value)):
        with pytest.raises(BadRecord, match="not finite"):
            normalize_conversation(record, "bot", WhatsAppRule())
    assert normalize_conversation(_raw(extra=None), "bot", WhatsAppRule())["raw"]["extra"] is None


def test_lone_surrogates_and_nul_are_repaired_and_hashed_as_repaired() -> None:
    damaged = normalize_conversation(_raw(note="a\ud83d b\x00"), "bot", WhatsAppRule())
    clean = normalize_conversation(_raw(note="a\ufffd b\ufffd"), "bot", WhatsAppRule())
    assert damaged["text_repaired"] and not clean["text_repaired"]
    assert damaged["raw"]["note"] == "a\ufffd b\ufffd"
    assert damaged["content_hash"] == clean["content_hash"]


def test_customer_label_rules() -> None:
    assert customer_label(" cust_1 ") == "cust_1"
    assert customer_label({"name": "A", "email": ""}) == "A"
    assert customer_label({"id": 7}) == "7"
    assert customer_label("") is None and customer_label({}) is None and customer_label(None) is None


def test_transcript_keeps_times_where_chatbase_sent_them() -> None:
    out = transcript([{"role": "user", "content": "hi", "createdAt": 1714550400}, {"role": "assistant"}])
    assert out == [
        {
            "role": "user",
            "content": "hi",
            "created_at": "2024-05-01T08:00:00Z",
            "feedback": None,
            "tools": [],
        },
        {"role": "assistant", "content": "", "created_at": None, "feedback": None, "tools": []},
    ]


def test_a_record_whose_id_is_not_text_is_quarantined_not_crashed_on(engine: object) -> None:
    from datetime import UTC, datetime

    import httpx
    from sqlalchemy import select

    from chatsync.chatbase import ChatbaseClient
    from chatsync.config import Secret
    from chatsync.store.tables import quarantine
    from chatsync.sync import Syncer, SyncRequest

    today = datetime.now(UTC).date()
    odd = {"id": ["not", "text"], "created_at": datetime.now(UTC).isoformat(), "messages": []}
    good = {"id": "c-1", "created_at": datetime.now(UTC).isoformat(), "messages": []}
    body = json.dumps({"data": [odd, good]}).encode()

    def answer(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        return httpx.Response(200, content=body if page == 1 else b'{"data": []}')

    client = ChatbaseClient(Secret("k"), "http://chatbase.test/api/v1", transport=httpx.MockTransport(answer))
    with client:
        summary = Syncer(engine, client, WhatsAppRule()).run(  # type: ignore[arg-type]
            SyncRequest(("bot",), since=today, until=today)
        )
    assert (summary.status, summary.inserted, summary.quarantined) == ("ok", 1, 1)
    with engine.connect() as connection:  # type: ignore[attr-defined]
        reasons = list(connection.execute(select(quarantine.c.reason)).scalars())
    assert reasons == ["record has no id"]


def test_invisible_characters_in_the_reply_and_the_form_phone_are_ignored() -> None:
    prompt = {"role": "assistant", "content": "May I have your WhatsApp number?"}
    chat = _raw(messages=[prompt, {"role": "user", "content": "+65\ufe0d 9123 4567"}])
    row = normalize_conversation(chat, "bot", WhatsAppRule())
    assert (row["wa_outcome"], row["wa_extracted"], row["auto_region"]) == ("captured", "+6591234567", "SG")
    assert row["wa_matched"] == "+65\ufe0d 9123 4567"
    form = _raw(form_submission={"phone": "\u202a+65\u200b8123\u00ad4567\u202c"})
    row = normalize_conversation(form, "bot", WhatsAppRule())
    assert (row["auto_number"], row["auto_source"], row["auto_region"]) == ("+6581234567", "form", "SG")


def test_v2_status_title_and_user_id_are_text_or_nothing_and_only_known_feedback_counts() -> None:
    messages = [
        {"role": "assistant", "content": "hi", "feedback": "positive"},
        {"role": "assistant", "content": "and?", "feedback": "thumbs_up"},  # not a value Chatbase documents
        {"role": "assistant", "content": "ok", "feedback": None},
        {"role": "user", "content": "fine", "feedback": "negative"},  # users' messages are not rated
    ]
    row = normalize_conversation(
        _raw(status=3, title="  ", userId=12345, messages=messages), "bot", WhatsAppRule()
    )
    assert (row["status"], row["title"], row["chatbase_user_id"]) == (None, None, "12345")
    assert (row["answers_feedback_known"], row["answers_rated_up"], row["answers_rated_down"]) == (2, 1, 0)
    v1 = normalize_conversation(
        _raw(messages=[{"role": "assistant", "content": "hi"}]), "bot", WhatsAppRule()
    )
    assert (v1["answers_feedback_known"], v1["answers_rated_up"], v1["answers_rated_down"]) == (None,) * 3
