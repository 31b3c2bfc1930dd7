"""Conversations: the list with filters, one conversation, and a person's correction of its number.

No ``from __future__ import annotations``: FastAPI reads these signatures at runtime.
"""

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from chatsync.config import Settings
from chatsync.store.access import Access
from chatsync.store.queries import ConversationFilter, get_conversation, list_page, set_whatsapp
from chatsync.timeutil import utcnow
from chatsync.web.deps import AUTHED, AccessDep, EngineDep, ReaderDep, SessionDep, SettingsDep
from chatsync.web.errors import ApiError, check_window, core, declared
from chatsync.web.schemas import ConversationDetail, ConversationPage, WhatsAppUpdate

router = APIRouter(tags=["conversations"])


def conversation_filter(
    settings: Settings,
    who: Access,
    chatbot_id: list[str] | None = None,
    source: list[str] | None = None,
    since: date | None = None,
    until: date | None = None,
    has_whatsapp: bool | None = None,
    number: str | None = None,
    search: str | None = None,
) -> ConversationFilter:
    """The core's filter for a request, limited to what the caller may see."""
    from chatsync.sources import canonical_source
    from chatsync.whatsapp import lookup_number

    return ConversationFilter(
        chatbot_ids=tuple(chatbot_id or ()),
        sources=tuple(core(lambda: [canonical_source(s) for s in source or []])),
        since=since,
        until=until,
        has_whatsapp=has_whatsapp,
        number=core(lambda: lookup_number(number, settings.whatsapp)) if number is not None else None,
        search=search or None,
        visible_chatbot_ids=who.visible,
    )


@router.get("/api/conversations", response_model=ConversationPage, responses={**AUTHED, **declared(422)})
def list_conversations(
    who: AccessDep,
    engine: ReaderDep,
    settings: SettingsDep,
    chatbot_id: Annotated[list[str] | None, Query(max_length=128)] = None,
    source: Annotated[list[str] | None, Query(max_length=64)] = None,
    since: date | None = None,
    until: date | None = None,
    has_whatsapp: bool | None = None,
    number: Annotated[str | None, Query(max_length=64)] = None,
    search: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Any:
    """Conversations the caller may see, newest first, with the fields of `chatsync list`."""
    check_window(since, until)
    filters = conversation_filter(
        settings, who, chatbot_id, source, since, until, has_whatsapp, number, search
    )
    with engine.connect() as connection:
        data, next_cursor = core(lambda: list_page(connection, filters, limit, cursor))
    # The core already shaped every row; answering directly skips re-validating what the model documents.
    return JSONResponse({"data": data, "next_cursor": next_cursor})


@router.get(
    "/api/conversations/{conversation_id}",
    response_model=ConversationDetail,
    responses={**AUTHED, **declared(404, 422)},
)
def get_conversation_detail(conversation_id: str, who: AccessDep, engine: EngineDep) -> Any:
    """One conversation with its messages and WhatsApp audit trail."""
    with engine.connect() as connection:
        return core(lambda: get_conversation(connection, conversation_id, who.visible))


@router.post(
    "/api/conversations/{conversation_id}/update-whatsapp",
    response_model=ConversationDetail,
    responses={**AUTHED, **declared(404, 422)},
)
def update_whatsapp(
    conversation_id: str,
    body: WhatsAppUpdate,
    who: AccessDep,
    session: SessionDep,
    engine: EngineDep,
    settings: SettingsDep,
) -> Any:
    """Set the number by hand (normalised like `chatsync set-whatsapp`), clear it, or go back to auto."""
    from chatsync.whatsapp import normalize_number

    given = "whatsapp_number" in body.model_fields_set
    if body.auto == given:
        raise ApiError(422, "invalid_request", 'send {"whatsapp_number": "..."} or null, or {"auto": true}')
    number = None
    if given and body.whatsapp_number is not None:
        number = core(lambda: normalize_number(body.whatsapp_number or "", settings.whatsapp))
    with engine.begin() as connection:
        core(
            lambda: set_whatsapp(
                connection,
                conversation_id,
                number=number,
                auto=body.auto,
                by=session.caller.user_id,
                now=utcnow(),
                visible_chatbot_ids=who.visible,
            )
        )
    with engine.connect() as connection:
        return core(lambda: get_conversation(connection, conversation_id, who.visible))
