"""The change feed: one per server process, following the change log and fanning out to every event stream.

The writers append each change to the log in its own transaction (:mod:`chatsync.store.changes`), so its
``seq`` is a cursor that never skips a change and is the event id a client resumes from. The feed reads
the log once per interval while anyone listens (on PostgreSQL it is also woken by ``NOTIFY`` at once) and
keeps the latest changes in memory; a thousand open streams cost one query per interval, not a thousand.
A stream whose cursor is older than what the feed keeps (a client resuming after a while, or one reading
slower than a large sync writes) reads the log itself until it has caught up, so nothing is dropped.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from anyio import to_thread
from sqlalchemy import Engine
from sqlalchemy.pool import NullPool

from chatsync.store import changes as log_
from chatsync.store.access import Access
from chatsync.store.changes import Change
from chatsync.timeutil import as_utc, iso_z

log = logging.getLogger("chatsync.web.events")


class ChangeFeed:
    """Follows the change log for every stream of this process (see the module docstring)."""

    KEEP = 10_000  # changes kept in memory for the streams
    BATCH = 2_000  # changes read per query
    PER_TURN = 500  # changes a stream sends before it lets others run

    def __init__(self, engine: Engine, poll_seconds: float, streams_per_user: int) -> None:
        self.engine = engine
        self.poll_seconds = poll_seconds
        self.streams_per_user = streams_per_user
        self.head = 0  # the last seq read
        self.floor = 0  # every change with floor < seq <= head is in _recent
        self.polls = 0  # reads of the log
        self.notifications = 0  # wake-ups by NOTIFY (PostgreSQL)
        self.open_streams: Counter[str] = Counter()
        self._recent: list[Change] = []
        self._listeners = 0
        self._generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._advanced = asyncio.Event()
        self._jump = asyncio.Lock()

    # ------------------------------------------------------------------------------------- streams' side
    def take_slot(self, user_id: str) -> bool:
        """Count an open stream of ``user_id``; False when they already have the most allowed."""
        if self.open_streams[user_id] >= self.streams_per_user:
            return False
        self.open_streams[user_id] += 1
        return True

    def release_slot(self, user_id: str) -> None:
        self.open_streams[user_id] -= 1
        if self.open_streams[user_id] <= 0:
            del self.open_streams[user_id]

    async def attach(self) -> int:
        """Start following the log for one more stream (from the newest change if nobody was); returns
        the token to :meth:`detach` with."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._start(loop)
        generation = self._generation
        self._listeners += 1
        if self._listeners == 1:
            async with self._jump:
                _low, high = await to_thread.run_sync(self._bounds)
                self.head = self.floor = high
                self._recent = []
            self._wake.set()
        return generation

    def detach(self, generation: int) -> None:
        if generation == self._generation:  # a stream of an event loop that is gone no longer counts
            self._listeners -= 1

    def after(self, cursor: int) -> list[Change]:
        """Changes kept in memory with ``seq > cursor`` (call only when ``cursor >= floor``)."""
        start = bisect.bisect_right(self._recent, cursor, key=lambda c: c.seq)
        return self._recent[start : start + self.PER_TURN]

    async def wait(self, cursor: int, timeout: float) -> None:
        """Until the feed has read past ``cursor``, or ``timeout`` seconds."""
        if self.head > cursor:
            return
        advanced = self._advanced
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(advanced.wait(), timeout)

    async def read(self, cursor: int) -> list[Change]:
        """Changes after ``cursor`` straight from the log, for a stream behind what is kept in memory."""
        return await to_thread.run_sync(self._read, cursor, self.BATCH)

    async def bounds(self) -> tuple[int, int]:
        return await to_thread.run_sync(self._bounds)

    # ----------------------------------------------------------------------------------------- the loop
    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        # A new event loop (a test client without a lifespan runs one per request) needs new primitives.
        self._loop = loop
        self._generation += 1
        self._listeners = 0
        self._wake, self._advanced, self._jump = asyncio.Event(), asyncio.Event(), asyncio.Lock()
        self._task = loop.create_task(self._run(), name="chatsync-change-feed")

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._task = None

    async def _run(self) -> None:
        listener = self._start_listening()
        try:
            while True:
                if self._listeners <= 0:
                    await self._wake.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
                self._wake.clear()
                if self._listeners > 0:
                    await self._poll()
        finally:
            if listener is not None:
                listener.cancel()

    async def _poll(self) -> None:
        try:
            async with self._jump:
                while True:
                    batch = await to_thread.run_sync(self._read, self.head, self.BATCH)
                    self.polls += 1
                    if batch:
                        self._recent.extend(batch)
                        self.head = batch[-1].seq
                        if len(self._recent) > 2 * self.KEEP:
                            dropped = len(self._recent) - self.KEEP
                            self.floor = self._recent[dropped - 1].seq
                            self._recent = self._recent[dropped:]
                        advanced, self._advanced = self._advanced, asyncio.Event()
                        advanced.set()
                    if len(batch) < self.BATCH:
                        return
        except Exception as exc:  # the database may be restarting: try again next interval
            log.warning("change feed: reading the change log failed (%s)", type(exc).__name__)

    def _start_listening(self) -> asyncio.Task[None] | None:
        """On PostgreSQL with its own sessions (not behind a transaction pooler), LISTEN for the writers'
        NOTIFY so a change reaches the streams at once rather than at the next poll."""
        if self.engine.dialect.name != "postgresql" or isinstance(self.engine.pool, NullPool):
            return None
        return asyncio.get_running_loop().create_task(self._listen(), name="chatsync-change-listen")

    async def _listen(self) -> None:
        import psycopg

        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as connection:
                    await connection.execute(f"LISTEN {log_.NOTIFY_CHANNEL}")
                    async for _ in connection.notifies():
                        self.notifications += 1
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "change feed: LISTEN failed (%s); polling every %ss",
                    type(exc).__name__,
                    self.poll_seconds,
                )
            await asyncio.sleep(max(5.0, self.poll_seconds))

    def _read(self, cursor: int, limit: int) -> list[Change]:
        with self.engine.connect() as connection:
            return log_.read_changes(connection, cursor, limit)

    def _bounds(self) -> tuple[int, int]:
        with self.engine.connect() as connection:
            return log_.bounds(connection)


