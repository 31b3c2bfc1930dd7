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

import logging
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
from chatsync.errors import BadRecord, ChatsyncError, DatabaseUnavailable, ExitCode, LockHeld, LockLost
from chatsync.normalize import content_hash, normalize_conversation, storable, stored_id
from chatsync.store import writes
from chatsync.store.locks import chatbot_lock
from chatsync.timeutil import day_end, iso_z, parse_timestamp, utcnow

MAX_WINDOW_DAYS = 31
log = logging.getLogger("chatsync.sync")


@dataclass(frozen=True)
class SyncRequest:
    chatbot_ids: tuple[str, ...]
    since: date | None = None
    until: date | None = None
    sources: tuple[str, ...] = ()
    lookback: timedelta = timedelta(days=3)
    full: bool = False
    # Share the chatbots with other hosts running the same command: take each chatbot's lock in turn and
    # skip those another process holds, or has synced since this run began, instead of exiting 75.
    share: bool = False


@dataclass
class SyncSummary:
    """The run summary of ``sync --json`` (docs/cli.md)."""

    status: str = "ok"
    chatbots: list[str] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    fetched: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    quarantined: int = 0
    repaired: int = 0
    whatsapp_captured: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    skipped: list[str] = field(default_factory=list)  # shared runs: chatbots another host had or did

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.skipped:
            del out["skipped"]
        return out


@dataclass(frozen=True)
class Window:
    start: date
    end: date  # inclusive

    @property
    def days(self) -> list[date]:
        return [self.start + timedelta(days=i) for i in range((self.end - self.start).days + 1)]


