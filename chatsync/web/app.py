"""The HTTP API for the frontend: this module only wires the parts together.

- ``deps``: the caller (Clerk session, ``auth``), what they may see, the database engine, the settings
- ``routes/``: one router per resource (conversations, sync, analytics, events, webhooks, health)
- ``events``: the change feed behind ``GET /api/events``; ``runner``: syncs started through the API
- ``middleware``: request id, access log, unexpected errors as logged 500s; CORS is Starlette's
- ``errors``: ``{"error": {"code", "message"}}`` for every error; ``schemas``: the bodies
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from sqlalchemy import Engine

from chatsync.config import Settings
from chatsync.web.auth import ClerkSettings, ClerkVerifier
from chatsync.web.errors import declared, install_error_handlers
from chatsync.web.events import ChangeFeed
from chatsync.web.middleware import RequestContext, cors_options
from chatsync.web.routes import analytics, conversations, events, health, sync, webhooks
from chatsync.web.runner import SyncRunner


def operation_id(route: APIRoute) -> str:
    """Readable operation ids: the route function's name (``list_conversations``)."""
    return route.name


# Threads that run routes and database work at once in one server process; ``serve`` opens the engine
# with as many PostgreSQL connections, so no thread waits for one and none is opened per request.
WORKER_THREADS = 20


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Size the worker threads to the connection pool; stop the change feed when the server stops."""
    from anyio import to_thread

    to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
    yield
    await app.state.feed.close()


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the event payloads a client of ``/api/events`` parses."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        app.openapi_schema = events.add_event_schemas(document)
    return app.openapi_schema


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    """The API over one database; ConfigError when the Clerk settings are incomplete."""
    clerk = ClerkSettings.from_settings(settings)
    app = FastAPI(
        title="chatsync API",
        version="1",
        description="Chatbase conversations, WhatsApp numbers and analytics for the chatsync frontend.",
        generate_unique_id_function=operation_id,
        responses=declared(500),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.reader = engine.execution_options(isolation_level="AUTOCOMMIT")
    app.state.verifier = ClerkVerifier(clerk)
    app.state.runner = SyncRunner(engine, settings)
    app.state.feed = ChangeFeed(engine, settings.events_poll.total_seconds(), settings.events_per_user)
    install_error_handlers(app)
    for module in (conversations, sync, analytics, events, webhooks, health):
        app.include_router(module.router)
    # Added last, so outermost: preflights are answered before anything else, and every response,
    # a 500 included, carries the CORS headers the browser needs to read it.
    app.add_middleware(RequestContext)
    app.add_middleware(CORSMiddleware, **cors_options(settings.allowed_origins))
    app.openapi = partial(openapi_document, app)  # type: ignore[method-assign]
    return app


def app_from_env() -> FastAPI:
    """The app as each worker of ``chatsync serve --workers N`` builds it, from the same settings."""
    import os

    from chatsync.config import load_settings
    from chatsync.logs import configure_sentry
    from chatsync.store.engine import ensure_schema, open_engine
    from chatsync.web.logs import configure_logging

    settings = load_settings()
    configure_logging(settings.log_format, debug=os.environ.get("CHATSYNC_SERVE_DEBUG") == "1")
    configure_sentry(settings.sentry_dsn.reveal() if settings.sentry_dsn else None)
    engine = open_engine(settings.database_url, pool_size=WORKER_THREADS)
    ensure_schema(engine)
    return create_app(engine, settings)
