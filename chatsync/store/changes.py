"""The change log: what the writers changed, in commit order, for the HTTP API's event streams.

Every writer appends its changes here in the transaction that makes them (``upsert_conversations``,
``apply_rule_results``, ``set_whatsapp``, a lead applied by ``receive_webhook_lead``, ``finish_run``), so a
change is in the log exactly when it is in the data. Readers follow ``seq`` as a cursor, which is only sound if a change with a smaller ``seq`` can
never become visible after one with a larger ``seq``:

* PostgreSQL hands out ``seq`` when a row is inserted, not when its transaction commits, so appending
  takes a transaction-level advisory lock first. The appends of concurrent writers then commit in
  ``seq`` order; the lock is held from the append to the commit, which is why writers append last.
  A transaction-level lock also works behind a transaction pooler.
* SQLite has one writer at a time, holding the database's write lock until it commits.

On PostgreSQL an append also sends ``NOTIFY chatsync_changes`` (delivered at commit), which wakes the API's
change feed at once; polling remains the fallback.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, select, text

from chatsync.store.tables import changes, sync_runs

CONVERSATION_UPSERTED = "conversation.upserted"
SYNC_FINISHED = "sync.finished"
NOTIFY_CHANNEL = "chatsync_changes"
RETENTION = timedelta(days=7)
_APPEND_LOCK = 0x63686174_6C6F6721  # "chat" "log!": one appender at a time on PostgreSQL


@dataclass(frozen=True)
class Change:
    """One row of the change log; ``run`` is the sync run's row for ``sync.finished``."""

    seq: int
    kind: str
    subject: str
    chatbot_id: str | None
    at: datetime
    run: dict[str, Any] | None = None

    def chatbot_ids(self) -> list[str]:
        """The chatbots this change concerns (a sync run may cover several)."""
        if self.run is not None:
            return list(self.run.get("chatbot_ids") or [])
        return [self.chatbot_id] if self.chatbot_id else []


def _append(connection: Connection, kind: str, items: list[tuple[str, str | None]], at: datetime) -> None:
    """Append one change of ``kind`` per ``(subject, chatbot id)``, in that order, all made ``at``.

    On PostgreSQL it is one statement, one round trip: the append lock (the ``held`` row must be read
    before any row is formed, so before ``seq`` is drawn), the ``NOTIFY`` (delivered at commit), and the
    rows as two arrays through ``unnest``. A sync page's 100 rows took a fifth of the writer's time as a
    lock, a pipelined ``executemany`` of 100 inserts and a notify.
    """
    if not items:
        return
    if connection.dialect.name == "postgresql":
        connection.execute(
            text(
                "WITH held AS (SELECT pg_advisory_xact_lock(:k), pg_notify(:channel, '')) "
                "INSERT INTO changes (kind, subject, chatbot_id, at) SELECT :kind, s, b, :at "
                "FROM held, unnest(CAST(:subjects AS text[]), CAST(:chatbots AS text[])) AS u(s, b)"
            ).bindparams(bindparam("at", type_=changes.c.at.type)),
            {
                "k": _APPEND_LOCK,
                "channel": NOTIFY_CHANNEL,
                "kind": kind,
                "at": at,
                "subjects": [subject for subject, _ in items],
                "chatbots": [chatbot for _, chatbot in items],
            },
        )
    else:
        encode = changes.c.at.type.dialect_impl(connection.dialect).bind_processor(connection.dialect)
        stamp = encode(at) if encode is not None else at  # the text SQLAlchemy itself stores
        connection.exec_driver_sql(
            "INSERT INTO changes (kind, subject, chatbot_id, at) VALUES (?, ?, ?, ?)",
            [(kind, subject, chatbot, stamp) for subject, chatbot in items],
        )


def record_conversations(connection: Connection, items: Iterable[tuple[str, str]], now: datetime) -> None:
    """Log that these ``(conversation id, chatbot id)`` were written; call it last in the transaction."""
    _append(connection, CONVERSATION_UPSERTED, list(dict.fromkeys(items)), now)


def record_sync_finished(connection: Connection, run_id: str, now: datetime) -> None:
    """Log that a sync run ended (its row in ``sync_runs`` says how); call it last in the transaction."""
    _append(connection, SYNC_FINISHED, [(run_id, None)], now)


def read_changes(connection: Connection, after: int, limit: int) -> list[Change]:
    """Up to ``limit`` changes with ``seq > after``, oldest first, each sync run's row attached."""
    rows = connection.execute(
        select(
            changes,
            sync_runs.c.chatbot_ids,
            sync_runs.c.status,
            sync_runs.c.summary,
        )
        .select_from(
            changes.outerjoin(
                sync_runs, and_(changes.c.kind == SYNC_FINISHED, sync_runs.c.id == changes.c.subject)
            )
        )
        .where(changes.c.seq > after)
        .order_by(changes.c.seq)
        .limit(limit)
    ).all()
    return [
        Change(
            seq=int(r.seq),
            kind=r.kind,
            subject=r.subject,
            chatbot_id=r.chatbot_id,
            at=r.at,
            run=(
                {"chatbot_ids": r.chatbot_ids or [], "status": r.status, "summary": r.summary}
                if r.kind == SYNC_FINISHED
                else None
            ),
        )
        for r in rows
    ]


def bounds(connection: Connection) -> tuple[int, int]:
    """The smallest and largest ``seq`` still in the log; ``(0, 0)`` when it is empty."""
    low, high = connection.execute(select(func.min(changes.c.seq), func.max(changes.c.seq))).one()
    return int(low or 0), int(high or 0)


def prune(connection: Connection, now: datetime, keep: timedelta = RETENTION) -> int:
    """Forget changes older than ``keep``, but never the newest one (it tells readers where the log is)."""
    newest = connection.execute(select(func.max(changes.c.seq))).scalar()
    if newest is None:
        return 0
    result = connection.execute(changes.delete().where(changes.c.at < now - keep, changes.c.seq < newest))
    return int(result.rowcount or 0)


def conversation_items(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(id, chatbot_id)`` of written conversation rows, for :func:`record_conversations`."""
    return [(r["id"], r["chatbot_id"]) for r in rows]
