"""``POST /api/webhooks/clerk``: Clerk user events through Svix; redeliveries and older updates change nothing.

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

    from chatsync.store.users import apply_clerk_event, first_delivery

    if not settings.clerk_webhook_secret:
        raise ApiError(400, "webhook_not_configured", "CLERK_WEBHOOK_SIGNING_SECRET is not set")
    body = await request.body()
    headers = {k.lower(): v for k, v in request.headers.items()}
    try:
        Webhook(settings.clerk_webhook_secret.reveal()).verify(body, headers)
        event = json.loads(body)
    except (WebhookVerificationError, ValueError, TypeError):
        raise ApiError(400, "invalid_signature", "the webhook signature does not verify") from None
    if not isinstance(event, dict):
        raise ApiError(400, "invalid_payload", "expected a JSON object")

    def store() -> str:
        with engine.begin() as connection:
            if not first_delivery(connection, headers.get("svix-id", ""), str(event.get("type")), utcnow()):
                return "duplicate"
            return apply_clerk_event(connection, event, utcnow())

    return WebhookResult(result=await to_thread.run_sync(store))
