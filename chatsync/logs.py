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
import re
import sys
import time
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
_HANDLER_NAME = "chatsync"
_current_format = "text"  # what configure() last set up: the CLI's error line follows it


_SECRETS: list[re.Pattern[str]] = []  # masked in every log line (see mask_in_logs)


def mask_in_logs(pattern: re.Pattern[str]) -> None:
    """Mask what ``pattern`` matches (a secret, in any of its encodings) as ``***`` in every log line from
    now on, libraries' too: ``--debug`` shows httpcore's response headers, where a server may echo the
    Chatbase key. chatsync's own messages are masked where they are made; this is the net under them."""
    if pattern not in _SECRETS:
        _SECRETS.append(pattern)


class _Masked(logging.Filter):
    """Takes the secrets of :func:`mask_in_logs` out of a record's message and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            message = record.getMessage()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            for pattern in _SECRETS:
                message = pattern.sub("***", message)
                if record.exc_text:
                    record.exc_text = pattern.sub("***", record.exc_text)
            record.msg, record.args = message, None
        return True


def _utc_time(record: logging.LogRecord) -> str:
    """``2026-11-30T09:41:07.123Z``: log lines from several hosts sort and compare as they are."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


# What a terminal would act on instead of showing: C0 and C1 controls (ESC starts colour, title and cursor
# sequences), DEL, and the bidirectional overrides that make text read as other text.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _picture(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)  # the Unicode control pictures: ␛ for ESC, ␊ for a newline
    return "\u2421" if code == 0x7F else "\ufffd"


def shown(text: str, lines: bool = False) -> str:
    """``text`` with every control character replaced by a visible symbol of the same width (ESC by ␛), so
    text from Chatbase or a user cannot recolour, retitle or rewrite a terminal, nor forge a log line.
    ``lines``: keep newlines and tabs (a transcript, a message of ours); otherwise they are shown too."""
    if lines:
        return _CONTROLS.sub(lambda m: m.group() if m.group() in "\n\t" else _picture(m), text)
    return _CONTROLS.sub(_picture, text)


class _TextFormatter(logging.Formatter):
    """One line a record: the message's control characters shown, not acted on (a conversation id or a
    Chatbase error text can hold any); a traceback follows on its own lines as usual."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_time(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = shown(record.message)
        return super().formatMessage(record)


def _json_formatter(fields: str) -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    class UTCJsonFormatter(JsonFormatter):
        def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
            return _utc_time(record)

    return UTCJsonFormatter(fields, rename_fields={"levelname": "level", "asctime": "time"})


class _StderrHandler(logging.StreamHandler):
    """A stream handler on whatever ``sys.stderr`` is when a record is written, as the standard library's
    last-resort handler is: a progress bar on a terminal (rich) puts its own stderr in place while it
    runs, which prints a line above the bar, where the stream found at start-up wrote into the bar."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass  # (always the current sys.stderr)


def log_handler(log_format: str, stream: Any = None, fields: tuple[str, ...] = ()) -> logging.Handler:
    """A stderr handler writing ``text`` lines or ``json`` objects (python-json-logger), UTC timestamps.

    ``fields``: record attributes a caller's filter puts on every record (the API's ``request_id``),
    shown in brackets before the logger's name, or as keys of the JSON object.
    """
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    if log_format == "json":
        formatter = _json_formatter(" ".join([JSON_FIELDS, *(f"%({f})s" for f in fields)]))
    else:
        shown = "".join(f"[%({f})s] " for f in fields)
        formatter = _TextFormatter(TEXT_FORMAT.replace("%(name)s", f"{shown}%(name)s"))
    handler.setFormatter(formatter)
    handler.addFilter(_Masked())
    return handler


def level_for(verbose: int, quiet: int) -> int:
    """``-v`` INFO, ``-vv`` DEBUG; ``-q`` ERROR, ``-qq`` CRITICAL; neither WARNING."""
    step = verbose - quiet
    return {-2: logging.CRITICAL, -1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        max(-2, min(step, 2)), logging.DEBUG
    )


def configure(
    level: int,
    log_format: str = "text",
    debug: bool = False,
    stream: Any = None,
    *,
    fields: tuple[str, ...] = (),
    filters: tuple[logging.Filter, ...] = (),
    libraries: bool = False,
    loggers: tuple[str, ...] = (),
) -> logging.Handler:
    """Send chatsync's records at ``level`` and above to stderr.

    ``libraries``: also other loggers' warnings and errors (``serve``, where uvicorn's matter; ``loggers``
    named there get ``level`` like chatsync's); otherwise libraries' records stay out. ``debug`` sends
    everything at DEBUG. Idempotent: calling it again replaces the handler it installed.
    """
    global _current_format
    _current_format = log_format
    handler = log_handler(log_format, stream, fields)
    for log_filter in filters:
        handler.addFilter(log_filter)
    root = logging.getLogger()
    ours = [logging.getLogger(name) for name in ("chatsync", *loggers)]
    for logger in (root, *ours):
        for old in [
            h for h in logger.handlers if h.get_name() == _HANDLER_NAME or isinstance(h, logging.NullHandler)
        ]:
            logger.removeHandler(old)
    if debug or libraries:
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if debug else logging.WARNING)
        for logger in ours:
            logger.setLevel(logging.DEBUG if debug else level)
            logger.propagate = True
    else:
        root.addHandler(logging.NullHandler())  # libraries' records are --debug detail, not stderr lines
        ours[0].addHandler(handler)
        ours[0].setLevel(level)
        ours[0].propagate = False
    return handler


def json_error_line(message: str) -> str | None:
    """The CLI's one error line as a JSON log object, when the log is JSON (``CHATSYNC_LOG_FORMAT=json``),
    so that stderr holds nothing but JSON lines; None for the plain ``error: …`` line."""
    if _current_format != "json":
        return None
    record = logging.LogRecord("chatsync", logging.ERROR, __file__, 0, message, None, None)
    return _json_formatter(JSON_FIELDS).format(record)


def scrub_event(event: dict[str, Any], hint: Any = None) -> dict[str, Any]:
    """Sentry ``before_send``: no tokens, keys, passwords, cookies, bodies or personal data leave the machine.

    Frame locals are never collected (see :func:`configure_sentry`); this drops what else could hold a
    secret: the request's headers, cookies, body and query, the command line (``--api-key``), the user.
    """
    request = event.get("request")
    if isinstance(request, dict):
        for key in ("headers", "cookies", "data", "query_string", "env"):
            request.pop(key, None)
    event.pop("user", None)
    extra = event.get("extra")
    if isinstance(extra, dict):
        extra.pop("sys.argv", None)
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
    sentry_sdk.init(
        dsn=dsn,
        send_default_pii=False,
        include_local_variables=False,  # locals hold settings, connection URLs and tokens
        max_request_body_size="never",
        before_send=scrub_event,  # type: ignore[arg-type]
    )
    return True


def capture(error: BaseException) -> None:
    """Send an error to Sentry when :func:`configure_sentry` set it up; nothing otherwise."""
    sentry_sdk = sys.modules.get("sentry_sdk")  # (imported by configure_sentry if set up: 55 ms spared)
    if sentry_sdk is not None and sentry_sdk.is_initialized():
        sentry_sdk.capture_exception(error)
        sentry_sdk.flush(timeout=5)
