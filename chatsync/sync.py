"""The sync engine: which days to fetch, fetching them in parallel, saving them exactly once.

How a run never loses or duplicates a conversation:

* The range is cut into windows of whole UTC days. Several windows are fetched at once (requests
  overlap under the client's shared rate limiter); one writer thread saves pages as they arrive.
* Each page is saved in its own transaction; a window's last page is saved in the same transaction
  that records its days as fetched. A run killed at any moment leaves only whole pages behind, and
  days it had not finished are fetched again next time. Upserts are idempotent, so refetching is safe.
* A day counts as settled once it was fetched more than ``lookback`` after it ended: conversations
  keep growing for a while after they start, so later runs fetch recent days again. Today is never
  recorded as fetched.
"""

from __future__ import annotations

import math
import queue
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from chatsync.chatbase import ChatbaseClient
from chatsync.config import WhatsAppRule
from chatsync.errors import BadRecord, ChatsyncError, DatabaseUnavailable, ExitCode
from chatsync.normalize import canonical_json, content_hash, normalize_conversation
from chatsync.store import writes
from chatsync.store.locks import chatbot_lock
from chatsync.timeutil import day_end, iso_z, parse_timestamp, utcnow

MAX_WINDOW_DAYS = 31


@dataclass(frozen=True)
class SyncRequest:
    chatbot_ids: tuple[str, ...]
    since: date | None = None
    until: date | None = None
    sources: tuple[str, ...] = ()
    lookback: timedelta = timedelta(days=3)
    full: bool = False


@dataclass
class SyncSummary:
    """The run summary of ``sync --json`` (spec/cli.md)."""

    status: str = "ok"
    chatbots: list[str] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    fetched: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    quarantined: int = 0
    whatsapp_captured: int = 0
    started_at: str | None = None
    finished_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Window:
    start: date
    end: date  # inclusive

    @property
    def days(self) -> list[date]:
        return [self.start + timedelta(days=i) for i in range((self.end - self.start).days + 1)]


@dataclass
class Progress:
    """What the CLI's progress bar shows; updated by the writer only."""

    chatbot_id: str = ""
    windows_total: int = 0
    windows_done: int = 0
    conversations: int = 0


ProgressHook = Callable[[Progress], None]


# ------------------------------------------------------------------------------------------------- planning
def days_to_fetch(
    first: date,
    last: date,
    fetched: dict[date, datetime],
    lookback: timedelta,
    full: bool,
) -> list[date]:
    """Days of ``first..last`` not yet settled: never fetched, or last fetched within ``lookback`` of their end."""
    out = []
    day = first
    while day <= last:
        when = fetched.get(day)
        if full or when is None or when < day_end(day) + lookback:
            out.append(day)
        day += timedelta(days=1)
    return out


def plan_windows(days: list[date], parallel: int) -> list[Window]:
    """Group consecutive days into windows, long enough to waste few requests on short last pages and
    numerous enough to keep ``parallel`` fetches busy."""
    if not days:
        return []
    span = max(1, min(MAX_WINDOW_DAYS, math.ceil(len(days) / max(1, 2 * parallel))))
    windows: list[Window] = []
    start = previous = days[0]
    for day in days[1:]:
        if day != previous + timedelta(days=1) or (day - start).days >= span:
            windows.append(Window(start, previous))
            start = day
        previous = day
    windows.append(Window(start, previous))
    return windows


def scope_of(sources: tuple[str, ...]) -> str:
    return ",".join(sorted(sources)) if sources else "*"


# -------------------------------------------------------------------------------------------------- running
@dataclass
class _Page:
    window: Window
    records: list[Any]
    last: bool
    fetched_at: datetime


@dataclass
class _Failed:
    window: Window
    error: BaseException


_DONE = object()


