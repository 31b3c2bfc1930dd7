"""``POST /api/sync`` and ``GET /api/sync/{run_id}``: background syncs for admins (chatsync.web.runner).

No ``from __future__ import annotations``: FastAPI reads these signatures at runtime.
"""

from fastapi import APIRouter, Request

from chatsync.errors import ChatsyncError, LockHeld
from chatsync.web.deps import AUTHED, AccessDep
from chatsync.web.errors import ApiError, check_window, declared
from chatsync.web.runner import SyncRunner
from chatsync.web.schemas import SyncStart, SyncStarted, SyncStatus

router = APIRouter(tags=["sync"])


@router.post(
    "/api/sync",
    status_code=202,
    response_model=SyncStarted,
    responses={**AUTHED, **declared(409, 422, 503)},
)
def start_sync(body: SyncStart, who: AccessDep, request: Request) -> SyncStarted:
    """Start a sync of one chatbot in the background (admins); 409 while that chatbot is syncing."""
    if not who.may_sync(body.chatbot_id):
        raise ApiError(403, "forbidden", "only admins of this chatbot may sync it")
    check_window(body.since, body.until)
    runner: SyncRunner = request.app.state.runner
    try:
        return SyncStarted(run_id=runner.start(body))
    except LockHeld:
        raise ApiError(409, "sync_running", f"chatbot {body.chatbot_id!r} is already syncing") from None
    except ChatsyncError as exc:
        raise ApiError(503, "sync_not_configured", str(exc)) from None


@router.get("/api/sync/{run_id}", response_model=SyncStatus, responses={**AUTHED, **declared(404, 422)})
def get_sync(run_id: str, who: AccessDep, request: Request) -> SyncStatus:
    """A sync's status; its summary (the `sync --json` object) once finished (admins)."""
    if who.administers is not None and not who.administers:
        raise ApiError(403, "forbidden", "only admins may see syncs")
    runner: SyncRunner = request.app.state.runner
    if who.administers is not None:  # an organization's admin sees its chatbots' runs only
        bots = runner.chatbot_ids(run_id)
        if bots is None or not set(bots) <= set(who.administers):
            raise ApiError(404, "not_found", f"sync run {run_id!r} not found")
    status = runner.status(run_id)
    if status is None:
        raise ApiError(404, "not_found", f"sync run {run_id!r} not found")
    return status
