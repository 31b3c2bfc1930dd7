"""Clerk users as chatsync stores them, from webhooks and from the Backend API backfill."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, or_, select, update

from chatsync.normalize import unstorable
from chatsync.store.engine import insert_for
from chatsync.store.tables import users, webhook_events


class BadClerkUser(ValueError):
    """A Clerk user object chatsync cannot store (the webhook answers 400 and stores nothing)."""


def _moment(epoch_ms: object) -> datetime | None:
    """Clerk timestamps are epoch milliseconds; None when absent, BadClerkUser when not a real moment."""
    if epoch_ms is None:
        return None
    if isinstance(epoch_ms, int | float) and not isinstance(epoch_ms, bool):
        try:
            return datetime.fromtimestamp(epoch_ms / 1000, UTC)
        except (ValueError, OverflowError, OSError):
            pass
    raise BadClerkUser(f"timestamp {str(epoch_ms)[:40]!r} is not epoch milliseconds")


def _text(value: object, limit: int | None, name: str) -> str | None:
    """A string field as stored: text a database holds within the column's width, or None when absent."""
    if value is None:
        return None
    if not isinstance(value, str) or unstorable(value) or (limit is not None and len(value) > limit):
        raise BadClerkUser(f"{name} is not text of at most {limit} characters")
    return value


def event_type(event: dict[str, Any]) -> str:
    """The event's ``type`` (``user.created``…), as recorded with its delivery; BadClerkUser when it is not
    short text a database holds."""
    kind = _text(event.get("type"), 64, "type")
    if kind is None:
        raise BadClerkUser("type is missing")
    return kind


def user_row(clerk_user: dict[str, Any]) -> dict[str, Any]:
    """The stored fields of a Clerk user object (webhook ``data`` or a Backend API list item)."""
    primary = clerk_user.get("primary_email_address_id")
    email = None
    addresses = clerk_user.get("email_addresses") or []
    if not isinstance(addresses, list):
        raise BadClerkUser("email_addresses is not a list")
    for address in addresses:
        if isinstance(address, dict) and (address.get("id") == primary or email is None):
            email = address.get("email_address")
            if address.get("id") == primary:
                break
    return {
        "id": _text(clerk_user["id"], 64, "id"),
        "email": _text(email, 320, "email"),
        "first_name": _text(clerk_user.get("first_name"), 200, "first_name"),
        "last_name": _text(clerk_user.get("last_name"), 200, "last_name"),
        "image_url": _text(clerk_user.get("image_url"), None, "image_url"),
        "clerk_created_at": _moment(clerk_user.get("created_at")),
        "clerk_updated_at": _moment(clerk_user.get("updated_at")),
    }


def upsert_user(connection: Connection, clerk_user: dict[str, Any]) -> bool:
    """Insert or update a user unless what is stored is newer; returns whether anything was written."""
    row = user_row(clerk_user)
    statement = insert_for(connection, users).values(**row, deleted_at=None)
    newer = or_(
        users.c.clerk_updated_at.is_(None),
        statement.excluded.clerk_updated_at.is_(None),
        users.c.clerk_updated_at <= statement.excluded.clerk_updated_at,
    )
    statement = statement.on_conflict_do_update(
        index_elements=["id"],
        set_={k: statement.excluded[k] for k in row if k != "id"},
        where=newer,
    )
    # RETURNING, not rowcount: psycopg reports -1 for INSERT … ON CONFLICT here
    return connection.execute(statement.returning(users.c.id)).first() is not None


def mark_deleted(connection: Connection, user_id: str, when: datetime) -> None:
    connection.execute(update(users).where(users.c.id == user_id).values(deleted_at=when))
    if not connection.execute(select(users.c.id).where(users.c.id == user_id)).first():
        connection.execute(users.insert().values(id=user_id, deleted_at=when))


def first_delivery(connection: Connection, event_id: str, event_type: str, now: datetime) -> bool:
    """Record a webhook delivery; False when this svix-id was already handled (a redelivery)."""
    statement = insert_for(connection, webhook_events).values(id=event_id, type=event_type, received_at=now)
    inserted = connection.execute(statement.on_conflict_do_nothing().returning(webhook_events.c.id)).first()
    return inserted is not None


def apply_clerk_event(connection: Connection, event: dict[str, Any], now: datetime) -> str:
    """Apply a ``user.*`` event; returns what happened, for the response and the logs."""
    kind = event.get("type")
    data = event.get("data") or {}
    if not isinstance(data, dict) or not data.get("id"):
        return "ignored: no user id"
    if kind in ("user.created", "user.updated"):
        return "stored" if upsert_user(connection, data) else "ignored: older than what is stored"
    if kind == "user.deleted":
        user_id = _text(data["id"], 64, "id")
        assert user_id is not None
        mark_deleted(connection, user_id, _moment(event.get("timestamp")) or now)
        return "deleted"
    return f"ignored: {kind}"
