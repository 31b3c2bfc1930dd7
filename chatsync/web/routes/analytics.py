"""``GET /api/analytics``: the `chatsync report --format json` object over what the caller may see.

No ``from __future__ import annotations``: FastAPI reads these signatures at runtime.
"""

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Query

from chatsync.web.deps import AUTHED, AccessDep, EngineDep, SettingsDep
from chatsync.web.errors import check_window, core, declared
from chatsync.web.routes.conversations import conversation_filter
from chatsync.web.schemas import Report

router = APIRouter(tags=["analytics"])


@router.get("/api/analytics", response_model=Report, responses={**AUTHED, **declared(422)})
def get_analytics(
    who: AccessDep,
    engine: EngineDep,
    settings: SettingsDep,
    since: date | None = None,
    until: date | None = None,
    chatbot_id: Annotated[list[str] | None, Query(max_length=128)] = None,
    source: Annotated[list[str] | None, Query(max_length=64)] = None,
    tz: Annotated[str | None, Query(max_length=64)] = None,
) -> Any:
    """The `chatsync report --format json` object over the conversations the caller may see."""
    from chatsync.analytics import report
    from chatsync.config import validate_timezone

    check_window(since, until)
    zone = core(lambda: validate_timezone(tz or settings.timezone))
    filters = conversation_filter(settings, who, chatbot_id, source)
    with engine.connect() as connection:
        return core(lambda: report(connection, filters, since, until, zone))
