"""Syncs started through the API (``POST /api/sync``), each on a background thread, one per chatbot.

The chatbot's sync lock is taken in the request, so a chatbot already syncing (here or from cron) is a 409
at once, and it is held from that check to the end of the run: nothing can take the lock in between and
leave the run waiting. A run that still cannot start or finish says so: ``failed``, with the reason.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from contextlib import ExitStack
from typing import Any

from sqlalchemy import Engine, select

from chatsync.config import Settings
from chatsync.errors import ChatsyncError, LockHeld
from chatsync.store.tables import sync_runs
from chatsync.web.schemas import SyncStart, SyncStatus

log = logging.getLogger("chatsync.web.sync")


class SyncRunner:
    """Starts syncs in the background and answers their status from ``sync_runs``."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self._running: dict[str, str] = {}  # chatbot id → run id
        self._threads: dict[str, threading.Thread] = {}  # run id → its thread
        self._ended: dict[str, SyncStatus] = {}  # runs that ended without a row (the database was gone)
        self._guard = threading.Lock()

    def start(self, request: SyncStart) -> str:
        """The run id of a sync now running; LockHeld (→ 409) if the chatbot is syncing already,
        MissingSetting (→ 503) without a Chatbase key."""
        from chatsync.chatbase import open_client
        from chatsync.store.locks import chatbot_lock
        from chatsync.sync import Syncer, SyncRequest

        self.settings.require_api_key()
        with self._guard:
            if request.chatbot_id in self._running:
                raise LockHeld(request.chatbot_id)
            client = open_client(self.settings)
            held = ExitStack()
            held.callback(client.close)
            try:
                # Taken here and held until the run ends (LockHeld → 409); a lease lost mid-run stops it.
                held.enter_context(
                    chatbot_lock(self.engine, request.chatbot_id, on_lost=lambda _exc: client.stop.set())
                )
                syncer = Syncer(self.engine, client, self.settings.whatsapp, self.settings.concurrency)
                job = SyncRequest(
                    (request.chatbot_id,), request.since, request.until, lookback=self.settings.lookback
                )
                context = contextvars.copy_context()  # the sync's log lines carry the request id
                thread = threading.Thread(
                    target=context.run,
                    args=(self._run, syncer, job, client, held),
                    name=f"chatsync-api-sync-{syncer.run_id[:8]}",
                    daemon=True,
                )
                self._running[request.chatbot_id] = syncer.run_id
                self._threads[syncer.run_id] = thread
                thread.start()
            except BaseException:
                self._running.pop(request.chatbot_id, None)
                held.close()
                raise
        return syncer.run_id

    def _run(self, syncer: Any, job: Any, client: Any, held: ExitStack) -> None:
        chatbot_id = job.chatbot_ids[0]
        error: BaseException | None = None
        try:
            syncer.run(job, locked=True)
        except ChatsyncError as exc:
            error = exc
            log.warning("sync %s of %s ended early: %s", syncer.run_id, chatbot_id, exc)
        except Exception as exc:
            error = exc
            log.exception("sync %s of %s failed", syncer.run_id, chatbot_id)
        finally:
            client.close()
            held.close()
            if self._row(syncer.run_id) is None:
                self._record_failure(syncer, chatbot_id, error)
            with self._guard:
                self._running.pop(chatbot_id, None)

    def _record_failure(self, syncer: Any, chatbot_id: str, error: BaseException | None) -> None:
        """A run that ended before recording itself (the database refused its row) ends ``failed``."""
        from chatsync.store.writes import record_failed_run
        from chatsync.timeutil import utcnow

        reason = str(error) if error else "the sync ended before it started"
        summary = {**syncer.summary.as_dict(), "status": "failed", "chatbots": [chatbot_id]}
        try:
            with self.engine.begin() as connection:
                record_failed_run(connection, syncer.run_id, [chatbot_id], summary, reason, utcnow())
        except Exception:
            self._ended[syncer.run_id] = SyncStatus(
                run_id=syncer.run_id, status="failed", summary=summary, error=reason
            )

    def chatbot_ids(self, run_id: str) -> list[str] | None:
        """The chatbots a run syncs (from its row, or the one this server started), None if unknown."""
        row = self._row(run_id)
        if row is not None:
            return list(row["chatbot_ids"] or [])
        with self._guard:
            return [bot for bot, run in self._running.items() if run == run_id] or None

    def _row(self, run_id: str) -> Any:
        try:
            with self.engine.connect() as connection:
                return (
                    connection.execute(select(sync_runs).where(sync_runs.c.id == run_id)).mappings().first()
                )
        except Exception:
            return None

    def status(self, run_id: str) -> SyncStatus | None:
        """The run's status, or None for a run id this database and server do not know."""
        row = self._row(run_id)
        if row is None:
            if run_id in self._ended:
                return self._ended[run_id]
            thread = self._threads.get(run_id)
            if thread is not None and thread.is_alive():
                return SyncStatus(run_id=run_id, status="running", summary=None)
            return None
        status = {"running": "running", "ok": "ok", "partial": "partial"}.get(row["status"], "failed")
        thread = self._threads.get(run_id)
        if status == "running" and thread is not None and not thread.is_alive():
            # it ended here without recording how: the database went away at the end
            return SyncStatus(
                run_id=run_id, status="failed", summary=None, error="the run ended without recording its end"
            )
        return SyncStatus(
            run_id=run_id,
            status=status,
            summary=row["summary"] if status != "running" else None,
            error=row["error"],
        )
