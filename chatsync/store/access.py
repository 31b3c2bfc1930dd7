"""Who may see which chatbot: grants to Clerk users and organizations, and admins.

Signing in is not enough (Clerk may let anyone sign up and conversations hold phone numbers): a caller
sees the chatbots granted to them or to the organization in their token, and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, delete, or_, select

from chatsync.errors import UsageError
from chatsync.store.engine import insert_for
from chatsync.store.tables import access_grants

PRINCIPAL_TYPES = ("user", "org")


@dataclass(frozen=True)
class Caller:
    """A signed-in person as their session token describes them."""

    user_id: str
    org_id: str | None = None
    org_role: str | None = None


@dataclass(frozen=True)
class Access:
    """What a caller may see (``visible`` None means everything) and which chatbots they may sync."""

    visible: tuple[str, ...] | None
    administers: tuple[str, ...] | None

    def may_sync(self, chatbot_id: str) -> bool:
        return self.administers is None or chatbot_id in self.administers


def grant(
    connection: Connection, chatbot_id: str, principal_type: str, principal_id: str, now: datetime
) -> bool:
    """Grant a chatbot; returns False when the grant already existed."""
    _check(principal_type, principal_id)
    statement = insert_for(connection, access_grants).values(
        chatbot_id=chatbot_id, principal_type=principal_type, principal_id=principal_id, granted_at=now
    )
    # RETURNING, not rowcount: psycopg reports -1 for INSERT … ON CONFLICT here
    return (
        connection.execute(statement.on_conflict_do_nothing().returning(access_grants.c.chatbot_id)).first()
        is not None
    )


def revoke(connection: Connection, chatbot_id: str, principal_type: str, principal_id: str) -> bool:
    _check(principal_type, principal_id)
    removed = connection.execute(
        delete(access_grants)
        .where(
            and_(
                access_grants.c.chatbot_id == chatbot_id,
                access_grants.c.principal_type == principal_type,
                access_grants.c.principal_id == principal_id,
            )
        )
        .returning(access_grants.c.chatbot_id)
    ).first()
    return removed is not None


def list_grants(connection: Connection) -> list[dict[str, Any]]:
    rows = connection.execute(
        select(access_grants).order_by(
            access_grants.c.chatbot_id, access_grants.c.principal_type, access_grants.c.principal_id
        )
    ).mappings()
    return [dict(r) for r in rows]


def access_for(connection: Connection, caller: Caller, admin_user_ids: Iterable[str]) -> Access:
    """Chatbots a caller sees and administers (org admins administer their organization's chatbots)."""
    if caller.user_id in set(admin_user_ids):
        return Access(visible=None, administers=None)
    principals = [
        and_(access_grants.c.principal_type == "user", access_grants.c.principal_id == caller.user_id)
    ]
    if caller.org_id:
        principals.append(
            and_(access_grants.c.principal_type == "org", access_grants.c.principal_id == caller.org_id)
        )
    rows = connection.execute(
        select(access_grants.c.chatbot_id, access_grants.c.principal_type).where(or_(*principals))
    ).all()
    visible = tuple(sorted({r.chatbot_id for r in rows}))
    is_org_admin = caller.org_role in ("org:admin", "admin")
    administers = tuple(sorted({r.chatbot_id for r in rows if r.principal_type == "org" and is_org_admin}))
    return Access(visible=visible, administers=administers)


def _check(principal_type: str, principal_id: str) -> None:
    if principal_type not in PRINCIPAL_TYPES or not principal_id.strip():
        raise UsageError("give --user USER_ID or --org ORG_ID")