class Syncer:
    """Runs one sync: owns the locks, the client's worker threads and the single writer."""

    def __init__(
        self,
        engine: Engine,
        client: ChatbaseClient,
        rule: WhatsAppRule,
        concurrency: int = 8,
        progress: ProgressHook | None = None,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.client = client
        self.rule = rule
        self.concurrency = max(1, concurrency)
        self.progress = progress
        self.now = now
        self.run_id = str(uuid.uuid4())
        self.summary = SyncSummary()

    def run(self, request: SyncRequest, *, locked: bool = False) -> SyncSummary:
        """Sync every chatbot of the request; raises LockHeld before doing anything if one is busy.

        ``locked``: the caller already holds every chatbot's lock (the API takes it in the request).
        """
        summary = self.summary
        summary.chatbots = list(request.chatbot_ids)
        with ExitStack() as locks:
            for chatbot_id in request.chatbot_ids if not locked else ():
                locks.enter_context(chatbot_lock(self.engine, chatbot_id))
            started = self.now()
            summary.started_at = iso_z(started)
            with self.engine.begin() as connection:
                writes.start_run(connection, self.run_id, list(request.chatbot_ids), started)
            error: BaseException | None = None
            try:
                for chatbot_id in request.chatbot_ids:
                    self._sync_chatbot(chatbot_id, request)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._finish(error)
        return summary

    def _finish(self, error: BaseException | None) -> None:
        summary = self.summary
        summary.requests = self.client.stats.requests
        summary.retries = self.client.stats.retries
        summary.finished_at = iso_z(self.now())
        if error is not None:
            summary.status = "partial"
        # partial: retries ran out or the database went away, the next run continues; failed: anything else
        partial = isinstance(error, ChatsyncError) and error.exit_code == ExitCode.PARTIAL
        status = "ok" if error is None else "partial" if partial else "failed"
        try:
            with self.engine.begin() as connection:
                writes.finish_run(
                    connection,
                    self.run_id,
                    status,
                    summary.as_dict(),
                    str(error) if error else None,
                    self.now(),
                )
        except DBAPIError:
            pass  # the database is gone; the next run marks this one interrupted

    # ----------------------------------------------------------------------------------------- one chatbot
    def _sync_chatbot(self, chatbot_id: str, request: SyncRequest) -> None:
        today = self.now().date()
        scope = scope_of(request.sources)
        with self._db() as connection:
            writes.remember_chatbot(connection, chatbot_id)
            known_first = writes.chatbot_first_day(connection, chatbot_id)
        first = request.since
        if first is None:
            first = known_first
            if first is None or request.full:
                first = self.client.find_first_day(chatbot_id, today, request.sources)
                if first is None:
                    return  # the chatbot has no conversations yet
                if not request.sources:
                    with self._db() as connection:
                        writes.remember_chatbot(connection, chatbot_id, first_day=first)
        last = min(request.until or today, today)
        if first > last:
            return
        with self._db() as connection:
            fetched = writes.fetched_days(connection, chatbot_id, {"*", scope}, first, last)
        days = days_to_fetch(first, last, fetched, request.lookback, request.full)
        windows = plan_windows(days, self.concurrency)
        status = Progress(chatbot_id, windows_total=len(windows))
        self._report(status)
        self._fetch_and_save(chatbot_id, request.sources, scope, windows, today, status)
        with self._db() as connection:
            writes.remember_chatbot(connection, chatbot_id, synced_at=self.now())

    def _fetch_and_save(
        self,
        chatbot_id: str,
        sources: tuple[str, ...],
        scope: str,
        windows: list[Window],
        today: date,
        status: Progress,
    ) -> None:
        # Pages wait here for the single writer; a short queue bounds memory (a decoded page is ~1.5 MB).
        pages: queue.Queue[object] = queue.Queue(maxsize=self.concurrency)
        seen: dict[Window, set[str]] = {}
        first_error: BaseException | None = None

        def fetch(window: Window) -> None:
            try:
                fetched_at = self.now()
                for records, last in self.client.iter_pages(chatbot_id, window.start, window.end, sources):
                    pages.put(_Page(window, records, last, fetched_at))
            except BaseException as exc:
                pages.put(_Failed(window, exc))

        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="chatsync-fetch") as pool:
            futures = [pool.submit(fetch, w) for w in windows]

            def finish() -> None:
                for future in futures:
                    future.result()
                pages.put(_DONE)

            watcher = threading.Thread(target=finish, name="chatsync-fetch-watcher")
            watcher.start()
            try:
                while True:
                    item = pages.get()
                    if item is _DONE:
                        break
                    if isinstance(item, _Failed):
                        if first_error is None:
                            first_error = item.error
                            self.client.stop.set()  # no new requests; pages already fetched are still saved
                        continue
                    assert isinstance(item, _Page)
                    if isinstance(first_error, DatabaseUnavailable):
                        continue
                    try:
                        self._save_page(chatbot_id, scope, item, today, seen.setdefault(item.window, set()))
                    except DatabaseUnavailable as exc:
                        first_error = exc
                        self.client.stop.set()
                        continue
                    status.conversations += len(item.records)
                    if item.last:
                        status.windows_done += 1
                        seen.pop(item.window, None)
                    self._report(status)
            except BaseException:
                # The writer itself failed: stop fetching, and take what the fetchers still hold so
                # they can end (a fetcher waiting on a full queue would otherwise wait forever).
                self.client.stop.set()
                while pages.get() is not _DONE:
                    pass
                raise
            finally:
                if first_error is not None:
                    self.client.stop.set()
                watcher.join()
        if first_error is not None:
            raise first_error

    def _save_page(self, chatbot_id: str, scope: str, page: _Page, today: date, seen: set[str]) -> None:
        """Save one page; the window's last page also records its days as fetched, in the same transaction."""
        summary = self.summary
        now = self.now()
        rows: list[dict[str, Any]] = []
        bad: list[tuple[object, str]] = []
        unchanged = captured = 0
        known = self._fingerprints(page.records)
        for record in page.records:
            skip = self._unchanged(record, known, page.window, seen)
            if skip is not None:
                unchanged += skip[0]
                captured += skip[1]
                continue
            try:
                row = normalize_conversation(record, chatbot_id, self.rule)
            except BadRecord as exc:
                bad.append((record, exc.reason))
                continue
            if _claim(row["id"], row["created_at"].date(), page.window, seen):
                rows.append(row)
        days = [d for d in page.window.days if d < today] if page.last else []
        stored = {conversation_id: fingerprint[0] for conversation_id, fingerprint in known.items()}
        try:
            with self._db() as connection:
                counts = writes.upsert_conversations(connection, rows, now, stored)
                self._record_page(connection, chatbot_id, scope, bad, days, page.fetched_at, now)
        except DBAPIError:
            # The database refused the page as a whole (not a lost connection, which _db turns into
            # DatabaseUnavailable): store what it accepts row by row, quarantine the rest.
            counts = self._save_one_by_one(rows, bad, now)
            with self._db() as connection:
                self._record_page(connection, chatbot_id, scope, bad, days, page.fetched_at, now)
        summary.inserted += counts.inserted
        summary.updated += counts.updated
        summary.unchanged += counts.unchanged + unchanged
        summary.whatsapp_captured += counts.captured + captured
        summary.quarantined += len(bad)
        summary.fetched += counts.inserted + counts.updated + counts.unchanged + unchanged + len(bad)

    def _fingerprints(self, records: list[Any]) -> dict[str, tuple[str, bool]]:
        ids = [r["id"] for r in records if isinstance(r, dict) and isinstance(r.get("id"), str)]
        with self._db() as connection:
            return writes.stored_fingerprints(connection, ids)

    def _unchanged(
        self, record: Any, known: dict[str, tuple[str, bool]], window: Window, seen: set[str]
    ) -> tuple[int, int] | None:
        """(1, captured) for a stored conversation Chatbase sends unchanged, (0, 0) for one to pass over,
        None for one to normalise. Unchanged ones skip the rule and the write: the cron path is mostly them."""
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or record["id"] not in known:
            return None  # new, or not even shaped like a conversation: normalising says which
        conversation_id = record["id"]
        stored_hash, has_number = known[conversation_id]
        if content_hash(canonical_json(record)) != stored_hash:
            return None
        try:
            created = parse_timestamp(record.get("created_at")).date()
        except (ValueError, OverflowError, OSError):
            return None
        return (1, int(has_number)) if _claim(conversation_id, created, window, seen) else (0, 0)

    def _record_page(
        self,
        connection: Any,
        chatbot_id: str,
        scope: str,
        bad: list[tuple[object, str]],
        days: list[date],
        fetched_at: datetime,
        now: datetime,
    ) -> None:
        for record, reason in bad:
            writes.quarantine_record(connection, chatbot_id, record, reason, self.run_id, now)
        writes.mark_days_fetched(connection, chatbot_id, scope, days, fetched_at)

    def _save_one_by_one(
        self, rows: list[dict[str, Any]], bad: list[tuple[object, str]], now: datetime
    ) -> writes.UpsertCounts:
        counts = writes.UpsertCounts()
        for row in rows:
            try:
                with self._db() as connection:
                    counts.add(writes.upsert_conversations(connection, [row], now))
            except DBAPIError as exc:
                reason = str(exc.orig or exc).strip().splitlines()[0]
                record = {"id": row["id"], **row["raw"], "messages": row["messages"]}
                bad.append((record, f"database refused it: {reason}"))
        return counts

    # ----------------------------------------------------------------------------------------------- helpers
    def _db(self) -> Any:
        return _Transaction(self.engine)

    def _report(self, status: Progress) -> None:
        if self.progress:
            self.progress(status)


def _claim(conversation_id: str, created: date, window: Window, seen: set[str]) -> bool:
    """Whether this copy of a conversation counts for this window: created on one of its days (a server
    may answer wider than asked) and not already seen in it (pages shift while conversations arrive)."""
    if not window.start <= created <= window.end or conversation_id in seen:
        return False
    seen.add(conversation_id)
    return True


class _Transaction:
    """``engine.begin()`` that turns a lost database into DatabaseUnavailable."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._context: Any = None

    def __enter__(self) -> Any:
        try:
            self._context = self.engine.begin()
            return self._context.__enter__()
        except DBAPIError as exc:
            raise _unavailable(exc) from None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self._context.__exit__(exc_type, exc, tb)
        except DBAPIError as error:
            raise _unavailable(error) from None
        if isinstance(exc, DBAPIError) and (exc.connection_invalidated or isinstance(exc, OperationalError)):
            raise _unavailable(exc) from None


def _unavailable(exc: DBAPIError) -> DatabaseUnavailable:
    first = str(exc.orig or exc).strip().splitlines()
    return DatabaseUnavailable(
        f"the database went away mid-run ({first[0] if first else type(exc).__name__}); "
        "what was committed is kept and the next run continues"
    )
