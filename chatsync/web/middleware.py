"""Pure ASGI middleware (no ``BaseHTTPMiddleware``: it costs a task and a stream copy per request).

:class:`RequestContext` gives each request its id (a valid incoming ``x-request-id``, else a new one), sets
it for every log line, answers ``x-request-id``, refuses NUL characters (PostgreSQL text cannot hold them),
turns an unexpected exception into a logged 500 carrying the id, and writes one access line per request.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl, unquote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatsync.web.logs import ACCESS_LOGGER, REQUEST_ID

_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
log = logging.getLogger("chatsync.web")
access = logging.getLogger(ACCESS_LOGGER)


def _json(status: int, code: str, message: str, request_id: str) -> tuple[Message, Message]:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


def logged_path(scope: Scope) -> str:
    """The path and the names of the query parameters: their values may be phone numbers or search text.

    Control and format characters are written as escapes, so a path holding ``%0D%0A`` cannot forge a
    line of the log."""
    names = dict.fromkeys(name for name, _ in parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    return printable(scope.get("path", "") + ("?" + "&".join(names) if names else ""))


def printable(text: str) -> str:
    """``text`` with line breaks, control and format characters escaped (``\\r``, ``\\x00``, ``\\u2028``)."""
    return "".join(
        char if char.isprintable() or char == " " else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


class RequestContext:
    """Request id, NUL refusal, unexpected errors as logged 500s, and the access log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = incoming if _VALID_ID.match(incoming) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            if "\x00" in scope.get("path", "") or "%00" in scope.get("query_string", b"").decode("latin-1"):
                for message in _json(422, "invalid_request", "NUL characters are not allowed", request_id):
                    await send_with_id(message)
                return
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s failed: %s %s", request_id, scope.get("method"), logged_path(scope))
            if status == 0:  # nothing sent yet: answer for the app
                for message in _json(
                    500, "internal", f"unexpected error; request id {request_id}", request_id
                ):
                    await send_with_id(message)
        finally:
            milliseconds = (time.perf_counter() - started) * 1000
            user = state.get("user_id") or "-"
            access.info(
                "%s %s %s %.1fms %s",
                scope.get("method"),
                logged_path(scope),
                status or "-",
                milliseconds,
                user,
                extra={
                    "method": scope.get("method"),
                    "path": printable(unquote(scope.get("path", ""))),
                    "status": status or None,
                    "ms": round(milliseconds, 1),
                    "user_id": user,
                },
            )
            REQUEST_ID.reset(token)


def cors_options(origins: tuple[str, ...]) -> dict[str, Any]:
    """Starlette ``CORSMiddleware`` options: exact origins only, the headers the frontend sends."""
    return {
        "allow_origins": list(origins),
        "allow_methods": ["GET", "POST", "OPTIONS"],
        "allow_headers": ["Authorization", "Content-Type", "Last-Event-ID", "x-request-id"],
        "expose_headers": ["x-request-id"],
        "allow_credentials": False,
        "max_age": 600,
    }
