"""The emulator's API v2 endpoints: ``GET /agents`` and ``GET /agents/{agentId}/conversations/export``.

As Chatbase's v2 OpenAPI states them: cursor paging (an opaque base64 keyset cursor on the conversation's
creation time and id, newest first), ``limit`` 1–20 (default 20) on the export and 1–100 on agents,
``pagination: {cursor, hasMore, total}``, ``startDate``/``endDate`` as a ``YYYY-MM-DD`` UTC day or an ISO
date-time (an inverted window is 400 ``VALIDATION_INVALID_DATE_RANGE``), ``source`` comma-separated,
``conversationId`` and ``include=summary|messages``. Every other filter still applies with
``conversationId``; a conversation without a source counts as ``Unspecified`` for ``source``.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from chatsync.emulator.data import Dataset
from chatsync.emulator.replies import Reply, json_reply, v2_error

if TYPE_CHECKING:
    from chatsync.emulator.server import Emulator

EXPORT_LIMIT = 20
AGENTS_LIMIT = 100


class _Invalid(Exception):
    """A query parameter the API refuses: 400 with ``details`` naming it."""

    def __init__(self, field: str, problem: str, code: str | None = None, message: str | None = None) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem
        self.code = code
        self.message = message

    def reply(self) -> Reply:
        return v2_error(400, self.code, self.message, {self.field: self.problem})


def export_conversations(emulator: Emulator, agent_id: str, params: dict[str, str]) -> Reply:
    """One page of ``GET /agents/{agentId}/conversations/export``."""
    dataset = emulator.datasets.get(agent_id)
    if dataset is None:
        return v2_error(404)
    try:
        limit = _limit(params.get("limit"), EXPORT_LIMIT)
        include = params.get("include") or "messages"
        if include not in ("messages", "summary"):
            raise _Invalid("include", "Expected 'summary' or 'messages'")
        start = _instant(params.get("startDate"), "startDate", end_of_day=False)
        end = _instant(params.get("endDate"), "endDate", end_of_day=True)
        if start is not None and end is not None and start > end:
            raise _Invalid(
                "startDate",
                "startDate must not be after endDate",
                "VALIDATION_INVALID_DATE_RANGE",
                "startDate must not be after endDate",
            )
        lo = _first_created_at_or_after(dataset, start) if start is not None else 0
        hi = _first_created_after(dataset, end) if end is not None else dataset.count
        before = _cursor_index(dataset, params.get("cursor"))
    except _Invalid as invalid:
        return invalid.reply()

    wanted = {s.strip() for s in params.get("source", "").split(",") if s.strip()} or None
    only = params.get("conversationId")
    candidates: Sequence[int]
    if only is not None:
        index = dataset.index_of(only)
        candidates = [index] if index is not None and lo <= index < hi else []
    else:
        candidates = range(lo, hi)
    if wanted is not None:
        sources = dataset.sources()
        candidates = [i for i in candidates if (sources[i] or "Unspecified") in wanted]
    total = len(candidates)
    # newest first: the indexes older than the cursor, from the newest down
    position = total if before is None else bisect.bisect_left(candidates, before)
    page = [candidates[i] for i in range(position - 1, max(position - limit, 0) - 1, -1)]
    has_more = position - len(page) > 0
    data = []
    for index in page:
        record = emulator.export_record(agent_id, index)
        if include == "summary":
            record.pop("messages", None)
        data.append(record)
    cursor = _cursor(dataset, page[-1]) if has_more and page else None
    body = {"data": data, "pagination": {"cursor": cursor, "hasMore": has_more, "total": total}}
    return json_reply(200, body)


def list_agents(emulator: Emulator, params: dict[str, str]) -> Reply:
    """One page of ``GET /agents``: the chatbots the emulator serves, in the order they were given."""
    try:
        limit = _limit(params.get("limit"), AGENTS_LIMIT)
        offset = 0
        if params.get("cursor"):
            agent_id = _decode(params["cursor"]).get("id")
            ids = list(emulator.datasets)
            if agent_id not in ids:
                raise _Invalid("cursor", "Invalid cursor")
            offset = ids.index(agent_id) + 1
    except _Invalid as invalid:
        return invalid.reply()
    agents = list(emulator.datasets.values())
    page = agents[offset : offset + limit]
    has_more = offset + len(page) < len(agents)
    cursor = _encode({"id": page[-1].chatbot_id}) if has_more and page else None
    data = [_agent(emulator, dataset) for dataset in page]
    return json_reply(
        200, {"data": data, "pagination": {"cursor": cursor, "hasMore": has_more, "total": len(agents)}}
    )


def _agent(emulator: Emulator, dataset: Dataset) -> dict[str, Any]:
    start = dataset.end - timedelta(days=dataset.days)
    return {
        "id": dataset.chatbot_id,
        "name": emulator.chatbot_name(dataset.chatbot_id),
        "status": "trained",
        "createdAt": (start - timedelta(days=1)).isoformat().replace("+00:00", "Z"),
        "lastMessageAt": dataset.created_iso(dataset.count - 1) if dataset.count else None,
        "lastTrainedAt": start.isoformat().replace("+00:00", "Z"),
        "visibility": "private",
        "creditsUsed": dataset.count,
    }


# ------------------------------------------------------------------------------------------------ parameters
def _limit(text: str | None, maximum: int) -> int:
    if text is None or text == "":
        return 20
    try:
        value = int(text)
    except ValueError:
        raise _Invalid("limit", "Expected an integer") from None
    if not 1 <= value <= maximum:
        raise _Invalid("limit", f"Number must be between 1 and {maximum}")
    return value


def _instant(text: str | None, field: str, *, end_of_day: bool) -> float | None:
    """Epoch seconds of a ``YYYY-MM-DD`` (start, or with ``end_of_day`` the last millisecond, of that UTC
    day) or of an ISO 8601 date-time (UTC when it names no offset)."""
    if not text:
        return None
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
            if end_of_day:
                moment += timedelta(days=1, milliseconds=-1)
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise _Invalid(field, "Expected YYYY-MM-DD or an ISO 8601 date-time") from None
    return moment.timestamp()


def _first_created_at_or_after(dataset: Dataset, ts: float) -> int:
    return bisect.bisect_left(range(dataset.count), ts, key=dataset.export_created_at)


def _first_created_after(dataset: Dataset, ts: float) -> int:
    return bisect.bisect_right(range(dataset.count), ts, key=dataset.export_created_at)


# ------------------------------------------------------------------------------------------------ cursors
def _encode(payload: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()


def _decode(cursor: str) -> dict[str, Any]:
    try:
        payload = json.loads(base64.b64decode(cursor, validate=True))
    except (binascii.Error, ValueError):
        raise _Invalid("cursor", "Invalid cursor") from None
    if not isinstance(payload, dict):
        raise _Invalid("cursor", "Invalid cursor")
    return payload


def _cursor(dataset: Dataset, index: int) -> str:
    """The keyset of the page's last (oldest) conversation: ``{"t": its creation time, "id": its id}``."""
    return _encode({"t": dataset.created_iso(index), "id": dataset.conversation_id(index)})


def _cursor_index(dataset: Dataset, cursor: str | None) -> int | None:
    """The index of the conversation a cursor points at; the next page holds the ones created before it."""
    if not cursor:
        return None
    payload = _decode(cursor)
    conversation_id = payload.get("id")
    index = dataset.index_of(conversation_id) if isinstance(conversation_id, str) else None
    if index is None or payload.get("t") != dataset.created_iso(index):
        raise _Invalid("cursor", "Invalid cursor")
    return index
