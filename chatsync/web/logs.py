"""Logging for ``chatsync serve``: every line carries the request id, as text or JSON, and errors reach Sentry.

The request id lives in a context variable that :mod:`chatsync.web.middleware` sets for each request;
a filter on the handler copies it into every record, whichever logger (ours, uvicorn's, a library's) made
it, and whether it was logged on the event loop or in a worker thread (both copy the context).
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any

REQUEST_ID: ContextVar[str] = ContextVar("chatsync_request_id", default="-")
ACCESS_LOGGER = "chatsync.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s"


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request it was logged for (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


def log_handler(log_format: str, stream: Any = None) -> logging.Handler:
    """A handler writing ``text`` or ``json`` (one object per line, python-json-logger) lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "asctime": "time"})
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(log_format: str, debug: bool, stream: Any = None) -> logging.Handler:
    """Send the server's logs to stderr: chatsync's at INFO (an access line per request, errors at ERROR),
    libraries' warnings and errors; with ``debug`` everything at DEBUG."""
    handler = log_handler(log_format, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    for name in ("chatsync", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)
    return handler


def scrub_event(event: dict[str, Any], hint: Any = None) -> dict[str, Any]:
    """Sentry ``before_send``: no tokens, cookies, bodies or personal data leave the server."""
    request = event.get("request")
    if isinstance(request, dict):
        for key in ("headers", "cookies", "data", "query_string", "env"):
            request.pop(key, None)
    event.pop("user", None)
    return event


def configure_sentry(dsn: str | None) -> bool:
    """Send errors to Sentry when SENTRY_DSN is set and sentry-sdk is installed; the ERROR lines the
    middleware logs for unexpected exceptions become Sentry events (its logging integration)."""
    if not dsn:
        return False
    try:
        import sentry_sdk
    except ImportError:
        logging.getLogger("chatsync.web").warning(
            "SENTRY_DSN is set but sentry-sdk is not installed: pip install sentry-sdk"
        )
        return False
    sentry_sdk.init(dsn=dsn, send_default_pii=False, before_send=scrub_event)
    return True
