"""The HTTP API for the frontend: a thin layer over the core's queries, rules and metrics.

Nothing here decides what a conversation, a number or a metric is: routes authenticate the caller, work
out what they may see (``store.access``), call the core, and shape errors as
``{"error": {"code", "message"}}``. Invisible conversations are 404, exactly like missing ones.

No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at definition time,
and their dependencies are closures of :func:`create_app`.
"""

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import date
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import Engine, and_, select, text, true
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatsync.config import Settings
from chatsync.errors import ChatsyncError, LockHeld, NotFound, UsageError
from chatsync.store.access import Access, Caller, access_for
from chatsync.store.queries import ConversationFilter, get_conversation, list_page, set_whatsapp
from chatsync.store.tables import conversations, sync_runs
from chatsync.timeutil import as_utc, check_day, iso_z, utcnow
from chatsync.web.auth import ClerkSettings, ClerkVerifier, Forbidden, Unauthorized

log = logging.getLogger("chatsync.web")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


# ------------------------------------------------------------------------------------------------ schemas
class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ConversationOut(BaseModel):
    id: str
    chatbot_id: str
    created_at: str
    last_message_at: str | None
    source: str | None
    customer: str | None
    country: str | None
    message_count: int
    whatsapp_number: str | None
    whatsapp_source: str | None


class ConversationPage(BaseModel):
    data: list[ConversationOut]
    next_cursor: str | None


class MessageOut(BaseModel):
    role: str
    content: str
    created_at: str | None


class AuditOut(BaseModel):
    at: str
    by: str
    old: str | None
    new: str | None
    old_source: str | None
    new_source: str | None


class ConversationDetail(ConversationOut):
    messages: list[MessageOut]
    whatsapp_audit: list[AuditOut]


class WhatsAppUpdate(BaseModel):
    """``{"whatsapp_number": "9123 4567"}``, ``{"whatsapp_number": null}`` to clear, or ``{"auto": true}``."""

    whatsapp_number: str | None = Field(default=None, max_length=64)
    auto: bool = False


class SyncStart(BaseModel):
    chatbot_id: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")
    since: date | None = None
    until: date | None = None


class SyncStarted(BaseModel):
    run_id: str


