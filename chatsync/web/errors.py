"""Errors as the API answers them: ``{"error": {"code", "message"}}`` with the right status, never a trace.

Routes raise :class:`ApiError` (or let the core's named exceptions through :func:`core`); the handlers
installed by :func:`install_error_handlers` shape FastAPI's and Starlette's own errors the same way. An
unexpected exception becomes a 500 in :mod:`chatsync.web.middleware`, which logs it with the request id.
"""

from collections.abc import Callable
from datetime import date
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatsync.errors import NotFound, UsageError
from chatsync.timeutil import check_day
from chatsync.web.schemas import ErrorBody

T = TypeVar("T")

DESCRIPTIONS = {
    400: "Bad request",
    401: "No valid session token (`WWW-Authenticate: Bearer`)",
    403: "Signed in, but not allowed",
    404: "Not found, or not visible to the caller",
    409: "Conflict",
    422: "Invalid input; the message says what was expected",
    413: "The body is larger than the endpoint reads",
    429: "Too many open event streams for this user",
    500: "Unexpected error; the message carries the request id (also in `x-request-id`)",
    503: "A dependency is not available",
}


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def declared(*statuses: int, streaming: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` declaring our error body for each status. ``streaming``: the route's own
    media type is not JSON (FastAPI would file the error body under it), so say ``application/json``."""
    if streaming:
        json_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        return {s: {"description": DESCRIPTIONS.get(s, "Error"), "content": json_body} for s in statuses}
    return {s: {"model": ErrorBody, "description": DESCRIPTIONS.get(s, "Error")} for s in statuses}


def core(call: Callable[[], T]) -> T:
    """Run a core call, turning its named exceptions into API errors."""
    try:
        return call()
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except UsageError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None


def check_window(since: date | None, until: date | None) -> None:
    """The days of a request: each in range, and in order."""
    for day in (since, until):
        if day is not None:
            core(lambda day=day: check_day(day))  # type: ignore[misc]
    if since and until and since > until:
        raise ApiError(422, "invalid_request", "since is after until")


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:  # FastAPI could not parse the body: a request problem like any other 422
        return error_response(422, "invalid_request", "the body is not JSON chatsync can read")
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}".strip(": "))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
