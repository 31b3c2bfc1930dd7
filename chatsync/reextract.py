"""Apply the WhatsApp rule again to stored conversations, after the rule or its settings changed.

Nothing is fetched from Chatbase: the stored messages, form phone, source and sender fields, and the
phones of the conversations' lead forms are enough. The number in force follows by precedence; manual
numbers stay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select

from chatsync.config import WhatsAppRule
from chatsync.normalize import find_whatsapp
from chatsync.store import leads
from chatsync.store.audit import BY_REEXTRACT
from chatsync.store.tables import conversations as c
from chatsync.store.writes import apply_rule_results
from chatsync.timeutil import utcnow
from chatsync.whatsapp import MANUAL, form_number, number_in_force

RULE_COLUMNS = ("wa_outcome", "wa_extracted", "wa_form", "wa_channel", "wa_matched", "wa_reasons", "wa_lead")


@dataclass
class ReextractCounts:
    examined: int = 0
    changed: int = 0
    numbers_changed: int = 0


def count_conversations(engine: Engine, chatbot_ids: tuple[str, ...] = ()) -> int:
    """How many stored conversations a re-extraction of ``chatbot_ids`` (all when empty) examines."""
    from sqlalchemy import func

    statement = select(func.count()).select_from(c)
    if chatbot_ids:
        statement = statement.where(c.c.chatbot_id.in_(chatbot_ids))
    with engine.connect() as connection:
        return int(connection.execute(statement).scalar_one())


def reextract(
    engine: Engine,
    rule: WhatsAppRule,
    chatbot_ids: tuple[str, ...] = (),
    batch_size: int = 1000,
    progress: Callable[[ReextractCounts], None] | None = None,
) -> ReextractCounts:
    """Re-run extraction in batches (keyset on id, bounded memory); rewrite only what changed."""
    counts = ReextractCounts()
    after = ""
    columns = [
        c.c.id,
        c.c.chatbot_id,
        c.c.messages,
        c.c.raw,
        c.c.whatsapp_number,
        c.c.whatsapp_source,
        *[c.c[k] for k in RULE_COLUMNS],
    ]
    while True:
        statement = select(*columns).where(c.c.id > after).order_by(c.c.id).limit(batch_size)
        if chatbot_ids:
            statement = statement.where(c.c.chatbot_id.in_(chatbot_ids))
        with engine.begin() as connection:
            leads.hold_against_leads(connection)  # so no lead arrives between reading and rewriting
            rows = connection.execute(statement).mappings().all()
            if not rows:
                return counts
            lead_numbers = leads.renormalized_numbers(
                connection, [row["id"] for row in rows], lambda phone: form_number(phone, rule)
            )
            changed: list[dict[str, Any]] = []
            for row in rows:
                raw = row["raw"] if isinstance(row["raw"], dict) else {}
                messages = row["messages"] if isinstance(row["messages"], list) else []
                finding = find_whatsapp(messages, raw, rule)
                lead = leads.latest_number(lead_numbers.get(row["id"], []), row["chatbot_id"])
                fresh = {
                    "wa_outcome": finding.outcome,
                    "wa_extracted": finding.extracted,
                    "wa_form": finding.form,
                    "wa_channel": finding.channel,
                    "wa_matched": finding.matched,
                    "wa_reasons": finding.reasons or None,
                    "wa_lead": lead,
                }
                if all(fresh[k] == row[k] for k in RULE_COLUMNS):
                    continue
                changed.append({"id": row["id"], **fresh})
                number, _ = number_in_force(
                    extracted=finding.extracted,
                    channel=finding.channel,
                    lead=lead,
                    form=finding.form,
                )
                if row["whatsapp_source"] != MANUAL and row["whatsapp_number"] != number:
                    counts.numbers_changed += 1
            if changed:
                apply_rule_results(connection, changed, utcnow(), RULE_COLUMNS, by=BY_REEXTRACT)
        counts.examined += len(rows)
        counts.changed += len(changed)
        after = rows[-1]["id"]
        if progress:
            progress(counts)
