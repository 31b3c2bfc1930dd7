"""The WhatsApp audit trail: every change of a conversation's stored number, whoever or whatever made it.

A person (``set-whatsapp``, the API), a lead form arriving, a sync that rewrites a changed conversation
and ``reextract`` all write here, in the transaction that changes the number; ``new_source`` names where
the new number came from (``manual``, ``extracted``, ``channel``, ``lead``, ``form``). A conversation's
first number, stored with it when it is first synced, is where the trail starts, not a change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from chatsync.store.tables import whatsapp_audit

# Who made an automatic change, as the audit trail names it.
BY_SYNC = "chatsync sync"
BY_REEXTRACT = "chatsync reextract"
BY_LEAD_WEBHOOK = "chatbase lead webhook"


@dataclass(frozen=True)
class WhatsAppChange:
    """A conversation's stored number and its source, before and after a write."""

    conversation_id: str
    old: str | None
    new: str | None
    old_source: str | None
    new_source: str | None

    @property
    def changed(self) -> bool:
        return (self.old, self.old_source) != (self.new, self.new_source)


def changes_between(
    before: Iterable[Mapping[Any, Any]], after: Iterable[Mapping[Any, Any]]
) -> list[WhatsAppChange]:
    """The changed numbers between stored rows (with ``id``, ``whatsapp_number``, ``whatsapp_source``)
    before and after a write, in the order of ``after``."""
    old = {row["id"]: (row["whatsapp_number"], row["whatsapp_source"]) for row in before}
    found = []
    for row in after:
        if row["id"] not in old:
            continue
        number, source = old[row["id"]]
        change = WhatsAppChange(row["id"], number, row["whatsapp_number"], source, row["whatsapp_source"])
        if change.changed:
            found.append(change)
    return found


def record_changes(connection: Connection, changes: Iterable[WhatsAppChange], by: str, now: datetime) -> None:
    """Append the changes that changed something to the audit trail, made by ``by`` at ``now``."""
    rows = [
        {
            "conversation_id": change.conversation_id,
            "at": now,
            "by": by,
            "old": change.old,
            "new": change.new,
            "old_source": change.old_source,
            "new_source": change.new_source,
        }
        for change in changes
        if change.changed
    ]
    if rows:
        connection.execute(whatsapp_audit.insert(), rows)
