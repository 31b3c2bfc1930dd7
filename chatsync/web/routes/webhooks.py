"""Webhooks: Clerk user events through Svix (``POST /api/webhooks/clerk``) and Chatbase lead forms
(``POST /api/webhooks/chatbase``); redeliveries and older updates change nothing.

No ``from __future__ import annotations``: FastAPI reads these signatures at runtime.
"""

from fastapi import APIRouter, Request
from pydantic import BaseModel

from chatsync.jsonbody import strict_json
from chatsync.timeutil import utcnow
from chatsync.web.deps import EngineDep, SettingsDep
from chatsync.web.errors import ApiError, declared

router = APIRouter(tags=["webhooks"])
MAX_WEBHOOK_BYTES = 1_000_000  # a lead or a Clerk user is a few kB; more is refused before it is read


async def _body(request: Request) -> bytes:
    """The raw body, at most MAX_WEBHOOK_BYTES: anyone can post to a webhook before its signature is
    checked, so what is read is bounded (413 past the bound, by ``Content-Length`` or by what arrives)."""
    too_large = ApiError(413, "payload_too_large", f"a webhook body is at most {MAX_WEBHOOK_BYTES} bytes")
    declared_length = request.headers.get("content-length", "")
    if declared_length.isdigit() and int(declared_length) > MAX_WEBHOOK_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_WEBHOOK_BYTES:
            raise too_large
    return bytes(body)


class WebhookResult(BaseModel):
    result: str


@router.post("/api/webhooks/clerk", response_model=WebhookResult, responses=declared(400, 413))
async def receive_clerk_webhook(request: Request, engine: EngineDep, settings: SettingsDep) -> WebhookResult:
    """Clerk `user.created`, `user.updated` and `user.deleted`, verified with the Svix signature."""
    from anyio import to_thread
    from svix.webhooks import Webhook, WebhookVerificationError

    from chatsync.store.users import BadClerkUser, apply_clerk_event, event_type, first_delivery

    if not settings.clerk_webhook_secret:
        raise ApiError(400, "webhook_not_configured", "CLERK_WEBHOOK_SIGNING_SECRET is not set")
    body = await _body(request)
    headers = {k.lower(): v for k, v in request.headers.items()}
    try:
        Webhook(settings.clerk_webhook_secret.reveal()).verify(body, headers)
    except (WebhookVerificationError, ValueError, TypeError):
        raise ApiError(400, "invalid_signature", "the webhook signature does not verify") from None
    try:
        event = strict_json(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_payload", "the body is not JSON chatsync can read") from None
    if not isinstance(event, dict):
        raise ApiError(400, "invalid_payload", "expected a JSON object")

    def store() -> str:
        with engine.begin() as connection:
            if not first_delivery(connection, headers.get("svix-id", "")[:128], event_type(event), utcnow()):
                return "duplicate"
            return apply_clerk_event(connection, event, utcnow())

    try:
        return WebhookResult(result=await to_thread.run_sync(store))
    except BadClerkUser as exc:  # nothing was stored: the transaction rolled back
        raise ApiError(400, "invalid_payload", f"not a Clerk user chatsync can store: {exc}") from None


@router.post("/api/webhooks/chatbase", response_model=WebhookResult, responses=declared(400, 413))
async def receive_chatbase_webhook(
    request: Request, engine: EngineDep, settings: SettingsDep
) -> WebhookResult:
    """Chatbase `leads.submit`, verified with `x-chatbase-signature` (hex HMAC-SHA1 of the raw body keyed
    with `CHATBASE_WEBHOOK_SECRET`). `result`: `applied` (the lead's phone is now known to its
    conversation), `pending` (its conversation is not synced yet; the sync that stores it applies the lead),
    `stored` (kept and counted, nothing to apply), `duplicate` (a redelivery: nothing changed) or
    `ignored: <eventType>` for other events. A bad or missing signature, or a body that is not a lead, is a
    400 and stores nothing; a body over 1 MB is a 413. Text no database holds (NUL, lone surrogates) is
    stored as U+FFFD."""
    from anyio import to_thread

    from chatsync.errors import BadLead
    from chatsync.leads import SIGNATURE_HEADER, lead_from_webhook, signature_matches
    from chatsync.store.leads import receive_webhook_lead

    if not settings.chatbase_webhook_secret:
        raise ApiError(400, "webhook_not_configured", "CHATBASE_WEBHOOK_SECRET is not set")
    body = await _body(request)
    if not signature_matches(
        body, request.headers.get(SIGNATURE_HEADER), settings.chatbase_webhook_secret.reveal()
    ):
        raise ApiError(400, "invalid_signature", "the webhook signature does not verify")
    now = utcnow()
    try:
        event = strict_json(body)
    except (ValueError, RecursionError):  # undecodable bytes, bad JSON and NaN are ValueErrors
        raise ApiError(400, "invalid_payload", "not a Chatbase lead: the body is not standard JSON") from None
    try:
        lead = lead_from_webhook(event, settings.whatsapp, now)
    except BadLead as exc:
        raise ApiError(400, "invalid_payload", f"not a Chatbase lead: {exc.reason}") from None
    if lead is None:
        return WebhookResult(result=f"ignored: {str(event['eventType'])[:64]}")

    def store() -> str:
        with engine.begin() as connection:
            return receive_webhook_lead(connection, lead, now)

    return WebhookResult(result=await to_thread.run_sync(store))
