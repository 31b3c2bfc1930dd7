"""Chatbase API v2 export records in the record shape the rest of chatsync reads (v1's). No I/O."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from chatsync.timeutil import iso_z, parse_timestamp


def record_from_export(record: object) -> object:
    """One raw ``ExportConversation`` as a v1-shaped conversation record; nothing of it is dropped.

    The mapping, exactly:

    * Every key of the export record is kept as sent: ``id``, ``title``, ``createdAt`` and ``updatedAt``
      (epoch seconds), ``userId``, ``source``, ``status`` and any key chatsync does not know yet.
    * ``created_at`` is ``createdAt`` as UTC ISO 8601 with ``Z`` (milliseconds when it has them).
    * ``updated_at`` is ``updatedAt`` likewise: the most recent activity, which can be a status change.
    * ``last_message_at`` is the latest message ``createdAt`` likewise; absent when no message has one
      (readers then fall back to ``updated_at``).
    * ``messages``: each message keeps every key (``id``, ``role``, ``parts``, ``createdAt`` in epoch
      seconds, ``feedback``, ``metadata``) and gains ``content``, the ``text`` of its ``text`` parts
      joined with a newline (``""`` for a message of tool calls only: ``tool-call``/``tool-result``
      parts stay in ``parts`` and add nothing to ``content``), and ``score``, ``metadata.score`` when
      the message has one. A message that is not an object, or whose ``parts`` is not a list, is kept
      unchanged. With ``include=summary`` the export sends no messages and the result has no
      ``messages`` key.

    A timestamp that is not a number (or is out of range) is copied unconverted into ``created_at`` /
    ``updated_at``, so normalisation quarantines the record with the reason instead of storing a guess.
    Anything that is not a JSON object is returned unchanged for the same reason.
    """
    if not isinstance(record, dict):
        return record
    out: dict[str, Any] = dict(record)
    if "createdAt" in record:
        out["created_at"] = _iso_or_as_sent(record["createdAt"])
    if "updatedAt" in record:
        out["updated_at"] = _iso_or_as_sent(record["updatedAt"])
    messages = record.get("messages")
    if isinstance(messages, list):
        out["messages"] = [_message(m) for m in messages]
        times = [t for t in (_moment(m.get("createdAt")) for m in messages if isinstance(m, dict)) if t]
        if times:
            out["last_message_at"] = iso_z(max(times))
    return out


def message_text(parts: list[Any]) -> str:
    """The text of a message's ``text`` parts, joined with a newline; tool parts carry no text."""
    return "\n".join(
        part["text"]
        for part in parts
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    )


def _message(message: object) -> object:
    if not isinstance(message, dict) or not isinstance(message.get("parts"), list):
        return message
    out = dict(message)
    out["content"] = message_text(message["parts"])
    metadata = message.get("metadata")
    if isinstance(metadata, dict) and "score" in metadata:
        out["score"] = metadata["score"]
    return out


def _moment(value: object) -> datetime | None:
    """A number of epoch seconds as an aware UTC moment; None for anything else."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return None
    try:
        return parse_timestamp(value)
    except (ValueError, OverflowError, OSError):
        return None


def _iso_or_as_sent(value: object) -> object:
    moment = _moment(value)
    return iso_z(moment) if moment else value