@dataclass(frozen=True)
class ChatbotPlan:
    """What a sync of one chatbot will fetch (``sync --dry-run`` prints it)."""

    chatbot_id: str
    first_day: date | None  # None: Chatbase has no conversation of this chatbot yet
    last_day: date | None
    days: list[date]  # the days not yet settled, which this run fetches
    windows: list[Window]
    first_day_found: bool  # asked Chatbase for it just now (the first run, or --full)
    stored_per_window: dict[Window, int] = field(default_factory=dict)  # known only to plan()

    @property
    def estimated_requests(self) -> int:
        """One request per page: a window's stored conversations ÷ 100, plus its last short page.

        Conversations not stored yet are not known, so a first run needs more than this."""
        return sum(self.stored_per_window.get(w, 0) // 100 + 1 for w in self.windows)

    def as_dict(self) -> dict[str, Any]:
        return {
            "chatbot_id": self.chatbot_id,
            "first_day": self.first_day.isoformat() if self.first_day else None,
            "last_day": self.last_day.isoformat() if self.last_day else None,
            "days": len(self.days),
            "windows": [[w.start.isoformat(), w.end.isoformat()] for w in self.windows],
            "stored_conversations": sum(self.stored_per_window.values()),
            "estimated_requests": self.estimated_requests,
        }


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
        """Sync every chatbot of the request; raises LockHeld before doing anything if one is busy, and
        LockLost (after stopping) if a lock is lost mid-run.

        ``locked``: the caller already holds every chatbot's lock (the API takes it in the request).
        """
        if request.share:
            return self._run_shared(request)
        summary = self.summary
        summary.chatbots = list(request.chatbot_ids)
        lost: list[LockLost] = []

        def stop(exc: LockLost) -> None:
            # A lock that is lost may already be another sync's: stop fetching at once and end with it.
            lost.append(exc)
            self.client.stop.set()

        with ExitStack() as locks:
            for chatbot_id in request.chatbot_ids if not locked else ():
                locks.enter_context(chatbot_lock(self.engine, chatbot_id, on_lost=stop))
            started = self.now()
            summary.started_at = iso_z(started)
            with self.engine.begin() as connection:
                writes.start_run(connection, self.run_id, list(request.chatbot_ids), started)
            error: BaseException | None = None
            try:
                for chatbot_id in request.chatbot_ids:
                    self._sync_chatbot(chatbot_id, request)
                    if lost:
                        raise lost[0]
            except BaseException as exc:
                # e.g. "sync stopped" from the client: the lost lock is the cause (an interrupt stays one)
                error = lost[0] if lost and isinstance(exc, Exception) else exc
                if error is not exc:
                    raise error from exc
                raise
            finally:
                self._finish(error)
        return summary

    def _run_shared(self, request: SyncRequest) -> SyncSummary:
        """Sync each chatbot whose lock is free and that no other process synced since this run began.

        Several hosts running ``sync --all-chatbots`` at once against one database so divide the chatbots
        between them: each is synced once per round, never by two at the same time.
        """
        summary = self.summary
        lost: list[LockLost] = []

        def stop(exc: LockLost) -> None:
            lost.append(exc)
            self.client.stop.set()

        started = self.now()
        summary.started_at = iso_z(started)
        with self.engine.begin() as connection:
            writes.start_run(connection, self.run_id, [], started)
        error: BaseException | None = None
        try:
            for chatbot_id in request.chatbot_ids:
                try:
                    with chatbot_lock(self.engine, chatbot_id, on_lost=stop):
                        with self._db() as connection:
                            done = writes.synced_since(connection, chatbot_id, started)
                        if done:
                            log.info(
                                "chatbot %s: synced by another process during this run; skipped", chatbot_id
                            )
                            summary.skipped.append(chatbot_id)
                            continue
                        summary.chatbots.append(chatbot_id)
                        with self._db() as connection:
                            writes.set_run_chatbots(connection, self.run_id, summary.chatbots)
                        self._sync_chatbot(chatbot_id, SyncRequest((chatbot_id,), **_options(request)))
                        if lost:
                            raise lost[0]
                except LockHeld:
                    log.info("chatbot %s: another process is syncing it; skipped", chatbot_id)
                    summary.skipped.append(chatbot_id)
        except BaseException as exc:
            error = lost[0] if lost and isinstance(exc, Exception) else exc
            if error is not exc:
                raise error from exc
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
        log.info(
            "sync %s: %s; %d requests, %d retries; fetched %d: %d inserted, %d updated, %d unchanged, "
            "%d quarantined, %d repaired; %d numbers captured",
            self.run_id,
            status,
            summary.requests,
            summary.retries,
            summary.fetched,
            summary.inserted,
            summary.updated,
            summary.unchanged,
            summary.quarantined,
            summary.repaired,
            summary.whatsapp_captured,
        )
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
    def plan(self, request: SyncRequest) -> list[ChatbotPlan]:
        """What a run of ``request`` would fetch, without taking locks or writing anything.

        A chatbot whose first day chatsync does not know yet costs the requests that find it (about 12);
        nothing else is fetched.
        """
        plans = [
            self._plan_chatbot(chatbot_id, request, self.now().date()) for chatbot_id in request.chatbot_ids
        ]
        self.summary.requests = self.client.stats.requests
        return plans

    def _plan_chatbot(self, chatbot_id: str, request: SyncRequest, today: date) -> ChatbotPlan:
        scope = scope_of(request.sources)
        with self._db() as connection:
            known_first = writes.chatbot_first_day(connection, chatbot_id)
        first = request.since
        found = False
        if first is None:
            first = known_first
            if first is None or request.full:
                first = self.client.find_first_day(chatbot_id, today, request.sources)
                found = first is not None
                if first is None:
                    return ChatbotPlan(chatbot_id, None, None, [], [], False)
        last = min(request.until or today, today)
        if first > last:
            return ChatbotPlan(chatbot_id, first, last, [], [], found)
        with self._db() as connection:
            fetched = writes.fetched_days(connection, chatbot_id, {"*", scope}, first, last)
        days = days_to_fetch(first, last, fetched, request.lookback, request.full)
        return ChatbotPlan(chatbot_id, first, last, days, plan_windows(days, self.concurrency), found)

    def _sync_chatbot(self, chatbot_id: str, request: SyncRequest) -> None:
        today = self.now().date()
        with self._db() as connection:
            writes.remember_chatbot(connection, chatbot_id)
        plan = self._plan_chatbot(chatbot_id, request, today)
        if plan.first_day is None:
            log.info("chatbot %s has no conversations yet", chatbot_id)
            return
        if plan.first_day_found and not request.sources:
            log.info("chatbot %s: first conversation on %s", chatbot_id, plan.first_day)
            with self._db() as connection:
                writes.remember_chatbot(connection, chatbot_id, first_day=plan.first_day)
        log.info(
            "chatbot %s: %d day(s) to fetch between %s and %s, in %d window(s)",
            chatbot_id,
            len(plan.days),
            plan.first_day,
            plan.last_day,
            len(plan.windows),
        )
        status = Progress(chatbot_id, windows_total=len(plan.windows))
        self._report(status)
        self._fetch_and_save(
            chatbot_id, request.sources, scope_of(request.sources), plan.windows, today, status
        )
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
                        log.info(
                            "chatbot %s: %s..%s done (window %d of %d)",
                            chatbot_id,
                            item.window.start,
                            item.window.end,
                            status.windows_done,
                            status.windows_total,
                        )
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
        """Save one page; the window's last page also records its days as fetched, in the same transaction.

        Whatever goes wrong with one record (reading, repairing, hashing, the rule, the database refusing
        it) is that record's problem: it is quarantined with the reason and the rest of the page is saved.
        """
        summary = self.summary
        now = self.now()
        rows: list[dict[str, Any]] = []
        bad: list[tuple[object, str]] = []
        unchanged = captured = 0
        known = self._fingerprints(page.records)
        for record in page.records:
            try:
                skip = self._unchanged(record, known, page.window, seen)
                if skip is not None:
                    unchanged += skip[0]
                    captured += skip[1]
                    continue
                row = normalize_conversation(record, chatbot_id, self.rule)
            except BadRecord as exc:
                bad.append((record, exc.reason))
                continue
            except Exception as exc:  # a fault of chatsync's on one record must not stop the sync
                log.warning("chatsync could not read conversation %s: %s", stored_id(record), _describe(exc))
                log.debug("the fault, for a bug report", exc_info=True)
                bad.append((record, f"chatsync could not read it ({_describe(exc)})"))
                continue
            if _claim(row["id"], row["created_at"].date(), page.window, seen):
                rows.append(row)
        days = [d for d in page.window.days if d < today] if page.last else []
        stored = {conversation_id: fingerprint[0] for conversation_id, fingerprint in known.items()}
        try:
            with self._db() as connection:
                counts = writes.upsert_conversations(connection, rows, now, stored)
                self._record_page(connection, chatbot_id, scope, bad, days, page.fetched_at, now)
        except DatabaseUnavailable:
            raise
        except Exception:
            # The page as a whole was refused (not a lost connection, which _db turns into
            # DatabaseUnavailable): store what is accepted row by row, quarantine the rest.
            counts = self._save_one_by_one(rows, bad, now)
            with self._db() as connection:
                self._record_page(connection, chatbot_id, scope, bad, days, page.fetched_at, now)
        for reason in {reason for _, reason in bad}:
            log.info("quarantined %d record(s) of chatbot %s: %s", _count(bad, reason), chatbot_id, reason)
        repaired = counts.repaired
        if repaired:
            log.info(
                "replaced text no database can hold (NUL, lone surrogates) with U+FFFD in %s",
                ", ".join(repaired),
            )
        summary.inserted += counts.inserted
        summary.updated += counts.updated
        summary.unchanged += counts.unchanged + unchanged
        summary.whatsapp_captured += counts.captured + captured
        summary.quarantined += len(bad)
        summary.repaired += len(repaired)
        summary.fetched += counts.inserted + counts.updated + counts.unchanged + unchanged + len(bad)

    def _fingerprints(self, records: list[Any]) -> dict[str, tuple[str, bool]]:
        ids = [key for key in map(stored_id, records) if key is not None]
        with self._db() as connection:
            return writes.stored_fingerprints(connection, ids)

    def _unchanged(
        self, record: Any, known: dict[str, tuple[str, bool]], window: Window, seen: set[str]
    ) -> tuple[int, int] | None:
        """(1, captured) for a stored conversation Chatbase sends unchanged, (0, 0) for one to pass over,
        None for one to normalise. Unchanged ones skip the rule and the write: the cron path is mostly them."""
        conversation_id = stored_id(record)
        if conversation_id is None or conversation_id not in known:
            return None  # new, or not even shaped like a conversation: normalising says which
        stored_hash, has_number = known[conversation_id]
        if content_hash(storable(record).canonical) != stored_hash:
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
            except DatabaseUnavailable:
                raise
            except Exception as exc:
                log.debug("the database refused conversation %s", row["id"], exc_info=True)
                record = {"id": row["id"], **row["raw"], "messages": row["messages"]}
                bad.append((record, f"database refused it: {_describe(exc)}"))
        return counts

    # ----------------------------------------------------------------------------------------------- helpers
    def _db(self) -> Any:
        return _Transaction(self.engine)

    def _report(self, status: Progress) -> None:
        if self.progress:
            self.progress(status)


def _options(request: SyncRequest) -> dict[str, Any]:
    """A request's options, for the same request about other chatbots."""
    return {
        "since": request.since,
        "until": request.until,
        "sources": request.sources,
        "lookback": request.lookback,
        "full": request.full,
    }


def _describe(exc: BaseException) -> str:
    """An exception as one short line for a quarantine reason: its type and the first line of its text."""
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()
    return f"{type(original).__name__}: {lines[0][:200]}" if lines else type(original).__name__


def _count(bad: list[tuple[object, str]], reason: str) -> int:
    return sum(1 for _, r in bad if r == reason)


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
