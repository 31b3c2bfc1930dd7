"""Decoding what Chatbase sends, so that one unreadable record never makes a whole page unreadable.

No I/O here. The values below stand in for parts of a page Python cannot decode as they are; the sync
engine quarantines the records holding them and stores the rest of the page.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any


class UnreadableNumber:
    """A JSON number Python does not turn into an int by default (over 4,300 digits); kept as its text.

    Its record cannot be stored exactly, so normalising quarantines it; the rest of the page is unaffected.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


@dataclass(frozen=True)
class UndecodableRecord:
    """An item of a page's ``data`` that could not be decoded on its own (nested deeper than Python's
    JSON decoder follows); ``text`` is the start of its JSON text, kept for the quarantine."""

    text: str
    reason: str
    id: str | None = None  # the record's top-level "id", when it could be found in the text


_MAX_KEPT_CHARS = 20_000
# JSON strings (with their escapes) and the punctuation that gives structure; everything else is skipped.
_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},:]')


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond what a float holds")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise ValueError("an object names the same key twice")
    return value


def strict_json(body: bytes) -> Any:
    """A request body as standard JSON (RFC 8259), for webhooks: UTF-8 without a byte order mark, each key
    once per object, no ``NaN``, ``Infinity`` or number beyond 1e308 (values no database stores, or that
    two readers could read differently). Raises ValueError (which ``json.JSONDecodeError`` and
    ``UnicodeDecodeError`` are) or RecursionError when it is not."""
    text = body.decode("utf-8")  # (json.loads would also take UTF-16 and UTF-32)
    if text.startswith("\ufeff"):
        raise ValueError("a JSON body starts with no byte order mark")
    return json.loads(
        text, parse_constant=_refuse_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
    )


def decode_body(body: bytes) -> Any:
    """A response body as JSON, so that one unreadable record never makes the whole page unreadable.

    Bytes that are not UTF-8 become U+FFFD. Raises ValueError (``json.JSONDecodeError``) when the body is
    not JSON at all (a truncated answer: worth retrying). When Python's decoder refuses part of a valid
    body (nesting deeper than its recursion limit, an integer over 4,300 digits), the items of the
    top-level ``data`` array are decoded one by one: over-long integers become :class:`UnreadableNumber`
    and an item that still cannot be decoded becomes an :class:`UndecodableRecord`.
    """
    text = body.decode("utf-8-sig", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (RecursionError, ValueError):
        pass
    decoded = _decode_items_one_by_one(text)
    if decoded is None:
        raise json.JSONDecodeError("a body chatsync cannot decode", text[:80], 0)
    return decoded


def read_body(body: bytes) -> Any:
    """A response body decoded fast (orjson), for paging decisions: how many records, their ids, their days.

    Integers beyond 64 bits may come back as floats, so what is stored is decoded with :func:`decode_body`.
    A body orjson refuses (NaN, a byte order mark, lone surrogates, deep nesting, bytes that are not
    UTF-8) is decoded by :func:`decode_body`, which raises ValueError when it is not JSON at all.
    """
    import orjson

    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return decode_body(body)


def _decode_item(text: str) -> Any:
    try:
        return json.loads(text, parse_int=int_or_unreadable)
    except RecursionError:
        return UndecodableRecord(
            text.strip()[:_MAX_KEPT_CHARS], "nested too deeply to read", _top_level_id(text)
        )


_SCALAR = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(-?\d+)(?![.eE\d]))')


def _top_level_id(text: str) -> str | None:
    """The ``"id"`` of an object's text, read without decoding the object (a string or an integer)."""
    depth = 0
    key: str | None = None
    for match in _STRUCTURE.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
        elif depth == 1 and token.startswith('"'):
            key = token
        elif depth == 1 and token == ":" and key == '"id"':
            value = _SCALAR.match(text, match.end())
            if value is None:
                return None
            return str(json.loads(value.group(1))) if value.group(1) else value.group(2)
        if depth == 0:
            return None
    return None


def int_or_unreadable(digits: str) -> int | UnreadableNumber:
    """A JSON integer as an int, or as :class:`UnreadableNumber` past Python's 4,300-digit limit."""
    try:
        return int(digits)
    except ValueError:
        return UnreadableNumber(digits)


def _decode_items_one_by_one(text: str) -> Any:
    """Decode ``{"data": [item, …], …}`` with each item decoded alone; None when the body is not that.

    The items are found by scanning strings and brackets, which needs no recursion however deep they are.
    """
    depth = 0
    key: str | None = None
    after_colon = False
    array_start = array_end = -1
    item_start = -1
    items: list[tuple[int, int]] = []
    for match in _STRUCTURE.finditer(text):
        token = match.group()
        if array_start < 0:
            if depth == 1 and token.startswith('"'):
                key = token
            elif depth == 1 and token == ":":
                after_colon = True
                continue
            elif token == "[" and depth == 1 and after_colon and key == '"data"':
                array_start, item_start = match.start(), match.end()
                depth += 1
                continue
            after_colon = False
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if array_start >= 0 and array_end < 0 and depth == 1:
                if text[item_start : match.start()].strip():
                    items.append((item_start, match.start()))
                array_end = match.end()
        elif token == "," and array_start >= 0 and array_end < 0 and depth == 2:
            items.append((item_start, match.start()))
            item_start = match.end()
    if array_start < 0 or array_end < 0:
        return None
    try:
        outer = json.loads(text[: array_start + 1] + text[array_end - 1 :], parse_int=int_or_unreadable)
    except (RecursionError, ValueError):
        return None
    if not isinstance(outer, dict) or outer.get("data") != []:
        return None
    outer["data"] = [_decode_item(text[start:end]) for start, end in items]
    return outer
