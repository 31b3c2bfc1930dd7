"""Apply the WhatsApp rule again to stored conversations, after the rule or its settings changed.

Nothing is fetched from Chatbase: the stored messages and form phone are enough. Manual numbers stay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select

from chatsync.config import WhatsAppRule
from chatsync.normalize import find_whatsapp
from chatsync.store.tables import conversations as c
from chatsync.store.writes import apply_rule_results
from chatsync.timeutil import utcnow
from chatsync.whatsapp import region_of

RULE_COLUMNS = ("wa_outcome", "wa_extracted", "wa_form", "wa_matched", "wa_reasons")


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
            rows = connection.execute(statement).mappings().all()
            if not rows:
                return counts
            changed: list[dict[str, Any]] = []
            for row in rows:
                form = row["raw"].get("form_submission") if isinstance(row["raw"], dict) else None
                messages = row["messages"] if isinstance(row["messages"], list) else []
                finding = find_whatsapp(messages, form.get("phone") if isinstance(form, dict) else None, rule)
                fresh = {
                    "wa_outcome": finding.outcome,
                    "wa_extracted": finding.extracted,
                    "wa_form": finding.form,
                    "wa_matched": finding.matched,
                    "wa_reasons": finding.reasons or None,
                }
                if all(fresh[k] == row[k] for k in RULE_COLUMNS):
                    continue
                changed.append(
                    {
                        "id": row["id"],
                        **fresh,
                        "auto_number": finding.number,
                        "auto_source": finding.source,
                        "auto_region": region_of(finding.number) if finding.number else None,
                    }
                )
                if row["whatsapp_source"] != "manual" and row["whatsapp_number"] != finding.number:
                    counts.numbers_changed += 1
            if changed:
                apply_rule_results(connection, changed, utcnow(), RULE_COLUMNS)
        counts.examined += len(rows)
        counts.changed += len(changed)
        after = rows[-1]["id"]
        if progress:
            progress(counts)
