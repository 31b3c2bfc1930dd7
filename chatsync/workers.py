"""Reading pages in worker processes, so the sync's one writer thread only writes.

The WhatsApp rule, the canonical JSON and its hash cost more than everything else a sync does to a
conversation, and they hold Python's GIL: a thread cannot run them beside the writer. Worker processes
can, on the other cores. :func:`read_page` is what a worker runs (no I/O): the body of one
``get-conversations`` answer in, one :class:`Outcome` per record out, with the row's big JSON columns
already encoded so the writer only passes the text to the database. Whatever goes wrong with one
record becomes that record's outcome; nothing a record holds can make a worker raise.

:class:`ReaderPool` runs :func:`read_page` in processes made by a fork server (clean processes that
preload this module once, however many threads the sync runs), or in the calling thread when the
machine has one core.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import date
from multiprocessing.connection import wait
from typing import Any, Literal

from chatsync.chatbase_records import record_from_export
from chatsync.config import WhatsAppRule
from chatsync.errors import BadRecord
from chatsync.jsonbody import UndecodableRecord, decode_body
from chatsync.normalize import normalize_conversation, same_content, storable, stored_id
from chatsync.signals import held
from chatsync.store.writes import JsonText, encode_json, id_as_sent, quarantine_text
from chatsync.timeutil import parse_timestamp
from chatsync.worker_server import context, start_resource_tracker

log = logging.getLogger("chatsync.sync")

WORKER_NICENESS = 5  # added to the sync's own: a reader gets a third of the CPU share of the writer
POLL_SECONDS = 0.25  # how often a wait for a page's result looks for a dead worker
DEATH_GRACE_SECONDS = 2.0  # a dead worker the executor has not acted on by then: it never will


@dataclass(frozen=True)
class PageTask:
    """One page for a worker: the body as Chatbase sent it, every record of which it reads.

    ``known``: the stored content hash of the page's conversations that are stored already, so an
    unchanged one skips the rule. ``export``: the body is
    an API v2 export page, whose records are first put in the record shape chatsync reads
    (:func:`chatsync.chatbase_records.record_from_export`).
    """

    body: bytes
    known: dict[str, str]
    chatbot_id: str
    rule: WhatsAppRule
    export: bool = False


@dataclass(frozen=True)
class Outcome:
    """What reading one record gave.

    ``row``: a conversation to store (``messages`` and ``raw`` as encoded JSON text). ``unchanged``: stored
    already with the same content. ``bad``: cannot be stored; ``kept`` is the record as the quarantine
    keeps it and ``reason`` says why; ``fault`` holds the traceback when the cause was chatsync's own.
    """

    index: int
    kind: Literal["row", "unchanged", "bad"]
    conversation_id: str | None = None
    created: date | None = None
    row: dict[str, Any] | None = None
    reason: str | None = None
    kept: UndecodableRecord | None = None
    fault: str | None = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled for the trip from a worker with the row's encoded JSON as plain text: a ``JsonText``
        (a str subclass) costs pickle a Python call each way, which was half of a page's transfer (3.9 of
        6.4 ms a page, sending and receiving)."""
        row = self.row
        if row is not None:
            row = {**row, "messages": str(row["messages"]), "raw": str(row["raw"])}
        fields = (self.conversation_id, self.created, row, self.reason, self.kept, self.fault)
        return (_received, (self.index, self.kind, *fields))


def _received(index: int, kind: Literal["row", "unchanged", "bad"], *fields: Any) -> Outcome:
    """An :class:`Outcome` as it arrives from a worker (see :meth:`Outcome.__reduce__`)."""
    outcome = Outcome(index, kind, *fields)
    if outcome.row is not None:
        outcome.row["messages"] = JsonText(outcome.row["messages"])
        outcome.row["raw"] = JsonText(outcome.row["raw"])
    return outcome


def read_page(task: PageTask) -> list[Outcome]:
    """Decode a page exactly and read its records, in page order: unchanged, a row to store, or bad (never
    raises for a record). Raises ValueError only when the body is not JSON at all."""
    body = decode_body(task.body)
    records = body.get("data") if isinstance(body, dict) else None
    if not isinstance(records, list):
        raise ValueError("the page has no 'data' list")
    read = record_from_export if task.export else _as_sent
    return [
        read_record(i, read(record), task.known, task.chatbot_id, task.rule)
        for i, record in enumerate(records)
    ]


def _as_sent(record: object) -> object:
    return record


