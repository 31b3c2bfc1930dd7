"""A v2 export record in the record shape chatsync reads: nothing lost, text parts as content."""

from __future__ import annotations

from typing import Any

import pytest

from chatsync.chatbase_records import message_text, record_from_export
from chatsync.config import WhatsAppRule
from chatsync.errors import BadRecord
from chatsync.normalize import normalize_conversation


def _record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": "c-1",
        "title": "Booking",
        "createdAt": 1714557600.5,  # 2024-05-01T10:00:00.500Z
        "updatedAt": 1714557900,
        "userId": "+6581234567",
        "source": "WhatsApp",
        "status": "taken_over",
        "futureField": {"kept": True},
        "messages": [
            {
                "id": "m1",
                "role": "assistant",
                "parts": [{"type": "text", "text": "May I have your WhatsApp number?"}],
                "createdAt": 1714557601,
                "feedback": None,
                "metadata": {"score": 0.8},
            },
            {
                "id": "m2",
                "role": "user",
                "parts": [{"type": "text", "text": "9123 4567"}],
                "createdAt": 1714557650,
            },
            {
                "id": "m3",
                "role": "assistant",
                "parts": [
                    {"type": "tool-call", "toolCallId": "t1", "toolName": "book"},
                    {"type": "tool-result", "toolCallId": "t1", "toolName": "book", "output": {"ok": True}},
                    {"type": "text", "text": "Booked."},
                    {"type": "text", "text": "See you Saturday!"},
                ],
                "createdAt": 1714557654.25,
                "feedback": "positive",
                "metadata": {"score": 0.95},
            },
            {
                "id": "m4",
                "role": "assistant",
                "parts": [{"type": "tool-call", "toolCallId": "t2", "toolName": "log"}],
            },
        ],
    }
    record.update(changes)
    return record


def test_every_export_field_is_kept_and_times_are_added_as_iso() -> None:
    source = _record()
    mapped = record_from_export(source)
    assert isinstance(mapped, dict)
    for key, value in source.items():
        if key != "messages":
            assert mapped[key] == value
    assert mapped["created_at"] == "2024-05-01T10:00:00.500Z"
    assert mapped["updated_at"] == "2024-05-01T10:05:00Z"
    assert mapped["last_message_at"] == "2024-05-01T10:00:54.250Z"  # the latest message time


def test_text_parts_become_content_and_tool_parts_stay_in_parts() -> None:
    mapped = record_from_export(_record())
    assert isinstance(mapped, dict)
    first, reply, booked, tool_only = mapped["messages"]
    assert booked["content"] == "Booked.\nSee you Saturday!"
    assert booked["parts"] == _record()["messages"][2]["parts"]
    assert tool_only["content"] == ""
    assert (booked["createdAt"], booked["feedback"], booked["score"]) == (1714557654.25, "positive", 0.95)
    assert reply == {**_record()["messages"][1], "content": "9123 4567"}  # no score on a user message
    assert first["score"] == 0.8


def test_a_record_without_message_times_takes_its_last_time_from_updated_at() -> None:
    untimed = [{"id": "m", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]
    mapped = record_from_export(_record(messages=untimed))
    assert isinstance(mapped, dict) and "last_message_at" not in mapped
    row = normalize_conversation(mapped, "bot", WhatsAppRule())
    assert row["last_message_at"].isoformat() == "2024-05-01T10:05:00+00:00"


def test_a_summary_record_has_no_messages() -> None:
    summary = {k: v for k, v in _record().items() if k != "messages"}
    mapped = record_from_export(summary)
    assert isinstance(mapped, dict) and "messages" not in mapped and "last_message_at" not in mapped


def test_a_mapped_record_normalises_with_response_times_from_message_times() -> None:
    row = normalize_conversation(record_from_export(_record()), "bot", WhatsAppRule())
    assert row["created_at"].isoformat() == "2024-05-01T10:00:00.500000+00:00"
    assert row["message_count"] == 4 and row["source"] == "WhatsApp"
    assert row["wa_extracted"] == "+85291234567"  # the number typed after the prompt, read from content
    assert row["response_seconds"] == [4.25]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (_record(createdAt="yesterday-ish"), "unparsable created_at"),
        (_record(createdAt=float("inf")), "not finite"),
        (_record(messages={"role": "user"}), "not a list"),
        ({k: v for k, v in _record().items() if k != "id"}, "no id"),
        (["not", "an", "object"], "not a JSON object"),
    ],
    ids=["text-date", "infinite-date", "messages-object", "no-id", "list"],
)
def test_unusable_values_are_passed_on_for_normalisation_to_quarantine(record: object, reason: str) -> None:
    with pytest.raises(BadRecord, match=reason):
        normalize_conversation(record_from_export(record), "bot", WhatsAppRule())


def test_message_text_ignores_parts_it_cannot_read() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text"}, "junk", {"type": "reasoning", "text": "x"}]
    assert message_text(parts) == "a"
