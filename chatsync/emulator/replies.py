"""What the emulator answers with: a status, a body and headers, in Chatbase's v1 and v2 error shapes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# The v2 error code and message Chatbase's OpenAPI gives for each status the export can answer.
V2_ERRORS: dict[int, tuple[str, str]] = {
    400: ("VALIDATION_INVALID_BODY", "Invalid request"),
    401: ("AUTH_MISSING_API_KEY", "Authentication required"),
    403: ("SUBSCRIPTION_API_RESTRICTED_PLAN", "A Standard plan or higher is required to access the API"),
    404: ("AGENT_NOT_FOUND", "Agent not found"),
    429: ("RATE_LIMIT_TOO_MANY_REQUESTS", "Too many requests, please try again later"),
    500: ("INTERNAL_SERVER_ERROR", "Something went wrong, please try again"),
    503: (
        "SERVICE_UNDER_MAINTENANCE",
        "The API is temporarily unavailable for scheduled maintenance, please try again later",
    ),
}


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def encode(payload: Any) -> bytes:
    """UTF-8 JSON; text with lone surrogates is written with ``\\u`` escapes, as JavaScript writes it."""
    try:
        return json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(payload, ensure_ascii=True).encode()


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, encode(payload), {"content-type": "application/json", **(headers or {})})


def v2_error(
    status: int,
    code: str | None = None,
    message: str | None = None,
    details: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """``{"error": {"code", "message", "details"?}}`` with the OpenAPI's code and message by default."""
    default_code, default_message = V2_ERRORS.get(status, ("ERROR", "Error"))
    error: dict[str, Any] = {"code": code or default_code, "message": message or default_message}
    if details:
        error["details"] = details
    return json_reply(status, {"error": error}, headers)
