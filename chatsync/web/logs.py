"""Logging for ``chatsync serve``: every line carries the request id (the format is chatsync.logs').

The request id lives in a context variable that :mod:`chatsync.web.middleware` sets for each request;
a filter on the handler copies it into every record, whichever logger (ours, uvicorn's, a library's) made
it, and whether it was logged on the event loop or in a worker thread (both copy the context).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

REQUEST_ID: ContextVar[str] = ContextVar("chatsync_request_id", default="-")
ACCESS_LOGGER = "chatsync.access"


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request it was logged for (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


def configure_logging(log_format: str, debug: bool, stream: Any = None) -> logging.Handler:
    """Send the server's logs to stderr: chatsync's at INFO (an access line per request, errors at ERROR),
    uvicorn's and other libraries' warnings and errors; with ``debug`` everything at DEBUG. Every line
    carries the request id (``-`` outside a request)."""
    from chatsync import logs

    return logs.configure(
        logging.INFO,
        log_format,
        debug,
        stream,
        fields=("request_id",),
        filters=(RequestIdFilter(),),
        libraries=True,
        loggers=("uvicorn.error",),
    )
