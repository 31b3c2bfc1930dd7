"""Where chatsync's log lines go and what they look like: stderr, as text or one JSON object a line.

The CLI's contract is separate from its log: an error is one ``error: …`` line on stderr whatever the
level, and machine output (``--json``) goes to stdout alone. Log lines are for operators: ``-v`` shows what
the sync engine does (its plan, each window, retries and rate-limit waits, quarantines, the summary), ``-q``
keeps only errors, and ``CHATSYNC_LOG_FORMAT=json`` makes them easy to ship. Libraries' own records stay
out unless ``--debug``.

Errors can also go to Sentry (``SENTRY_DSN``, with ``sentry-sdk`` installed): without tokens, cookies,
request bodies or personal data.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
_HANDLER_NAME = "chatsync"


def _utc_time(record: logging.LogRecord) -> str:
    """``2026-11-30T09:41:07.123Z``: log lines from several hosts sort and compare as they are."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class _TextFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_time(record)


def _json_formatter(fields: str) -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    class UTCJsonFormatter(JsonFormatter):
        def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
            return _utc_time(record)

    return UTCJsonFormatter(fields, rename_fields={"levelname": "level", "asctime": "time"})


def log_handler(log_format: str, stream: Any = None, fields: str = "") -> logging.Handler:
    """A stderr handler writing ``text`` lines or ``json`` objects (python-json-logger), UTC timestamps.

    ``fields``: extra ``%(name)s`` fields a caller's filter puts on every record (the API's request id).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    if log_format == "json":
        formatter = _json_formatter(f"{JSON_FIELDS} {fields}".strip())
    else:
        formatter = _TextFormatter(
            TEXT_FORMAT if not fields else TEXT_FORMAT.replace("%(name)s", f"{fields} %(name)s")
        )
    handler.setFormatter(formatter)
    return handler


def level_for(verbose: int, quiet: int) -> int:
    """``-v`` INFO, ``-vv`` DEBUG; ``-q`` ERROR, ``-qq`` CRITICAL; neither WARNING."""
    step = verbose - quiet
    return {-2: logging.CRITICAL, -1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        max(-2, min(step, 2)), logging.DEBUG
    )


def configure(
    level: int, log_format: str = "text", debug: bool = False, stream: Any = None
) -> logging.Handler:
    """Send chatsync's records at ``level`` and above to stderr; with ``debug`` every library's too.

    Idempotent: calling it again (the CLI's tests run many commands in one process) replaces the handler.
    """
    handler = log_handler(log_format, stream)
    root = logging.getLogger()
    ours = logging.getLogger("chatsync")
    for logger in (root, ours):
        for old in [
            h for h in logger.handlers if h.get_name() == _HANDLER_NAME or isinstance(h, logging.NullHandler)
        ]:
            logger.removeHandler(old)
    if debug:
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        ours.setLevel(logging.DEBUG)
        ours.propagate = True
    else:
        root.addHandler(logging.NullHandler())  # libraries' records are --debug detail, not stderr lines
        ours.addHandler(handler)
        ours.setLevel(level)
        ours.propagate = False
    return handler


def scrub_event(event: dict[str, Any], hint: Any = None) -> dict[str, Any]:
    """Sentry ``before_send``: no tokens, cookies, bodies or personal data leave the machine."""
    request = event.get("request")
    if isinstance(request, dict):
        for key in ("headers", "cookies", "data", "query_string", "env"):
            request.pop(key, None)
    event.pop("user", None)
    return event


def configure_sentry(dsn: str | None) -> bool:
    """Send errors to Sentry when ``SENTRY_DSN`` is set and sentry-sdk is installed; True when it will."""
    if not dsn:
        return False
    try:
        import sentry_sdk
    except ImportError:
        logging.getLogger("chatsync").warning(
            "SENTRY_DSN is set but sentry-sdk is not installed: pip install sentry-sdk"
        )
        return False
    sentry_sdk.init(dsn=dsn, send_default_pii=False, before_send=scrub_event)
    return True


def capture(error: BaseException) -> None:
    """Send an error to Sentry when :func:`configure_sentry` set it up; nothing otherwise."""
    try:
        import sentry_sdk
    except ImportError:
        return
    if sentry_sdk.is_initialized():
        sentry_sdk.capture_exception(error)
        sentry_sdk.flush(timeout=5)