class SyncStatus(BaseModel):
    run_id: str
    status: str
    summary: dict[str, Any] | None


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# -------------------------------------------------------------------------------------------- background
class SyncRunner:
    """Runs syncs started through the API on background threads, one per chatbot at a time."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self._running: dict[str, str] = {}  # chatbot id → run id
        self._started: set[str] = set()
        self._lock = threading.Lock()

    def start(self, request: SyncStart) -> str:
        from chatsync.chatbase import ChatbaseClient
        from chatsync.store.locks import chatbot_lock
        from chatsync.sync import Syncer, SyncRequest

        key = self.settings.require_api_key()
        with self._lock:
            if request.chatbot_id in self._running:
                raise LockHeld(request.chatbot_id)
            with chatbot_lock(self.engine, request.chatbot_id):
                pass  # held elsewhere (a cron sync) → LockHeld → 409
            client = ChatbaseClient(
                key,
                self.settings.base_url,
                rate_limit=(self.settings.rate_limit_requests, self.settings.rate_limit_seconds),
                retry_budget=self.settings.retry_budget,
            )
            syncer = Syncer(self.engine, client, self.settings.whatsapp, self.settings.concurrency)
            self._running[request.chatbot_id] = syncer.run_id
            self._started.add(syncer.run_id)
        job = SyncRequest(
            (request.chatbot_id,), request.since, request.until, lookback=self.settings.lookback
        )

        def run() -> None:
            try:
                syncer.run(job)
            except ChatsyncError as exc:
                log.warning("sync %s of %s ended early: %s", syncer.run_id, request.chatbot_id, exc)
            except Exception:
                log.exception("sync %s of %s failed", syncer.run_id, request.chatbot_id)
            finally:
                client.close()
                with self._lock:
                    self._running.pop(request.chatbot_id, None)

        threading.Thread(target=run, name=f"chatsync-api-sync-{syncer.run_id[:8]}", daemon=True).start()
        return syncer.run_id

    def status(self, run_id: str) -> SyncStatus | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(sync_runs).where(sync_runs.c.id == run_id)).mappings().first()
        if row is None:
            return (
                SyncStatus(run_id=run_id, status="running", summary=None) if run_id in self._started else None
            )
        status = {"running": "running", "ok": "ok", "partial": "partial"}.get(row["status"], "failed")
        return SyncStatus(
            run_id=run_id, status=status, summary=row["summary"] if status != "running" else None
        )


# ---------------------------------------------------------------------------------------------------- app
def create_app(
    engine: Engine, settings: Settings, clerk: ClerkSettings, poll_seconds: float = 2.0
) -> FastAPI:
    """The API over one database; Clerk settings decide who may call it."""
    verifier = ClerkVerifier(clerk)
    runner = SyncRunner(engine, settings)
    app = FastAPI(
        title="chatsync API",
        version="1",
        description="Chatbase conversations, WhatsApp numbers and analytics for the chatsync frontend.",
    )

    @app.middleware("http")
    async def request_id(request: Request, call_next: Any) -> Any:
        incoming = request.headers.get("x-request-id", "")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        request.state.request_id = rid
        if "\x00" in request.scope.get("path", "") or any("\x00" in v for v in request.query_params.values()):
            response = _error(
                422, "invalid_request", "NUL characters are not allowed"
            )  # PostgreSQL text refuses them
            response.headers["x-request-id"] = rid
            return response
        response = await call_next(request)
        response.headers["x-request-id"] = rid
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}".strip(": "))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", "-")
        log.error("request %s failed", rid, exc_info=exc)
        return _error(500, "internal", f"unexpected error; request id {rid}", {"x-request-id": rid})

    # ----------------------------------------------------------------------------------------- auth
    def caller(authorization: Annotated[str | None, Header()] = None) -> tuple[Caller, int]:
        try:
            return verifier.verify(authorization)
        except Unauthorized:
            raise ApiError(
                401, "unauthorized", "a valid session token is required", {"WWW-Authenticate": "Bearer"}
            ) from None
        except Forbidden:
            raise ApiError(403, "forbidden", "this session is not active yet") from None

    def access(who: Annotated[tuple[Caller, int], Depends(caller)]) -> Access:
        if who[0].user_id in clerk.admin_user_ids:
            return Access(visible=None, administers=None)  # no database round trip for admins
        with engine.connect() as connection:
            return access_for(connection, who[0], clerk.admin_user_ids)

    authed = _errors(401, 403)

    # ------------------------------------------------------------------------------------ endpoints
    @app.get("/healthz", responses=_errors(503))
    def healthz() -> dict[str, str]:
        """Liveness and database reachability."""
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception:
            raise ApiError(503, "database_unreachable", "the database does not answer") from None
        return {"status": "ok", "database": "ok"}

    @app.get("/api/conversations", response_model=ConversationPage, responses={**authed, **_errors(422)})
    def list_conversations(
        who: Annotated[Access, Depends(access)],
        chatbot_id: Annotated[list[str] | None, Query(max_length=128)] = None,
        source: Annotated[list[str] | None, Query(max_length=64)] = None,
        since: date | None = None,
        until: date | None = None,
        has_whatsapp: bool | None = None,
        number: Annotated[str | None, Query(max_length=64)] = None,
        search: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: Annotated[str | None, Query(max_length=512)] = None,
    ) -> dict[str, Any]:
        """Conversations the caller may see, newest first, with the fields of `chatsync list`."""
        _check_window(since, until)
        filters = _filters(settings, who, chatbot_id, source, since, until, has_whatsapp, number, search)
        with engine.connect() as connection:
            data, next_cursor = _core(lambda: list_page(connection, filters, limit, cursor))
        # The core already shaped every row; returning a response skips re-validating what the model documents.
        return JSONResponse({"data": data, "next_cursor": next_cursor})  # type: ignore[return-value]

    @app.get(
        "/api/conversations/{conversation_id}",
        response_model=ConversationDetail,
        responses={**authed, **_errors(404)},
    )
    def read_conversation(conversation_id: str, who: Annotated[Access, Depends(access)]) -> dict[str, Any]:
        """One conversation with its messages and WhatsApp audit trail."""
        with engine.connect() as connection:
            return _core(lambda: get_conversation(connection, conversation_id, who.visible))

    @app.post(
        "/api/conversations/{conversation_id}/update-whatsapp",
        response_model=ConversationDetail,
        responses={**authed, **_errors(404, 422)},
    )
    def update_whatsapp(
        conversation_id: str,
        body: WhatsAppUpdate,
        who: Annotated[Access, Depends(access)],
        person: Annotated[tuple[Caller, int], Depends(caller)],
    ) -> dict[str, Any]:
        """Set the number by hand (normalised like `chatsync set-whatsapp`), clear it, or go back to auto."""
        from chatsync.whatsapp import normalize_number

        given = "whatsapp_number" in body.model_fields_set
        if body.auto == given:
            raise ApiError(
                422, "invalid_request", 'send {"whatsapp_number": "..."} or null, or {"auto": true}'
            )
        number = None
        if given and body.whatsapp_number is not None:
            number = _core(lambda: normalize_number(body.whatsapp_number or "", settings.whatsapp))
        with engine.begin() as connection:
            _core(
                lambda: set_whatsapp(
                    connection,
                    conversation_id,
                    number=number,
                    auto=body.auto,
                    by=person[0].user_id,
                    now=utcnow(),
                    visible_chatbot_ids=who.visible,
                )
            )
        with engine.connect() as connection:
            return _core(lambda: get_conversation(connection, conversation_id, who.visible))

    @app.post(
        "/api/sync",
        status_code=202,
        response_model=SyncStarted,
        responses={**authed, **_errors(409, 422, 503)},
    )
    def start_sync(body: SyncStart, who: Annotated[Access, Depends(access)]) -> dict[str, str]:
        """Start a sync of one chatbot in the background (admins)."""
        if not who.may_sync(body.chatbot_id):
            raise ApiError(403, "forbidden", "only admins of this chatbot may sync it")
        _check_window(body.since, body.until)
        try:
            return {"run_id": runner.start(body)}
        except LockHeld:
            raise ApiError(409, "sync_running", f"chatbot {body.chatbot_id!r} is already syncing") from None
        except ChatsyncError as exc:
            raise ApiError(503, "sync_not_configured", str(exc)) from None

    @app.get("/api/sync/{run_id}", response_model=SyncStatus, responses={**authed, **_errors(404)})
    def sync_status(run_id: str, who: Annotated[Access, Depends(access)]) -> SyncStatus:
        """A sync's status; its summary (the `sync --json` object) once finished (admins)."""
        if who.administers is not None and not who.administers:
            raise ApiError(403, "forbidden", "only admins may see syncs")
        status = runner.status(run_id)
        if status is None:
            raise ApiError(404, "not_found", f"sync run {run_id!r} not found")
        return status

    @app.get("/api/analytics", responses={**authed, **_errors(422)})
    def analytics(
        who: Annotated[Access, Depends(access)],
        since: date | None = None,
        until: date | None = None,
        chatbot_id: Annotated[list[str] | None, Query(max_length=128)] = None,
        source: Annotated[list[str] | None, Query(max_length=64)] = None,
        tz: Annotated[str | None, Query(max_length=64)] = None,
    ) -> dict[str, Any]:
        """The `chatsync report --format json` object over the conversations the caller may see."""
        from chatsync.analytics import report
        from chatsync.config import validate_timezone

        _check_window(since, until)
        zone = _core(lambda: validate_timezone(tz or settings.timezone))
        filters = _filters(settings, who, chatbot_id, source, None, None, None, None, None)
        with engine.connect() as connection:
            return dict(_core(lambda: report(connection, filters, since, until, zone)))

    @app.post("/api/webhooks/clerk", responses=_errors(400))
    async def clerk_webhook(request: Request) -> dict[str, str]:
        """Clerk user events, verified with Svix; redeliveries and older updates change nothing."""
        from svix.webhooks import Webhook, WebhookVerificationError

        from chatsync.store.users import apply_clerk_event, first_delivery

        if not clerk.webhook_secret:
            raise ApiError(400, "webhook_not_configured", "CLERK_WEBHOOK_SIGNING_SECRET is not set")
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            Webhook(clerk.webhook_secret).verify(body, headers)
            event = json.loads(body)
        except (WebhookVerificationError, ValueError, TypeError):
            raise ApiError(400, "invalid_signature", "the webhook signature does not verify") from None
        if not isinstance(event, dict):
            raise ApiError(400, "invalid_payload", "expected a JSON object")
        with engine.begin() as connection:
            if not first_delivery(connection, headers.get("svix-id", ""), str(event.get("type")), utcnow()):
                return {"result": "duplicate"}
            return {"result": apply_clerk_event(connection, event, utcnow())}

    @app.get("/api/events", responses=authed)
    def events(
        who: Annotated[Access, Depends(access)], person: Annotated[tuple[Caller, int], Depends(caller)]
    ) -> StreamingResponse:
        """Server-Sent Events: `conversation.upserted` and `sync.finished`, until the token expires."""
        return StreamingResponse(
            _event_stream(engine, who, person[1], poll_seconds),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


def _core(call: Any) -> Any:
    """Run a core call, turning its named exceptions into API errors."""
    try:
        return call()
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except UsageError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None


def _check_window(since: date | None, until: date | None) -> None:
    """The days of a request: each in range, and in order."""
    _core(lambda: [check_day(d) for d in (since, until) if d])
    if since and until and since > until:
        raise ApiError(422, "invalid_request", "since is after until")


def _filters(
    settings: Settings,
    who: Access,
    chatbot_id: list[str] | None,
    source: list[str] | None,
    since: date | None,
    until: date | None,
    has_whatsapp: bool | None,
    number: str | None,
    search: str | None,
) -> ConversationFilter:
    from chatsync.sources import canonical_source
    from chatsync.whatsapp import normalize_number

    return ConversationFilter(
        chatbot_ids=tuple(chatbot_id or ()),
        sources=tuple(_core(lambda: [canonical_source(s) for s in source or []])),
        since=since,
        until=until,
        has_whatsapp=has_whatsapp,
        number=_core(lambda: normalize_number(number, settings.whatsapp)) if number is not None else None,
        search=search or None,
        visible_chatbot_ids=who.visible,
    )


def _event_stream(engine: Engine, who: Access, expires: int, poll_seconds: float) -> Iterator[str]:
    """Poll the database for what changed since the stream opened; works for syncs run by cron too."""
    since = utcnow()
    yield ": connected\n\n"
    while time.time() < expires:
        time.sleep(max(0.05, min(poll_seconds, expires - time.time())))
        now = utcnow()
        scope = [conversations.c.synced_at > since, conversations.c.synced_at <= now]
        if who.visible is not None:
            scope.append(conversations.c.chatbot_id.in_(who.visible))
        with engine.connect() as connection:
            changed = connection.execute(
                select(conversations.c.id, conversations.c.chatbot_id, conversations.c.synced_at)
                .where(and_(true(), *scope))
                .order_by(conversations.c.synced_at)
                .limit(1000)
            ).all()
            finished = (
                connection.execute(
                    select(sync_runs).where(
                        and_(sync_runs.c.finished_at > since, sync_runs.c.finished_at <= now)
                    )
                )
                .mappings()
                .all()
            )
        for row in changed:
            payload = {"id": row.id, "chatbot_id": row.chatbot_id, "synced_at": iso_z(as_utc(row.synced_at))}
            yield f"event: conversation.upserted\ndata: {json.dumps(payload)}\n\n"
        for run in finished:
            if who.visible is None or set(run["chatbot_ids"] or []) & set(who.visible):
                payload = {"run_id": run["id"], "status": run["status"], "summary": run["summary"]}
                yield f"event: sync.finished\ndata: {json.dumps(payload)}\n\n"
        since = now
    yield "event: expired\ndata: {}\n\n"


def app_from_env() -> FastAPI:
    """The app as ``chatsync serve --workers N`` builds it in each worker, from the environment."""
    import os

    from chatsync.config import load_settings
    from chatsync.store.engine import ensure_schema, open_engine

    settings = load_settings()
    engine = open_engine(settings.database_url)
    ensure_schema(engine)
    configure_sentry(os.environ.get("SENTRY_DSN"))
    return create_app(engine, settings, ClerkSettings.from_env())


def scrub_event(event: dict[str, Any], hint: Any = None) -> dict[str, Any]:
    """Sentry ``before_send``: no tokens, cookies, bodies or personal data leave the server."""
    request = event.get("request")
    if isinstance(request, dict):
        for key in ("headers", "cookies", "data", "query_string", "env"):
            request.pop(key, None)
    event.pop("user", None)
    return event


def configure_sentry(dsn: str | None) -> bool:
    """Send errors to Sentry when SENTRY_DSN is set and sentry-sdk is installed."""
    if not dsn:
        return False
    try:
        import sentry_sdk
    except ImportError:
        log.warning("SENTRY_DSN is set but sentry-sdk is not installed: pip install sentry-sdk")
        return False
    sentry_sdk.init(dsn=dsn, send_default_pii=False, before_send=scrub_event)
    return True
