"""Webhooks: Clerk user events through Svix (``POST /api/webhooks/clerk``) and Chatbase lead forms
(``POST /api/webhooks/chatbase``); redeliveries and older updates change nothing.

No ``from __future__ import annotations``: FastAPI reads these signatures at runtime.
"""

import json

from fastapi import APIRouter, Request
from pydantic import BaseModel

from chatsync.timeutil import utcnow
from chatsync.web.deps import EngineDep, SettingsDep
from chatsync.web.errors import ApiError, declared

router = APIRouter(tags=["webhooks"])


class WebhookResult(BaseModel):
    result: str


@router.post("/api/webhooks/clerk", response_model=WebhookResult, responses=declared(400))
async def receive_clerk_webhook(request: Request, engine: EngineDep, settings: SettingsDep) -> WebhookResult:
    """Clerk `user.created`, `user.updated` and `user.deleted`, verified with the Svix signature."""
    from anyio import to_thread
    from svix.webhooks import Webhook, WebhookVerificationError

    from chatsync.store.users import BadClerkUser, apply_clerk_event, first_delivery

    if not settings.clerk_webhook_secret:
        raise ApiError(400, "webhook_not_configured", "CLERK_WEBHOOK_SIGNING_SECRET is not set")
    body = await request.body()
    headers = {k.lower(): v for k, v in request.headers.items()}
    try:
        Webhook(settings.clerk_webhook_secret.reveal()).verify(body, headers)
    except (WebhookVerificationError, ValueError, TypeError):
        raise ApiError(400, "invalid_signature", "the webhook signature does not verify") from None
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_payload", "the body is not JSON chatsync can read") from None
    if not isinstance(event, dict):
        raise ApiError(400, "invalid_payload", "expected a JSON object")

    def store() -> str:
        with engine.begin() as connection:
            if not first_delivery(
                connection, headers.get("svix-id", "")[:128], str(event.get("type"))[:64], utcnow()
            ):
                return "duplicate"
            return apply_clerk_event(connection, event, utcnow())

    try:
        return WebhookResult(result=await to_thread.run_sync(store))
    except BadClerkUser as exc:  # nothing was stored: the transaction rolled back
        raise ApiError(400, "invalid_payload", f"not a Clerk user chatsync can store: {exc}") from None


@router.post("/api/webhooks/chatbase", response_model=WebhookResult, responses=declared(400))
async def receive_chatbase_webhook(
    request: Request, engine: EngineDep, settings: SettingsDep
) -> WebhookResult:
    """Chatbase `leads.submit`, verified with `x-chatbase-signature` (hex HMAC-SHA1 of the raw body keyed
    with `CHATBASE_WEBHOOK_SECRET`). `result`: `applied` (the lead's phone is now known to its
    conversation), `pending` (its conversation is not synced yet; the sync that stores it applies the lead),
    `stored` (kept and counted, nothing to apply), `duplicate` (a redelivery: nothing changed) or
    `ignored: <eventType>` for other events. A bad or missing signature, or a body that is not a lead, is a
    400 and stores nothing."""
    from anyio import to_thread

    from chatsync.errors import BadLead
    from chatsync.leads import SIGNATURE_HEADER, lead_from_webhook, signature_matches
    from chatsync.store.leads import receive_webhook_lead

    if not settings.chatbase_webhook_secret:
        raise ApiError(400, "webhook_not_configured", "CHATBASE_WEBHOOK_SECRET is not set")
    body = await request.body()
    if not signature_matches(
        body, request.headers.get(SIGNATURE_HEADER), settings.chatbase_webhook_secret.reveal()
    ):
        raise ApiError(400, "invalid_signature", "the webhook signature does not verify")
    now = utcnow()
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):  # undecodable bytes and bad JSON are ValueErrors
        raise ApiError(400, "invalid_payload", "not a Chatbase lead: the body is not JSON") from None
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
