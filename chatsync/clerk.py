"""Clerk's Backend API, for backfilling users (``chatsync users sync``). No SQL here."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx

from chatsync.config import Secret
from chatsync.errors import ConfigError

CLERK_API = "https://api.clerk.com/v1"
PAGE = 500  # Clerk's maximum


def fetch_clerk_users(
    secret_key: Secret, base_url: str = CLERK_API, transport: httpx.BaseTransport | None = None
) -> Iterator[dict[str, Any]]:
    """Every user of the Clerk instance, page by page (limit 500, offset)."""
    headers = {"Authorization": f"Bearer {secret_key.reveal()}"}
    with httpx.Client(
        base_url=base_url.rstrip("/") + "/", headers=headers, transport=transport, timeout=30
    ) as http:
        offset = 0
        while True:
            response = http.get("users", params={"limit": PAGE, "offset": offset, "order_by": "created_at"})
            if response.status_code in (401, 403):
                raise ConfigError("Clerk refused CLERK_SECRET_KEY: copy the secret key of this instance")
            response.raise_for_status()
            body = response.json()
            users = body.get("data", []) if isinstance(body, dict) else body
            yield from users
            if len(users) < PAGE:
                return
            offset += PAGE
