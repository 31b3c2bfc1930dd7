"""``GET /api/events``: Server-Sent Events of what changed, for the caller's chatbots (chatsync.web.events).

No ``from __future__ import annotations``: FastAPI reads these signatures at runtime.
"""

from collections.abc import AsyncIterable, AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from chatsync.web.deps import AccessDep, SessionDep
from chatsync.web.errors import ApiError, declared
from chatsync.web.events import ChangeFeed, follow
from chatsync.web.schemas import ConversationUpserted, StreamNotice, SyncFinished

router = APIRouter(tags=["events"])
EVENT_MODELS = (ConversationUpserted, SyncFinished, StreamNotice)
DESCRIPTION = """Server-Sent Events, each with an `id:` (resume with `Last-Event-ID`):
`conversation.upserted` (data: ConversationUpserted), `sync.finished` (SyncFinished), `reset` (StreamNotice:
events since your `Last-Event-ID` are no longer kept, fetch again) and, last, `expired` (StreamNotice: the
token expired, reconnect with a fresh one). A `: ping` comment comes every 15 s."""


async def stream_slot(request: Request, session: SessionDep) -> AsyncIterator[None]:
    """One of the caller's allowed open streams, given back when the stream ends (429 beyond the cap)."""
    feed: ChangeFeed = request.app.state.feed
    user = session.caller.user_id
    if not feed.take_slot(user):
        raise ApiError(
            429,
            "too_many_streams",
            f"at most {feed.streams_per_user} open event streams per user: close one first",
            {"Retry-After": "5"},
        )
    try:
        yield
    finally:
        feed.release_slot(user)


@router.get(
    "/api/events",
    response_class=EventSourceResponse,
    responses={200: {"description": DESCRIPTION}, **declared(401, 403, 422, 429, 500, streaming=True)},
)
async def stream_events(
    request: Request,
    who: AccessDep,
    session: SessionDep,
    slot: Annotated[None, Depends(stream_slot)],
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", max_length=19, pattern=r"^[0-9]+$")
    ] = None,
) -> AsyncIterable[ServerSentEvent]:
    """Changes to the conversations the caller may see and finished syncs, until the token expires."""
    feed: ChangeFeed = request.app.state.feed
    resume = int(last_event_id) if last_event_id is not None else None
    async for event in follow(feed, who, resume, session.expires):
        yield ServerSentEvent(**event)


def add_event_schemas(openapi: dict[str, Any]) -> dict[str, Any]:
    """Put the events' data models in the OpenAPI components, so generated clients have their types."""
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for model in EVENT_MODELS:
        schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return openapi