def read_record(
    index: int, record: Any, known: dict[str, str], chatbot_id: str, rule: WhatsAppRule
) -> Outcome:
    """One record's :class:`Outcome` (see :func:`read_page`)."""
    try:
        unchanged = unchanged_outcome(index, record, known)
        if unchanged is not None:
            return unchanged
        row = normalize_conversation(record, chatbot_id, rule)
        row["messages"] = encode_json(row["messages"])
        row["raw"] = encode_json(row["raw"])
        return Outcome(index, "row", row["id"], row["created_at"].date(), row)
    except BadRecord as exc:
        return _bad(index, record, exc.reason)
    except Exception as exc:  # a fault of chatsync's on one record must not stop the sync
        reason = f"chatsync could not read it ({describe(exc)})"
        return _bad(index, record, reason, traceback.format_exc())


def unchanged_outcome(index: int, record: Any, known: dict[str, str]) -> Outcome | None:
    """The "unchanged" outcome of a stored record Chatbase sends with the same content, else None.

    Raises BadRecord when the record cannot even be written as JSON."""
    conversation_id = stored_id(record)
    if conversation_id is None or conversation_id not in known:
        return None
    if not same_content(storable(record), known[conversation_id]):
        return None
    try:
        created = parse_timestamp(record.get("created_at")).date()
    except (ValueError, OverflowError, OSError):
        return None
    return Outcome(index, "unchanged", conversation_id, created)


def _bad(index: int, record: Any, reason: str, fault: str | None = None) -> Outcome:
    return Outcome(index, "bad", stored_id(record), None, None, reason, bad_record(record, reason), fault)


def bad_record(record: Any, reason: str) -> UndecodableRecord:
    """A record as the quarantine keeps it: its JSON text (cut when huge), the reason and its id."""
    return UndecodableRecord(quarantine_text(record), reason, id_as_sent(record))


def describe(exc: BaseException) -> str:
    """An exception as one short line for a quarantine reason: its type and the first line of its text."""
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()
    return f"{type(original).__name__}: {lines[0][:200]}" if lines else type(original).__name__


