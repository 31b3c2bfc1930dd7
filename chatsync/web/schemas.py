"""The API's request and response bodies, as the OpenAPI document (and so the frontend's types) shows them.

No ``from __future__ import annotations``: Pydantic and FastAPI read these annotations at runtime.
"""

from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def _request_schema(schema: dict[str, Any]) -> None:
    """A request field with a default is optional, and its schema says so without a ``default``: generated
    clients (openapi-typescript) read a default as "always present" and would make callers send it."""
    for field in schema.get("properties", {}).values():
        field.pop("default", None)


class RequestBody(BaseModel):
    model_config = ConfigDict(json_schema_extra=_request_schema)


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable, e.g. `not_found`, `invalid_request`, `unauthorized`")
    message: str = Field(description="one line for a person")


class ErrorBody(BaseModel):
    """Every error the API answers."""

    error: ErrorDetail


class Health(BaseModel):
    status: str
    database: str


# ------------------------------------------------------------------------------------------ conversations
WhatsAppSource = Literal["manual", "extracted", "channel", "lead", "form"]  # chatsync.whatsapp.NUMBER_SOURCES


class ConversationOut(BaseModel):
    """A conversation as `chatsync list --format json` prints it."""

    id: str
    chatbot_id: str
    created_at: str = Field(description="UTC, ISO 8601 with Z")
    last_message_at: str | None
    source: str | None
    customer: str | None
    country: str | None
    message_count: int
    whatsapp_number: str | None = Field(description="E.164, e.g. +85291234567")
    whatsapp_source: WhatsAppSource | None = Field(
        description="where the number came from: manual (a person), extracted (the chat reply), channel (the "
        "WhatsApp sender's own number), lead (a lead form) or form (Chatbase's form_submission.phone)"
    )


class ConversationPage(BaseModel):
    data: list[ConversationOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class MessageOut(BaseModel):
    role: str
    content: str
    created_at: str | None
    feedback: Literal["positive", "negative"] | None = Field(
        description="the user's thumbs up or down on an answer (API v2); null when not rated or not known"
    )
    tools: list[str] = Field(description="names of the tools the bot called in this message (API v2)")


class AuditOut(BaseModel):
    """One change of the stored number: who or what made it (a person, `chatsync sync`, `chatsync
    reextract`, `chatbase lead webhook`), and the number and its source before and after."""

    at: str
    by: str
    old: str | None
    new: str | None
    old_source: WhatsAppSource | None
    new_source: WhatsAppSource | None


class ConversationDetail(ConversationOut):
    title: str | None = Field(description="Chatbase's title of the conversation (API v2); else null")
    status: str | None = Field(
        description="ongoing, ended, taken_over (a person took over) or paused (API v2); else null"
    )
    messages: list[MessageOut]
    whatsapp_audit: list[AuditOut]


class WhatsAppUpdate(RequestBody):
    """``{"whatsapp_number": "9123 4567"}``, ``{"whatsapp_number": null}`` to clear, or ``{"auto": true}``."""

    whatsapp_number: str | None = Field(default=None, max_length=64, description="a number, or null to clear")
    auto: bool = Field(
        default=False,
        description="true: hand the number back to the other sources (chat reply > WhatsApp sender > lead > form)",
    )


# --------------------------------------------------------------------------------------------------- sync
class SyncStart(RequestBody):
    chatbot_id: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")
    since: date | None = None
    until: date | None = None


class SyncStarted(BaseModel):
    run_id: str


class SyncStatus(BaseModel):
    run_id: str
    status: str = Field(description="running, ok, partial or failed")
    summary: dict[str, Any] | None = Field(description="the `sync --json` object once finished, else null")
    error: str | None = Field(default=None, description="why a run failed or ended early")


# ---------------------------------------------------------------------------------------------- analytics
class ReportWindow(BaseModel):
    since: str | None
    until: str | None
    timezone: str


class Spread(BaseModel):
    mean: float | None
    median: float | None


class ResponseTimes(BaseModel):
    mean: float | None
    median: float | None
    p90: float | None
    pairs: int
    coverage: float | None


class FirstResponseTimes(BaseModel):
    mean: float | None
    median: float | None
    p90: float | None
    coverage: float | None


class DayCount(BaseModel):
    date: str
    conversations: int
    messages: int
    rated_up_share: float | None = Field(
        description="of that day's answers whose feedback is known; null: none"
    )
    rated_down_share: float | None


class Feedback(BaseModel):
    """Thumbs up/down on the bot's answers (API v2 data only; null where the set carries none)."""

    answers: int | None = Field(description="answers whose feedback is known, rated or not")
    rated_up: int | None
    rated_down: int | None
    rated_up_share: float | None = Field(description="rated_up ÷ answers")
    rated_down_share: float | None = Field(description="rated_down ÷ answers")
    coverage: float | None = Field(description="conversations whose answers carry feedback ÷ conversations")


class Missed(BaseModel):
    no_reply: int
    not_found: int
    ambiguous: int


class WhatsAppFunnel(BaseModel):
    prompted: int
    replied: int
    captured: int
    capture_rate: float | None
    manual: int
    from_form: int
    from_channel: int
    from_lead: int
    with_number: int
    missed: Missed
    leads: int | None = Field(
        description="lead forms received in the window (webhook or backfill); null under a source filter"
    )


class Report(BaseModel):
    """The `chatsync report --format json` object (rates are 0–1, times in seconds)."""

    window: ReportWindow
    conversations: int
    messages: int
    user_messages: int
    assistant_messages: int
    users: int
    users_coverage: float | None
    engagement_rate: float | None
    messages_per_conversation: Spread
    length_histogram: dict[str, int] = Field(description="conversations by message count: 1, 2, 3-5, …")
    response_time_seconds: ResponseTimes
    first_response_time_seconds: FirstResponseTimes
    unanswered_rate: float | None
    feedback: Feedback
    takeover_rate: float | None = Field(
        description="conversations a person took over (status taken_over) ÷ conversations with a status"
    )
    status_coverage: float | None = Field(description="conversations with a status ÷ conversations")
    by_status: dict[str, int] | None = Field(
        description="conversations per Chatbase status (ongoing, ended, taken_over, paused, …); null when "
        "none has one (API v1 data)"
    )
    by_source: dict[str, int]
    by_country: dict[str, int]
    by_phone_region: dict[str, int]
    by_day: list[DayCount]
    by_weekday_hour: list[list[int]] = Field(description="7 rows (Monday first) of 24 local hours")
    whatsapp: WhatsAppFunnel


# ------------------------------------------------------------------------------------------------- events
class ConversationUpserted(BaseModel):
    """`data` of a `conversation.upserted` event: fetch the conversation again to see what changed."""

    id: str
    chatbot_id: str
    changed_at: str = Field(description="UTC, ISO 8601 with Z")


class SyncFinished(BaseModel):
    """`data` of a `sync.finished` event."""

    run_id: str
    status: str = Field(description="ok, partial or failed")
    summary: dict[str, Any] | None


class StreamNotice(BaseModel):
    """`data` of `expired` (the token expired: reconnect with a fresh one) and `reset` (the events since the
    client's `Last-Event-ID` are no longer kept: fetch what it shows again)."""