def _visible(change: Change, visible: frozenset[str] | None) -> bool:
    """A caller sees a change when they may see every chatbot it concerns: a sync run of several chatbots
    carries counts over all of them, so one invisible chatbot hides the whole run."""
    if visible is None:
        return True
    bots = change.chatbot_ids()
    return bool(bots) and all(bot in visible for bot in bots)


def _event(change: Change) -> dict[str, Any]:
    """The SSE fields of one change: ``event``, ``id`` (its seq) and the JSON ``data``."""
    if change.kind == log_.SYNC_FINISHED:
        run = change.run or {}
        data: dict[str, Any] = {
            "run_id": change.subject,
            "status": run.get("status") or "failed",
            "summary": run.get("summary"),
        }
    else:
        data = {"id": change.subject, "chatbot_id": change.chatbot_id, "changed_at": iso_z(as_utc(change.at))}
    return {"event": change.kind, "id": str(change.seq), "data": data}


async def follow(
    feed: ChangeFeed, who: Access, last_event_id: int | None, expires: float
) -> AsyncIterator[dict[str, Any]]:
    """The events one caller may see, from just after ``last_event_id`` (or from now), until ``expires``
    (epoch seconds); then an ``expired`` event. A ``reset`` event says some missed events are gone."""
    visible = None if who.visible is None else frozenset(who.visible)
    generation = await feed.attach()
    try:
        if last_event_id is None:
            cursor = feed.head
        else:
            cursor = last_event_id
            low, high = await feed.bounds()
            if cursor > high or (low and cursor < low - 1):
                cursor = high if cursor > high else low - 1
                yield {"event": "reset", "id": str(cursor), "data": {}}
        yield {"comment": "connected"}  # from here on nothing is missed
        while True:
            remaining = expires - time.time()
            if remaining <= 0:
                yield {"event": "expired", "data": {}}  # no id: the client resumes after the last change
                return
            if cursor < feed.floor:
                batch = await feed.read(cursor)
                if not batch:
                    cursor = max(cursor, feed.floor)
                    continue
            else:
                batch = feed.after(cursor)
            if not batch:
                await feed.wait(cursor, remaining)
                continue
            for change in batch:
                cursor = change.seq
                if _visible(change, visible):
                    yield _event(change)
    finally:
        feed.detach(generation)