# ------------------------------------------------------------------------------------------------ the pool
class ReaderPool:
    """Runs :func:`read_page` in ``workers`` processes (0: in the calling thread).

    A worker that dies (killed, out of memory) breaks the pool: every page not yet read raises
    ``concurrent.futures.process.BrokenProcessPool`` from its future (wait with :meth:`result`, which also
    sees a death the executor misses).
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._unfinished: set[Future[list[Outcome]]] = set()

    def submit(self, task: PageTask) -> Future[list[Outcome]]:
        if self.workers <= 0:
            done: Future[list[Outcome]] = Future()
            try:
                done.set_result(read_page(task))
            except Exception as exc:
                done.set_exception(exc)
            return done
        # A task may start a worker, and the first one starts the fork server. Both are held off Ctrl-C
        # and SIGTERM meanwhile, which the sync takes as ever once this returns:
        # - a process inherits the signals its parent holds, so started while this thread holds Ctrl-C, the
        #   server and every worker it forks never take it (a terminal sends it to the whole process group:
        #   it once stopped the server in its start-up, or a worker as it wrote a result, which left the
        #   pool waiting forever; a worker takes SIGTERM from the sync alone, see _sigterm_from_the_sync);
        # - a signal taken in the middle of starting a worker left one the pool did not know of: the sync
        #   ended without waiting for it, and it printed a traceback as it found the sync's queues gone
        #   (a SIGTERM in a sync's first second, seen on a loaded machine).
        if self._executor is None:
            start_resource_tracker()
        with held(signal.SIGINT, signal.SIGTERM):
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    self.workers, mp_context=context(), initializer=_start_worker
                )
            try:
                future = self._executor.submit(read_page, task)
            except OSError as exc:
                # a worker died while this one was being started (the executor closes the pipes the new
                # one is handed: "handle is closed"): the pool is broken, not the machine
                if getattr(self._executor, "_broken", False) or self._a_worker_died():
                    raise BrokenProcessPool("a worker process died while another was starting") from exc
                raise
        self._unfinished.add(future)
        future.add_done_callback(self._unfinished.discard)
        return future

    def result(self, future: Future[list[Outcome]]) -> list[Outcome]:
        """What :meth:`submit`'s ``future`` gives, waited for; raises BrokenProcessPool (its page will not
        be read) once a worker died, even where the executor does not see it.

        A worker killed in the middle of sending a result (SIGKILL, the OOM killer) leaves half of it in
        the pipe all workers answer through: the executor waits for the rest for ever, and the worker that
        answers next waits for the pipe's lock, which the dead one held (1 sync in 10 whose worker was
        killed never ended, found by a helper breaking it). After :data:`DEATH_GRACE_SECONDS` with a dead
        worker and this page unread, the pool is given up (:meth:`_give_up`), which breaks it properly;
        when even that gives no answer in as long, this raises BrokenProcessPool itself.
        """
        died: float | None = None
        gave_up: float | None = None
        while True:
            try:
                return future.result(timeout=POLL_SECONDS)
            except TimeoutError:
                now = time.monotonic()
                if died is None:
                    died = now if self._a_worker_died() else None
                elif gave_up is None:
                    if now - died >= DEATH_GRACE_SECONDS:
                        self._give_up()
                        gave_up = now
                elif now - gave_up >= DEATH_GRACE_SECONDS:
                    # the executor's own thread is gone: a worker that died while another was starting
                    # can end it with an error of its own (CPython 3.11), leaving every page unanswered
                    raise BrokenProcessPool("a worker process died; the pool did not answer since") from None

    def close(self, abandon: bool = False) -> None:
        """Shut the workers down. They are killed rather than waited for (a stopped or stuck worker would
        hold the sync for ever) when the caller gives up (``abandon``: it stopped or failed), when pages
        submitted are still unread, when the pool is broken, and when a stop comes while waiting for them.
        """
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if abandon or self._unfinished or getattr(executor, "_broken", False):
            # (broken: a worker may have started as the executor ended the others, and not be ended)
            self._give_up(executor)
        try:
            executor.shutdown(wait=True, cancel_futures=True)
        except BaseException:
            self._give_up(executor)  # a stop while waiting for the workers to end
            raise

    def _a_worker_died(self) -> bool:
        sentinels = [p.sentinel for p in _processes(self._executor)]
        return bool(sentinels) and bool(wait(sentinels, timeout=0))  # (a sentinel is ready once it ended)

    def _give_up(self, executor: ProcessPoolExecutor | None = None) -> None:
        """Kill every worker, then close this process's end of the pipe they answer through: with no writer
        left, the executor reading half a result gets EOF, takes the pool as broken and fails every page
        not read with BrokenProcessPool (it reaches into the executor: the standard library offers no way
        out of that wait, CPython 3.11-3.13)."""
        executor = executor or self._executor
        if executor is None:
            return
        for process in _processes(executor):
            process.kill()
        results = getattr(executor, "_result_queue", None)
        if results is not None:
            results._writer.close()

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(abandon=exc_type is not None)


def _processes(executor: ProcessPoolExecutor | None) -> list[Any]:
    """The executor's worker processes now (``multiprocessing.Process``; none once it is shut down)."""
    return list((getattr(executor, "_processes", None) or {}).values())


def _start_worker() -> None:
    """In a worker, first: leave Ctrl-C to the sync (see :meth:`ReaderPool.submit`; also where the fork
    server was started by something else), take SIGTERM from the sync alone (:func:`_sigterm_from_the_sync`),
    and end with the sync."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "nice"):
        # The one writer is what the sync waits for: where the cores are all busy, the system runs it
        # (and the database server it talks to) before the readers, which have time to spare.
        os.nice(WORKER_NICENESS)
    _sigterm_from_the_sync()
    _end_with_parent()


def _sigterm_from_the_sync() -> None:
    """In a worker: end on a SIGTERM the sync sends (its pool ends the workers so when one died), and
    leave any other to the sync.

    systemd stops a service by sending SIGTERM to every process in it at once: a worker that took it in
    the middle of sending a page's result left the pool reading the rest of it for ever, and the stopped
    sync never ended (2 of 40 stops on a loaded machine). The sync, told to stop, shuts its pool down
    itself. A thread takes the signal (held in every other thread, as the fork server started the worker
    with it held) to learn who sent it; where the system cannot say (macOS), the worker takes SIGTERM
    as it comes."""
    import multiprocessing
    import threading

    if not hasattr(signal, "pthread_sigmask"):
        return
    parent = multiprocessing.parent_process()
    if parent is None or not hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # in this thread and the ones it starts

    def take() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent.pid:
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=take, name="chatsync-worker-sigterm", daemon=True).start()


def _end_with_parent() -> None:
    """In a worker: exit as soon as the sync that started it is gone (even SIGKILLed), rather than wait
    for tasks forever (a worker holds its own end of the task queue, so it would never see it close)."""
    import multiprocessing
    import threading

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(0)

    threading.Thread(target=watch, name="chatsync-worker-watch", daemon=True).start()
