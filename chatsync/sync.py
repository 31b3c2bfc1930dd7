"""The sync engine: which days to fetch, fetching them in parallel, saving them exactly once.

How a run never loses or duplicates a conversation, and wastes no request:

* The days not yet settled form runs of consecutive days; each run is one stream of pages, newest
  first, and its pages are fetched several at once (as many as the concurrency and Chatbase's
  sliding-window rate limit allow), so the only part-filled page is each stream's last. A first run
  does not look for the chatbot's first day: it pages back from the history floor, and the last page
  shows the first day. Today, which still grows, is a stream of its own, paged in order.
* Worker processes read the pages (the WhatsApp rule, the canonical JSON and its hash); one writer
  thread saves them, each page whole in one transaction (pages already read when it is free share
  one, up to ``PAGES_PER_TRANSACTION``).
* As pages are saved, the days they complete are cut into windows, and a window's days are recorded
  as fetched in the same transaction as the page that completes it. A run killed at any moment leaves
  only whole pages behind, and days it had not finished are fetched again next time. Upserts are
  idempotent, so refetching is safe.
* API v2's export pages by cursor: page ``n`` needs the cursor page ``n - 1`` handed out. There each
  window of days is a stream of its own, paged in order, and the windows are fetched side by side; the
  chatbot's first day is asked for first (a few one-page probes), as there is no page to count from.
* A day counts as settled once it was fetched more than ``lookback`` after it ended: conversations
  keep growing for a while after they start, so later runs fetch recent days again. Today is never
  recorded as fetched.
"""

from __future__ import annotations

import logging
import math
import queue
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timedelta
from itertools import pairwise
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from chatsync.chatbase import (
    HISTORY_FLOOR,
    MAX_PAGES_PER_WINDOW,
    PAGE_SIZE,
    ConversationSource,
    PageAhead,
)
from chatsync.config import WhatsAppRule
from chatsync.errors import (
    BadRecord,
    ChatbaseRejected,
    ChatbaseUnavailable,
    ChatsyncError,
    DatabaseFailed,
    DatabaseUnavailable,
    ExitCode,
    LockHeld,
    LockLost,
    NormalizerCrashed,
    PagingError,
    Terminated,
    stop_message,
)
from chatsync.normalize import (
    V1_ONLY_FIELDS,
    V2_ONLY_FIELDS,
    normalize_conversation,
    stored_id,
    with_fields_kept,
)
from chatsync.signals import held as held_signals
from chatsync.store import writes
from chatsync.store.engine import (
    fails_every_row,
    is_down,
    ride_out,
    sqlite_error_name,
    sqlite_file_advice,
    sqlite_file_failed,
)
from chatsync.store.locks import KEPT_WITHOUT_DATABASE, chatbot_lock
from chatsync.timeutil import day_end, day_start, iso_z, parse_timestamp, utcnow
from chatsync.worker_server import default_workers
from chatsync.workers import (
    Outcome,
    PageTask,
    ReaderPool,
    bad_record,
    describe,
)

T = TypeVar("T")
MAX_WINDOW_DAYS = 31
# Pages already read when the writer is free go to the database together: one commit, one round of the
# per-transaction statements and rollup rows merged, for up to this many pages. Measured on two cores,
# 20,000 conversations into SQLite: the writer's CPU 5.8 s -> 5.0-5.4 s in a sync (1.7 pages a
# transaction on average), 6.8 s -> 5.3 s writing the same pages back to back. A run killed mid-batch
# loses at most these pages, which the next run fetches again.
PAGES_PER_TRANSACTION = 4
CHATBOT_REFUSALS = (403, 404)  # what Chatbase says of one chatbot (no access, not found), not of the key
STOP_PATIENCE_SECONDS = 1.0  # how long a Ctrl-C or SIGTERM waits for requests in flight
# Hosts of one cron round do not start at the same instant (a busy host starts seconds late): a chatbot
# whose sync finished this long before a shared run began was synced in this round.
ROUND_GRACE = timedelta(seconds=10)
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
    refused: list[str] = field(default_factory=list)  # chatbots Chatbase refused (not found, no access)
    # the chatbots synced to the end; in the summary only of a run that did not end well, whose failure
    # is then not theirs (``chatsync status`` reads it)
    synced: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for optional in ("skipped", "refused"):
            if not out[optional]:
                del out[optional]
        if self.status == "ok" and not self.refused:
            del out["synced"]
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
    first_day: date | None  # None: no conversation yet, or (with an open-start stream) not known yet
    last_day: date | None
    days: list[date]  # the days not yet settled, which this run fetches
    windows: list[Window]  # the ranges paged as one stream each
    first_day_found: bool  # asked Chatbase for it just now (the dry run of a first run, or --full)
    stored_per_window: dict[Window, int] = field(default_factory=dict)  # known only to plan()
    streams: list[Stream] = field(default_factory=list)
    page_size: int = PAGE_SIZE

    @property
    def estimated_requests(self) -> int:
        """One request per page: a window's stored conversations ÷ the page size (100 on v1, 20 on v2),
        plus its last short page.

        Conversations not stored yet are not known, so a first run needs more than this."""
        return sum(self.stored_per_window.get(w, 0) // self.page_size + 1 for w in self.windows)

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
    """Group consecutive days into windows: the checkpoints of a stream whose range is known, each
    recorded as fetched by the page that completes it (about ``2 * parallel`` of them, at most
    31 days each)."""
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


def scope_of(sources: tuple[str, ...], api: str = "v1") -> str:
    """The name fetched days are recorded under: ``*`` (every source) or the sources, comma-separated;
    on API v2 prefixed ``v2:`` (its records carry more, so days fetched through v1 are fetched again)."""
    scope = ",".join(sorted(sources)) if sources else "*"
    return scope if api == "v1" else f"{api}:{scope}"


# -------------------------------------------------------------------------------------------------- streams
@dataclass
class Stream:
    """A run of consecutive days paged as one sequence of ``get-conversations`` pages, newest first.

    Pages are addressed by number, so several are fetched at once (``ordered`` streams, whose range still
    grows while they are paged, fetch one page at a time and in order instead: a conversation started
    meanwhile only repeats a record on the next page, never hides one). The stream ends at its first
    short page. As pages are saved, the days they complete are cut into windows and recorded as fetched
    in the transaction of the page that completes them: pages 1..n all saved and their records all
    created on or after day D mean every day after D is complete. That holds while Chatbase pages newest
    first; the stream checks it on every page and, if a page breaks it, records its days only at the end.

    ``open_start``: the stream starts at the history floor because the chatbot's first day is not known
    yet; its windows are cut as the dates arrive instead of on ``windows``' grid, and days before its
    oldest conversation are not recorded.
    """

    window: Window
    ordered: bool = False
    open_start: bool = False
    windows: list[Window] = field(default_factory=list)  # the checkpoint grid, oldest first
    page_size: int = PAGE_SIZE  # records on a full page
    # paging, shared by the fetch threads (under the schedule's lock)
    next_page: int = 1
    last_page: int | None = None  # the first page that came back short
    in_flight: int = 0
    expected_pages: int | None = None  # how many pages the stream probably has; None: no idea yet
    stored: int | None = None  # conversations stored in its range when the run began; None: not counted
    full_page: int = 0  # the highest page that came back full
    ids: dict[int, list[object]] = field(default_factory=dict)  # page → its ids, to catch a repeated page
    # saving, the writer's alone
    saved: dict[int, tuple[date, date] | None] = field(default_factory=dict)  # page → (oldest, newest) day
    prefix: int = 0  # pages 1..prefix are saved
    bound: date | None = None  # the oldest day among pages 1..prefix
    newest_first: bool = True  # every page so far was newest first
    cut: date | None = None  # open_start: days from here on are recorded
    oldest: date | None = None  # the oldest day of any record claimed
    seen: dict[date, set[str]] = field(default_factory=dict)  # ids claimed, by day of creation
    finished: bool = False

    def wants(self, page: int) -> bool:
        """Whether ``page`` may still hold records (no earlier page came back short)."""
        return self.last_page is None or page <= self.last_page

    def may_ask(self, page: int) -> bool:
        """Whether to ask for ``page`` now: up to the pages the stream probably has at once, beyond them
        one at a time (each only once the one before came back full), so a stream's end costs no
        requests for pages that turn out empty."""
        if self.last_page is not None or (self.ordered and self.in_flight):
            return False
        return self.expected_pages is None or page <= max(self.expected_pages, self.full_page + 1)

    def learn(self, page: int, records: list[Any], last: bool | None = None) -> None:
        """What a page that came back says: the end (``last``, when the answer says so; else a page
        shorter than a full one), or how far the stream goes (from the pace of conversations on it, when
        nothing else told)."""
        if last if last is not None else len(records) < self.page_size:
            if self.last_page is None or page < self.last_page:
                self.last_page = page
            return
        self.full_page = max(self.full_page, page)
        if self.expected_pages is not None or self.open_start or not records:
            return  # (v2 may send an empty page that is not the last: follow its cursor)
        newest, oldest = _created(records[0]), _created(records[-1])
        if newest is None or oldest is None or newest <= oldest:
            return
        per_second = len(records) / (newest - oldest).total_seconds()
        left = (oldest - day_start(self.window.start)).total_seconds()
        self.expected_pages = page + max(0, math.ceil(per_second * left / self.page_size))

    def claim(self, conversation_id: str, created: date) -> bool:
        """Whether this copy of a conversation counts for this stream: created on one of its days (a server
        may answer wider than asked) and not already seen in it (pages shift while conversations arrive)."""
        if not self.window.start <= created <= self.window.end:
            return False
        ids = self.seen.setdefault(created, set())
        if conversation_id in ids:
            return False
        ids.add(conversation_id)
        if self.oldest is None or created < self.oldest:
            self.oldest = created
        return True

    def stored_now(self, conversation_id: str) -> bool:
        """Whether a copy of this conversation was claimed in this stream (stored, or found unchanged)."""
        return any(conversation_id in ids for ids in self.seen.values())

    def completes(self, page: int, days: list[date]) -> tuple[list[Window], bool]:
        """Windows that saving ``page`` (whose records were created on ``days``, in page order) completes,
        and whether it ends the stream; its records are claimed first. Call :meth:`commit` with the same
        arguments once the page is saved, or as it goes into one transaction with the pages after it."""
        state = self._advance(page, days)
        return state[0], state[1]

    def commit(self, page: int, days: list[date]) -> None:
        windows, finished, prefix, bound, newest_first, cut = self._advance(page, days)
        self.saved[page] = (min(days), max(days)) if days else None
        self.prefix, self.bound, self.newest_first, self.cut, self.finished = (
            prefix,
            bound,
            newest_first,
            cut,
            finished,
        )
        taken = {d for w in windows for d in w.days}
        self.windows = [w for w in self.windows if not set(w.days) <= taken]
        for page_done in [p for p in self.ids if p < prefix]:
            del self.ids[page_done]
        if bound is not None and newest_first:
            # a record of a complete day can no longer come back as a repeat
            for day in [d for d in self.seen if d > bound]:
                del self.seen[day]

    def _advance(
        self, page: int, days: list[date]
    ) -> tuple[list[Window], bool, int, date | None, bool, date | None]:
        saved = {**self.saved, page: (min(days), max(days)) if days else None}
        newest_first = self.newest_first and all(a >= b for a, b in pairwise(days))
        prefix, bound = self.prefix, self.bound
        while prefix + 1 in saved:
            span = saved[prefix + 1]
            if span is not None:
                if bound is not None and span[1] > bound:
                    newest_first = False
                bound = span[0] if bound is None else min(bound, span[0])
            prefix += 1
        finished = self.last_page is not None and prefix >= self.last_page
        if finished and self.open_start and self.oldest is None:
            return [], True, prefix, bound, newest_first, self.cut  # nothing at all: nothing to record
        if finished:
            limit = self.oldest if self.open_start and self.oldest else self.window.start
        elif newest_first and bound is not None:
            limit = bound + timedelta(days=1)
        else:
            return [], False, prefix, bound, newest_first, self.cut
        if self.open_start:
            cut = self.cut or self.window.end + timedelta(days=1)
            if limit >= cut:
                return [], finished, prefix, bound, newest_first, cut
            return [Window(limit, cut - timedelta(days=1))], finished, prefix, bound, newest_first, limit
        done = [w for w in self.windows if w.start >= limit]
        return done, finished, prefix, bound, newest_first, self.cut


def plan_streams(
    days: list[date],
    today: date,
    parallel: int,
    open_start: bool,
    cursor_paged: bool = False,
    page_size: int = PAGE_SIZE,
) -> list[Stream]:
    """Runs of consecutive days, each one stream; today (still growing) is a stream of its own, paged in
    order. ``open_start``: the first run starts at the history floor (see :class:`Stream`).
    ``cursor_paged`` (v2): every window of :func:`plan_windows` is a stream of its own, paged in order,
    so that the windows are fetched side by side."""
    streams: list[Stream] = []
    runs: list[list[date]] = []
    for day in days:
        if runs and day == runs[-1][-1] + timedelta(days=1) and day != today:
            runs[-1].append(day)
        else:
            runs.append([day])
    for run in runs:
        if run == [today]:
            streams.append(Stream(Window(today, today), ordered=True, page_size=page_size))
            continue
        if cursor_paged:
            streams.extend(
                Stream(window, ordered=True, windows=[window], page_size=page_size)
                for window in plan_windows(run, parallel)
            )
            continue
        floor = open_start and not streams
        grid = [] if floor else plan_windows(run, parallel)
        streams.append(Stream(Window(run[0], run[-1]), open_start=floor, windows=grid, page_size=page_size))
    return streams


class _Schedule:
    """Hands the fetch threads the next page to fetch, across streams, until every stream has ended."""

    def __init__(self, streams: list[Stream], stop: threading.Event) -> None:
        # ordered streams first: they have one page at a time to give and would wait behind the others
        self.streams = sorted(streams, key=lambda s: (not s.ordered, -s.window.end.toordinal()))
        self.stop = stop
        self.lock = threading.Condition()

    def next(self) -> tuple[Stream, int] | None:
        with self.lock:
            while not self.stop.is_set():
                for stream in self.streams:
                    if not stream.may_ask(stream.next_page):
                        continue
                    if stream.next_page > MAX_PAGES_PER_WINDOW:
                        raise PagingError(
                            f"more than {MAX_PAGES_PER_WINDOW} pages for {stream.window.start}..{stream.window.end}: "
                            "stopped paging"
                        )
                    page = stream.next_page
                    stream.next_page += 1
                    stream.in_flight += 1
                    return stream, page
                if all(s.last_page is not None for s in self.streams):
                    return None
                self.lock.wait(0.25)
            return None

    def arrived(self, stream: Stream, page: int, records: list[Any] | None, last: bool | None = None) -> None:
        """A page came back (None: it was not sent) and whether the answer said it was the last; raises
        PagingError when the server repeated a page."""
        with self.lock:
            stream.in_flight -= 1
            if records is not None:
                ids = [r.get("id") if isinstance(r, dict) else None for r in records]
                for neighbour in (page - 1, page + 1):
                    if records and stream.ids.get(neighbour) == ids:
                        first, second = sorted((neighbour, page))
                        raise PagingError(
                            f"Chatbase repeated page {first} as page {second} for "
                            f"{stream.window.start}..{stream.window.end}"
                        )
                stream.ids[page] = ids
                stream.learn(page, records, last)
            self.lock.notify_all()


def _created(record: Any) -> datetime | None:
    try:
        return parse_timestamp(record.get("created_at")) if isinstance(record, dict) else None
    except (ValueError, OverflowError, OSError):
        return None


# -------------------------------------------------------------------------------------------------- running
@dataclass
class _Fetched:
    stream: Stream
    page: int
    records: list[Any]
    body: bytes
    fetched_at: datetime


@dataclass
class _Reading:
    """A fetched page while a worker reads its records (``future``: None for a page without any)."""

    fetched: _Fetched
    known: dict[str, tuple[str, bool]]
    future: Future[list[Outcome]] | None
    pool: ReaderPool

    def outcomes(self) -> list[Outcome]:
        """What the worker read, in page order, waited for; raises BrokenProcessPool if a worker died."""
        return self.pool.result(self.future) if self.future is not None else []

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def read_well(self) -> bool:
        """Read, and not lost with a worker."""
        return self.future is None or (self.future.done() and self.future.exception() is None)


@dataclass
class _Prepared:
    """A read page as the writer writes it (see :meth:`Syncer._prepare`)."""

    reading: _Reading
    rows: list[dict[str, Any]]
    bad: list[tuple[object, str]]  # (record as quarantined, reason)
    claimed: list[str]  # ids stored or found unchanged now
    unchanged: int
    captured: int  # of the unchanged, those with a number found by the rule
    days_of_page: list[date]  # its records' days of creation, in page order
    windows: list[Window]  # completed by saving it
    finished: bool  # it ends its stream
    days: list[date]  # to record as fetched


_READY = object()  # a page's records have been read
_FETCHER_DONE = object()


class Syncer:
    """Runs one sync: owns the locks, the client's fetch threads, the reading workers and the single writer."""

    def __init__(
        self,
        engine: Engine,
        client: ConversationSource,
        rule: WhatsAppRule,
        concurrency: int = 8,
        progress: ProgressHook | None = None,
        now: Callable[[], datetime] = utcnow,
        workers: int | None = None,
        ahead: PageAhead | None = None,
    ) -> None:
        self.engine = engine
        self.ahead = ahead
        self.client = client
        self.rule = rule
        self.concurrency = max(1, concurrency)
        self.progress = progress
        self.now = now
        self.workers = default_workers() if workers is None else max(0, workers)
        self.run_id = str(uuid.uuid4())
        self.summary = SyncSummary()
        self._refusals: dict[str, ChatbaseRejected] = {}  # chatbots Chatbase refused so far (run order)
        self._windows_done = 0
        self._windows_total = 0

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
                self._riding_out(
                    lambda: locks.enter_context(chatbot_lock(self.engine, chatbot_id, on_lost=stop))  # noqa: B023
                )
            started = self.now()
            summary.started_at = iso_z(started)
            self._in_db(lambda c: writes.start_run(c, self.run_id, list(request.chatbot_ids), started))
            error: BaseException | None = None
            try:
                for chatbot_id in request.chatbot_ids:
                    self._sync_chatbot_or_note_refusal(chatbot_id, request)
                    if lost:
                        raise lost[0]
                self.raise_first_refusal()
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
        """Sync each chatbot whose lock is free and that no other process synced in this round (since
        ``ROUND_GRACE`` before this run began).

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
        self._in_db(lambda c: writes.start_run(c, self.run_id, [], started))
        error: BaseException | None = None
        try:
            for chatbot_id in request.chatbot_ids:
                try:
                    with ExitStack() as lock:
                        self._riding_out(
                            lambda: lock.enter_context(chatbot_lock(self.engine, chatbot_id, on_lost=stop))  # noqa: B023
                        )
                        done = self._in_db(
                            lambda c: writes.synced_since(c, chatbot_id, started - ROUND_GRACE)  # noqa: B023
                        )
                        if done:
                            log.info(
                                "chatbot %s: synced by another process in this round; skipped", chatbot_id
                            )
                            summary.skipped.append(chatbot_id)
                            continue
                        summary.chatbots.append(chatbot_id)
                        self._in_db(lambda c: writes.set_run_chatbots(c, self.run_id, summary.chatbots))
                        one = SyncRequest((chatbot_id,), **_options(request))
                        self._sync_chatbot_or_note_refusal(chatbot_id, one)
                        if lost:
                            raise lost[0]
                except LockHeld:
                    log.info("chatbot %s: another process is syncing it; skipped", chatbot_id)
                    summary.skipped.append(chatbot_id)
            self.raise_first_refusal()
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
        if error is not None and self._refusals and error not in self._refusals.values():
            # the run ended otherwise (a stop, an outage) before it could end with them: the chatbots
            # Chatbase refused are told of all the same
            for chatbot_id, refusal in self._refusals.items():
                log.error("chatbot %s: %s", chatbot_id, refusal)
        summary.requests = self.client.stats.requests
        summary.retries = self.client.stats.retries
        summary.finished_at = iso_z(self.now())
        # partial: retries ran out or the database went away, the next run continues; failed: anything else
        partial = isinstance(error, ChatsyncError) and error.exit_code == ExitCode.PARTIAL
        status = "ok" if error is None else "partial" if partial else "failed"
        summary.status = status  # the recorded summary says what `sync --json` says
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
        reason, ended = None if error is None else _reason(error), self.now()

        def record(connection: Any) -> None:
            writes.finish_run(connection, self.run_id, status, summary.as_dict(), reason, ended)

        try:
            # a run that did its work waits for its database to record so; one that is ending on a stop or
            # an outage does not wait again (`status` then shows it interrupted, its log says why)
            if error is None:
                self._in_db(record)
            else:
                with self._db() as connection:
                    record(connection)
        except DatabaseUnavailable:
            pass  # the database is gone; the next run marks this one interrupted

    # ----------------------------------------------------------------------------------------- one chatbot
    def plan(self, request: SyncRequest) -> list[ChatbotPlan]:
        """What a run of ``request`` would fetch, without taking locks or writing anything.

        A chatbot whose first day chatsync does not know yet costs the requests that find it (about 12);
        nothing else is fetched. (A sync itself does not look for it: its first pages show it.) A chatbot
        Chatbase refuses alone is left out and noted, as a run does: :meth:`first_refusal` next.
        """
        plans = []
        for chatbot_id in request.chatbot_ids:
            try:
                plan = self._plan_chatbot(chatbot_id, request, self.now().date(), find_first_day=True)
            except ChatbaseRejected as exc:
                self._note_refusal(chatbot_id, exc)
                continue
            stored = self._in_db(
                lambda c: {
                    w: writes.count_conversations(c, chatbot_id, w.start, w.end)  # noqa: B023
                    for w in plan.windows  # noqa: B023
                }
            )
            plans.append(replace(plan, stored_per_window=stored))
        self.summary.requests = self.client.stats.requests
        return plans

    def _plan_chatbot(
        self, chatbot_id: str, request: SyncRequest, today: date, find_first_day: bool = False
    ) -> ChatbotPlan:
        """The days to fetch and their streams. Without a known first day (the first run, or --full) a sync
        pages from the history floor and learns the first day from the last page; ``find_first_day`` asks
        Chatbase for it first instead (the dry run, which fetches nothing else)."""
        client = self.client
        scope, everything = scope_of(request.sources, client.api), scope_of((), client.api)
        known_first = self._in_db(lambda c: writes.chatbot_first_day(c, chatbot_id))
        first = request.since
        found = open_start = False
        if first is None:
            first = known_first
            if first is None or request.full:
                if find_first_day or client.cursor_paged:  # v2 has no page numbers to page back from
                    first = client.find_first_day(chatbot_id, today, request.sources)
                    found = first is not None
                    if first is None:
                        return ChatbotPlan(chatbot_id, None, None, [], [], False)
                else:
                    first, open_start = HISTORY_FLOOR, True
        last = min(request.until or today, today)
        if first > last:
            return ChatbotPlan(chatbot_id, first, last, [], [], found)
        fetched = self._in_db(lambda c: writes.fetched_days(c, chatbot_id, {everything, scope}, first, last))
        days = days_to_fetch(first, last, fetched, request.lookback, request.full)
        streams = plan_streams(
            days, today, self.concurrency, open_start, client.cursor_paged, client.page_size
        )
        counts = self._in_db(
            lambda c: [
                writes.count_conversations(c, chatbot_id, s.window.start, s.window.end) for s in streams
            ]
        )
        for stream, count in zip(streams, counts, strict=True):
            stream.stored = count
            if stream.stored and not stream.open_start and not request.sources:
                # what is stored says how far the stream goes; nothing stored says nothing yet
                stream.expected_pages = stream.stored // client.page_size + 1
        plan = ChatbotPlan(
            chatbot_id,
            None if open_start else first,
            last,
            days,
            [s.window for s in streams],
            found,
            page_size=client.page_size,
        )
        plan.streams.extend(streams)
        return plan

    def _sync_chatbot_or_note_refusal(self, chatbot_id: str, request: SyncRequest) -> None:
        """Sync one chatbot; if Chatbase refuses that chatbot alone (404 not found, 403 no access), note it
        in the summary and go on: one mistyped id among several must not leave the others unsynced. The
        run fails with the first refusal once every chatbot has had its turn (:meth:`raise_first_refusal`).
        A refused key (401) or request (400) is every chatbot's problem and ends the run at once."""
        try:
            self._sync_chatbot(chatbot_id, request)
            self.summary.synced.append(chatbot_id)
        except ChatbaseRejected as exc:
            self._note_refusal(chatbot_id, exc)

    def _note_refusal(self, chatbot_id: str, exc: ChatbaseRejected) -> None:
        """Note a refusal of ``chatbot_id`` alone (see :meth:`_sync_chatbot_or_note_refusal`); re-raise
        one every chatbot would get."""
        if exc.status not in CHATBOT_REFUSALS or exc.every_chatbot:
            raise exc
        self.summary.refused.append(chatbot_id)
        self._refusals[chatbot_id] = exc
        # The refusal stopped this chatbot's requests; the next chatbot's may go. (A lock lost meanwhile
        # also set it: the caller, which checks for that next, ends the run.)
        self.client.stop.clear()

    def first_refusal(self) -> ChatbaseRejected | None:
        """The first refusal Chatbase gave, which the run ends with (the command's error line), after
        naming each further refused chatbot on a log line of its own; None when there was none."""
        noted = list(self._refusals.items())
        for chatbot_id, exc in noted[1:]:
            log.error("chatbot %s: %s", chatbot_id, exc)
        return noted[0][1] if noted else None

    def raise_first_refusal(self) -> None:
        """End a run in which Chatbase refused chatbots with :meth:`first_refusal`."""
        refusal = self.first_refusal()
        if refusal is not None:
            raise refusal

    def _sync_chatbot(self, chatbot_id: str, request: SyncRequest) -> None:
        today = self.now().date()
        self._in_db(lambda c: writes.remember_chatbot(c, chatbot_id))
        try:
            self._sync_known_chatbot(chatbot_id, request, today)
        except ChatbaseRejected as exc:
            if exc.status == 404:
                # a mistyped id: `status` must not list it (and `--max-age` fail on it) for ever after
                self._in_db(lambda c: writes.forget_chatbot_if_empty(c, chatbot_id))
            raise

    def _sync_known_chatbot(self, chatbot_id: str, request: SyncRequest, today: date) -> None:
        plan = self._plan_chatbot(chatbot_id, request, today)
        open_start = any(s.open_start for s in plan.streams)
        if plan.first_day is None and not open_start:
            log.info("chatbot %s has no conversations yet", chatbot_id)
            return
        log.info(
            "chatbot %s: %d day(s) to fetch, %s to %s, in %d stream(s)",
            chatbot_id,
            len(plan.days),
            plan.days[0] if plan.days and plan.first_day else "its first conversation",
            plan.days[-1] if plan.days else plan.last_day,
            len(plan.streams),
        )
        if plan.first_day_found and plan.first_day and not request.sources:
            # Chatbase named it (v2 asks before paging): a fact whether or not this run completes
            first_day = plan.first_day
            self._in_db(lambda c: writes.remember_chatbot(c, chatbot_id, first_day=first_day))
        self._windows_done = 0
        self._windows_total = sum(max(1, len(s.windows)) for s in plan.streams if not s.ordered)
        status = Progress(chatbot_id, windows_total=len(plan.streams))
        self._report(status)
        self._fetch_and_save(
            chatbot_id,
            request.sources,
            scope_of(request.sources, self.client.api),
            plan.streams,
            today,
            status,
        )
        if open_start:
            # Only a stream paged to its end has seen the first conversation: a partial one's oldest
            # record is not the first day, and remembering it would hide the days before it for good.
            floor = next(s for s in plan.streams if s.open_start)
            oldest = [s.oldest for s in plan.streams if s.oldest is not None]
            if floor.finished and not oldest:
                log.info("chatbot %s has no conversations yet", chatbot_id)
            elif floor.finished and not request.sources:
                log.info("chatbot %s: first conversation on %s", chatbot_id, min(oldest))
                self._in_db(lambda c: writes.remember_chatbot(c, chatbot_id, first_day=min(oldest)))
        if request.since is None and request.until is None and not request.sources:
            # only a sync of everything up to today is a complete one (what `status --max-age` watches)
            synced_at = self.now()
            self._in_db(lambda c: writes.remember_chatbot(c, chatbot_id, synced_at=synced_at))

    def _fetch_and_save(
        self,
        chatbot_id: str,
        sources: tuple[str, ...],
        scope: str,
        streams: list[Stream],
        today: date,
        status: Progress,
    ) -> None:
        """Fetch the streams' pages with ``concurrency`` threads, read them in the worker processes, and save
        them in this thread in the order they arrive, the pages already read together (up to
        ``PAGES_PER_TRANSACTION`` a transaction)."""
        events: queue.Queue[object] = queue.Queue()
        # Pages read ahead of the writer, and so fetched and not yet saved: bounds memory (a page's body is
        # ~150 kB, decoded ~1.5 MB). Two a worker left the writer waiting for the page it needed next 1.2 s
        # of a 6 s sync of 20,000 conversations (two workers sharing two cores with it); six, 0.3 s. Twelve
        # at most: four workers with 24 took the sync of 200,000 past 200 MB.
        depth = min(12, max(4, 6 * self.workers))
        held = threading.Semaphore(self.concurrency + depth)
        schedule = _Schedule(streams, self.client.stop)
        stop = self.client.stop

        def fetch() -> None:
            try:
                while True:
                    task = schedule.next()
                    if task is None:
                        return
                    stream, number = task
                    while not held.acquire(timeout=0.2):
                        if stop.is_set():
                            schedule.arrived(stream, number, None)
                            return
                    fetched_at = self.now()
                    window = stream.window
                    taken = None
                    if self.ahead is not None and window.start == window.end == today:
                        # asked for before the plan (PageAhead); only today's, which is never recorded
                        # as fetched: a day that ended meanwhile must be fetched after it ended
                        taken = self.ahead.take(chatbot_id, number, window.start, window.end, sources)
                    if taken is not None:
                        page, fetched_at = taken
                    else:
                        page = self.client.fetch_page(
                            chatbot_id,
                            number,
                            window.start,
                            window.end,
                            sources,
                            wanted=lambda: stream.wants(number),  # noqa: B023 (called before the loop moves on)
                        )
                    ended = stream.last_page
                    schedule.arrived(
                        stream, number, page.records if page else None, page.last if page else None
                    )
                    if stream.last_page != ended:
                        # pages past the new end that wait for the rate limit give up now, not at their slot
                        self.client.limiter.reconsider()
                    if page is None or (not page.records and not stream.wants(number)):
                        held.release()  # not sent, or an empty page past the end
                        continue
                    events.put(_Fetched(stream, number, page.records, page.body, fetched_at))
            except BaseException as exc:
                events.put(_Failed(exc))
            finally:
                events.put(_FETCHER_DONE)

        fetchers = [
            threading.Thread(target=fetch, name=f"chatsync-fetch-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        first_error: BaseException | None = None
        patience: float | None = None  # (monotonic) when a stop stops waiting for the fetchers
        pending: deque[_Reading] = deque()
        running = len(fetchers)
        with ReaderPool(self.workers) as pool:
            for thread in fetchers:
                thread.start()
            try:
                while running or pending:
                    while pending and (pending[0].done() or len(pending) > depth or not running):
                        batch = [pending.popleft()]
                        while pending and len(batch) < PAGES_PER_TRANSACTION and pending[0].read_well():
                            batch.append(pending.popleft())
                        try:
                            if first_error is None:
                                self._save(chatbot_id, scope, batch, today, status)
                        except (DatabaseUnavailable, BrokenProcessPool) as exc:
                            first_error = _crashed(exc) if isinstance(exc, BrokenProcessPool) else exc
                            stop.set()  # no new requests; nothing more is saved
                        finally:
                            for _ in batch:
                                held.release()
                    if not running:
                        continue
                    item = events.get()
                    if item is _FETCHER_DONE:
                        running -= 1
                    elif isinstance(item, _Failed):
                        if first_error is None:
                            first_error = item.error
                        stop.set()  # no new requests; pages already fetched are still saved
                    elif isinstance(item, _Fetched):
                        if first_error is not None and not isinstance(first_error, ChatbaseUnavailable):
                            held.release()
                            continue
                        try:
                            pending.append(self._read(chatbot_id, item, pool, events))
                        except (DatabaseUnavailable, BrokenProcessPool) as exc:
                            first_error = _crashed(exc) if isinstance(exc, BrokenProcessPool) else exc
                            stop.set()
                            held.release()
            except BaseException as exc:
                # The writer itself failed: stop fetching and let the fetchers end.
                stop.set()
                if isinstance(exc, KeyboardInterrupt | Terminated):
                    # Asked to stop: a request in flight may take its whole timeout to answer (30 s a
                    # read; a server trickling bytes, for ever), and its page would not be saved. The
                    # fetchers (daemon threads) are given a moment, then left to end with their request.
                    patience = time.monotonic() + STOP_PATIENCE_SECONDS
                raise
            finally:
                stop.set() if first_error is not None else None
                for thread in fetchers:
                    thread.join(None if patience is None else max(0.0, patience - time.monotonic()))
        if first_error is not None:
            raise first_error
        unfinished = [s for s in streams if not s.finished]
        if stop.is_set() and unfinished:  # stopped from outside (a lost lock): not a complete sync
            raise ChatbaseUnavailable("sync stopped before every page was fetched")

    def _read(
        self, chatbot_id: str, fetched: _Fetched, pool: ReaderPool, events: queue.Queue[object]
    ) -> _Reading:
        """Start reading a page in a worker, with the stored hashes of its conversations that are stored
        (the cron path is mostly conversations Chatbase sends unchanged, which the worker finds). The
        worker decodes the page exactly: this thread's fast decoding reads an integer beyond 64 bits as a
        float, which could make a changed conversation look unchanged."""
        records = fetched.records
        ids = [stored_id(r) for r in records]
        # A range with nothing stored when the run began holds only what this run stores (one sync per
        # chatbot; a repeat within the stream is not claimed twice): no need to ask the database.
        looked_up = fetched.stream.stored != 0
        known = self._fingerprints([i for i in ids if i is not None]) if looked_up else {}
        future = None
        if records:
            task = PageTask(
                fetched.body,
                {i: fingerprint[0] for i, fingerprint in known.items()},
                chatbot_id,
                self.rule,
                export=self.client.api == "v2",
            )
            future = pool.submit(task)
            future.add_done_callback(lambda _: events.put(_READY))
        return _Reading(fetched, known, future, pool)

    def _save(
        self, chatbot_id: str, scope: str, readings: list[_Reading], today: date, status: Progress
    ) -> None:
        """Save pages (in the order fetched) in one transaction, with the windows of days they complete.

        Whatever goes wrong with one record (reading, repairing, hashing, the rule, the database refusing
        it) is that record's problem: it is quarantined with the reason and the rest of the page is saved.
        """
        now = self.now()
        pages = []
        for reading in readings:
            page = self._prepare(chatbot_id, reading, today)
            # the next page of the stream completes windows counting this one (saved with it, or not at all)
            reading.fetched.stream.commit(reading.fetched.page, page.days_of_page)
            pages.append(page)
        kept = [len(page.bad) for page in pages]
        prepared = [page.rows for page in pages]
        tries = 0

        def write() -> writes.UpsertCounts:
            nonlocal tries
            tries += 1
            for page, bad in zip(pages, kept, strict=True):
                del page.bad[bad:]  # (what a try that the database lost added)
            committed = self._committed_by_lost_try(pages, prepared) if tries > 1 else writes.UpsertCounts()
            with _stops_wait():  # (what the transaction committed is counted; reading pages is not held)
                counts = self._write(chatbot_id, scope, pages, now)
                counts.add(committed)
                self._add_to_summary(pages, counts)
            return counts

        counts = self._riding_out(write)
        bad = [b for page in pages for b in page.bad]
        for reason in {reason for _, reason in bad}:
            log.info("quarantined %d record(s) of chatbot %s: %s", _count(bad, reason), chatbot_id, reason)
        repaired = counts.repaired
        if repaired:
            log.info(
                "replaced text no database can hold (NUL, lone surrogates) with U+FFFD in %s",
                ", ".join(repaired),
            )
        for page in pages:
            status.conversations += len(page.reading.fetched.records)
            for window in page.windows:
                self._windows_done += 1
                log.info(
                    "chatbot %s: %s..%s done (window %d of %d)",
                    chatbot_id,
                    window.start,
                    window.end,
                    self._windows_done,
                    max(self._windows_total, self._windows_done),
                )
            if page.finished:
                status.windows_done += 1
        self._report(status)

    def _committed_by_lost_try(
        self, pages: list[_Prepared], prepared: list[list[dict[str, Any]]]
    ) -> writes.UpsertCounts:
        """Before a page's transaction is tried again: the conversations an earlier try committed although
        the database's answer was lost (each stored now with the hash it was to be written with), taken out
        of the pages' rows and counted as that try wrote them, against the hashes stored before it. The
        rest of each page is written again, its bookkeeping included (which writes the same twice). Without
        this the run's summary counted them unchanged."""
        ids = [row["id"] for rows in prepared for row in rows]
        with self.engine.connect() as connection:  # (a lost database: DatabaseUnavailable, _riding_out)
            now_stored = writes.stored_fingerprints(connection, ids) if ids else {}
        counts = writes.UpsertCounts()
        for page, rows in zip(pages, prepared, strict=True):
            committed = [r for r in rows if now_stored.get(r["id"], ("",))[0] == r["content_hash"]]
            if committed:
                before = {i: fingerprint[0] for i, fingerprint in page.reading.known.items()}
                counts.add(writes.upsert_counts(committed, before))
                done = {r["id"] for r in committed}
                page.rows = [r for r in rows if r["id"] not in done]
            else:
                page.rows = rows
        return counts

    def _add_to_summary(self, pages: list[_Prepared], counts: writes.UpsertCounts) -> None:
        """Add saved pages to the run's summary."""
        summary = self.summary
        unchanged = sum(page.unchanged for page in pages)
        bad = sum(len(page.bad) for page in pages)
        summary.inserted += counts.inserted
        summary.updated += counts.updated
        summary.unchanged += counts.unchanged + unchanged
        summary.whatsapp_captured += counts.captured + sum(page.captured for page in pages)
        summary.quarantined += bad
        summary.repaired += len(counts.repaired)
        summary.fetched += counts.inserted + counts.updated + counts.unchanged + unchanged + bad

    def _prepare(self, chatbot_id: str, reading: _Reading, today: date) -> _Prepared:
        """A read page as what to write: rows to store, records to quarantine, ids claimed, days done."""
        fetched, stream = reading.fetched, reading.fetched.stream
        outcomes = reading.outcomes()  # (in page order)
        rows: list[dict[str, Any]] = []
        bad: list[tuple[object, str]] = []
        claimed: list[str] = []  # conversations of this page stored (or found unchanged) now
        unchanged = captured = 0
        for outcome in outcomes:
            if outcome.kind == "bad":
                if outcome.conversation_id is not None and stream.stored_now(outcome.conversation_id):
                    # Pages are saved as they arrive: the unreadable copy may come after the copy stored,
                    # whichever page holds it. The stored one stands; kept as well, a retry of the
                    # quarantine could put the unreadable one back over it.
                    log.info(
                        "conversation %s: an unreadable copy after the one stored in this run, not kept: %s",
                        outcome.conversation_id,
                        outcome.reason,
                    )
                    continue
                if outcome.fault:
                    log.warning(
                        "chatsync could not read conversation %s: %s", outcome.conversation_id, outcome.reason
                    )
                    log.debug("the fault, for a bug report:")
                    for fault_line in outcome.fault.splitlines():  # (a log record is one line)
                        log.debug("  %s", fault_line)
                bad.append((outcome.kept, outcome.reason or "unreadable"))
                continue
            assert outcome.conversation_id is not None and outcome.created is not None
            window = stream.window
            if self.client.cursor_paged and not window.start <= outcome.created <= window.end:
                # v2 filters by its own creation time: a record that says otherwise has a broken createdAt
                reason = (
                    f"createdAt says {outcome.created}, outside the days {window.start}..{window.end} "
                    "Chatbase filed it under: its creation time cannot be right"
                )
                bad.append((bad_record(fetched.records[outcome.index], reason), reason))
                continue
            if not stream.claim(outcome.conversation_id, outcome.created):
                continue
            claimed.append(outcome.conversation_id)
            if outcome.kind == "unchanged":
                unchanged += 1
                captured += int(reading.known[outcome.conversation_id][1])
            elif outcome.row is not None:
                rows.append(outcome.row)
        rows = self._keep_other_api_fields(chatbot_id, rows, reading.known)
        days_of_page = [o.created for o in outcomes if o.created is not None]
        windows, finished = stream.completes(fetched.page, days_of_page)
        days = [d for w in windows for d in w.days if d < today]
        return _Prepared(
            reading, rows, bad, claimed, unchanged, captured, days_of_page, windows, finished, days
        )

    def _write(
        self, chatbot_id: str, scope: str, pages: list[_Prepared], now: datetime
    ) -> writes.UpsertCounts:
        """Write prepared pages in one transaction. A batch the database refuses as a whole (not a lost
        connection, which _db turns into DatabaseUnavailable) is written a page at a time, and a page it
        refuses row by row, quarantining what it does not accept."""
        rows = [row for page in pages for row in page.rows]
        stored = {i: fingerprint[0] for page in pages for i, fingerprint in page.reading.known.items()}
        try:
            with self._db() as connection:
                counts = writes.upsert_conversations(connection, rows, now, stored)
                for page in pages:
                    self._record_page(connection, chatbot_id, scope, page, page.claimed, now)
            return counts
        except DatabaseUnavailable:
            raise
        except Exception:
            if len(pages) > 1:
                counts = writes.UpsertCounts()
                for page in pages:
                    counts.add(self._write(chatbot_id, scope, [page], now))
                return counts
        page = pages[0]
        counts = self._save_one_by_one(page.rows, page.bad, now)
        refused = {r.get("id") for r, _ in page.bad if isinstance(r, dict)}
        good = [i for i in page.claimed if i not in refused]
        with self._db() as connection:
            self._record_page(connection, chatbot_id, scope, page, good, now)
        return counts

    def _keep_other_api_fields(
        self, chatbot_id: str, rows: list[dict[str, Any]], known: dict[str, tuple[str, bool]]
    ) -> list[dict[str, Any]]:
        """Rows of conversations stored before, with the fields only the other API version sends kept from
        the stored copy (:func:`chatsync.normalize.with_fields_kept`) and read again; the content hash stays
        the one of what was sent, so an unchanged conversation is still found unchanged next time. Costs
        one read of the stored records for a page with changed conversations, none otherwise."""
        fields = V1_ONLY_FIELDS if self.client.api == "v2" else V2_ONLY_FIELDS
        ids = [r["id"] for r in rows if r["id"] in known]
        if not ids:
            return rows

        stored = self._in_db(lambda c: writes.stored_raw(c, ids))
        out = []
        for row in rows:
            merged = None
            if row["id"] in stored:
                record = {**writes.decoded_json(row["raw"]), "messages": writes.decoded_json(row["messages"])}
                merged = with_fields_kept(record, stored[row["id"]], fields)
            if merged is None:
                out.append(row)
                continue
            try:
                kept = normalize_conversation(merged, chatbot_id, self.rule)
            except BadRecord:
                out.append(row)  # what the other version sent does not fit any more: store what was sent
                continue
            kept["content_hash"], kept["text_repaired"] = row["content_hash"], row["text_repaired"]
            kept["messages"], kept["raw"] = (
                writes.encode_json(kept["messages"]),
                writes.encode_json(kept["raw"]),
            )
            out.append(kept)
        return out

    def _fingerprints(self, ids: list[str]) -> dict[str, tuple[str, bool]]:
        def read() -> dict[str, tuple[str, bool]]:
            with self.engine.connect() as connection:  # (a lost database: DatabaseUnavailable, _riding_out)
                return writes.stored_fingerprints(connection, ids)

        return self._riding_out(read)

    def _record_page(
        self, connection: Any, chatbot_id: str, scope: str, page: _Prepared, good: list[str], now: datetime
    ) -> None:
        """The page's quarantine, in its transaction: new bad records in, and out any older quarantined copy
        of a conversation stored now (``good``: it is no longer the latest Chatbase sent); its days as
        fetched."""
        writes.release_from_quarantine(connection, chatbot_id, good)
        for record, reason in page.bad:
            writes.quarantine_record(connection, chatbot_id, record, reason, self.run_id, now)
        writes.mark_days_fetched(connection, chatbot_id, scope, page.days, page.reading.fetched.fetched_at)

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
                raw = writes.decoded_json(row["raw"])
                record = {"id": row["id"], **raw, "messages": writes.decoded_json(row["messages"])}
                bad.append((record, f"database refused it: {describe(exc)}"))
        return counts

    # ----------------------------------------------------------------------------------------------- helpers
    def _db(self) -> Any:
        return _Transaction(self.engine)

    def _in_db(self, work: Callable[[Any], T]) -> T:
        """``work(connection)`` in a transaction of its own, tried again while the database is down
        (:meth:`_riding_out`): a step of the run that reads, or writes what a second try writes the same."""

        def attempt() -> T:
            with self._db() as connection:
                return work(connection)

        return self._riding_out(attempt)

    def _riding_out(self, action: Callable[[], T]) -> T:
        """``action`` (one of the writer's reads or transactions) tried again while the database is down (a
        restart, a failover: :func:`chatsync.store.engine.is_down`), for up to the retry budget from its
        first failure and while the run goes on; then its last DatabaseUnavailable, saying for how long.

        Trying a transaction again writes each conversation once: the database rolled back the one it
        lost, or, when it was lost in its commit after all, the next try finds its conversations stored
        and counts them as written (:meth:`_committed_by_lost_try`)."""
        budget = self.client.retry_budget
        began = time.monotonic()
        failed = False

        def attempt() -> T:
            try:
                return action()
            except DBAPIError as exc:  # (one not made DatabaseUnavailable on its way: a lock, a read)
                raise _unavailable(exc) from None

        def warn(error: BaseException) -> None:
            nonlocal failed
            failed = True
            # (only PostgreSQL is waited for, and its sync lock is kept that long without the database)
            lock = KEPT_WITHOUT_DATABASE.total_seconds()
            until = (
                f", or until the sync lock lapses ({lock:.0f} s after it was last renewed)"
                if budget > lock
                else ""
            )
            log.warning(
                "%s: trying again for up to %.0f s, the retry budget%s", _first_line(error), budget, until
            )

        try:
            done = ride_out(
                attempt,
                budget,
                down=lambda exc: isinstance(exc, DatabaseUnavailable) and exc.down,
                warn=warn,
                stop=self.client.stop,
            )
        except DatabaseUnavailable as exc:
            if not failed:  # (not down, or the run was stopped before a second try)
                raise
            raise DatabaseUnavailable(
                f"{_first_line(exc)}, and stayed away for {time.monotonic() - began:.0f} s (retry budget "
                f"{budget:.0f} s); {_KEPT}"
            ) from None
        if failed:
            log.warning("the database is back, %.1f s after it failed", time.monotonic() - began)
        return done

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


@dataclass
class _Failed:
    error: BaseException


def _crashed(exc: BrokenProcessPool) -> NormalizerCrashed:
    return NormalizerCrashed(
        "a worker process reading conversations died; what was saved is kept and the next run continues"
    )


def _count(bad: list[tuple[object, str]], reason: str) -> int:
    return sum(1 for _, r in bad if r == reason)


def _stops_wait() -> AbstractContextManager[None]:
    """Hold Ctrl-C and SIGTERM for a block that must not be cut in the middle (a transaction, a save and
    its count): one that arrives meanwhile is taken as the block ends (:func:`chatsync.signals.held`)."""
    return held_signals(signal.SIGINT, signal.SIGTERM)


class _Transaction:
    """``engine.begin()`` that turns a lost database into DatabaseUnavailable, and that a stop (Ctrl-C,
    SIGTERM) waits for: it lands between two transactions, never inside one.

    Raised inside one (in the middle of a bulk insert), a stop left the transaction open: the
    statement it broke stays alive with the error's traceback, so SQLite kept the connection and its
    write lock, and the run's last write (its status) waited the whole busy timeout, 30 s, then failed
    (seen by a SIGTERM test on a loaded machine). A transaction takes milliseconds; a stop that comes
    meanwhile is taken as it ends, committed or rolled back.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._context: Any = None
        self._hold = _stops_wait()

    def __enter__(self) -> Any:
        self._hold.__enter__()
        try:
            self._context = self.engine.begin()
            return self._context.__enter__()
        except BaseException as exc:
            self._hold.__exit__(None, None, None)
            if isinstance(exc, DBAPIError):
                raise _unavailable(exc) from None
            raise

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            try:
                self._context.__exit__(exc_type, exc, tb)
            except DBAPIError as error:
                raise _unavailable(error) from None
            if isinstance(exc, DBAPIError) and (
                exc.connection_invalidated or isinstance(exc, OperationalError) or fails_every_row(exc)
            ):
                raise _unavailable(exc) from None  # (not rows the database refused: none is quarantined)
        finally:
            self._hold.__exit__(None, None, None)  # a stop that came meanwhile is raised now


_KEPT = "what was committed is kept and the next run continues"  # the advice ending a lost database's error


def _unavailable(exc: DBAPIError) -> DatabaseUnavailable:
    """What a database error that ends a step of the run means: a database down for now (ridden out
    when ``down``), or one that fails a statement for a reason of its own (:class:`DatabaseFailed`)."""
    first = str(exc.orig or exc).strip().splitlines()
    what = first[0] if first else type(exc).__name__
    sqlite_error = sqlite_error_name(exc)
    if sqlite_error is not None:  # (a file on this machine does not go away)
        if sqlite_file_failed(exc):
            return DatabaseFailed(
                f"the database file could not be written ({what}): {sqlite_file_advice(exc)}; {_KEPT}"
            )
        if sqlite_error.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):  # (another program's lock: it passes)
            return DatabaseUnavailable(
                f"the database stayed locked by another program past the busy timeout mid-run ({what}); {_KEPT}"
            )
        return DatabaseFailed(f"the database failed a statement mid-run ({what}); {_KEPT}")
    # PostgreSQL answered a statement with an error of its own: a connection it turns away has no SQLSTATE
    if getattr(exc.orig, "sqlstate", None) and not exc.connection_invalidated and not is_down(exc):
        return DatabaseFailed(
            f"the database failed a statement mid-run ({what}): check its settings (statement_timeout), "
            f"free space and chatsync's privileges; {_KEPT}"
        )
    return DatabaseUnavailable(f"the database went away mid-run ({what}); {_KEPT}", down=is_down(exc))


def _first_line(error: BaseException) -> str:
    """A lost database's message up to its advice: "the database went away mid-run (…)"."""
    return str(error).split(f"; {_KEPT}", 1)[0]


def _reason(error: BaseException) -> str:
    """Why a run failed, as ``chatsync status`` shows it: what stopped it (an interrupt's own message is
    empty, which once left a Ctrl-C looking like an unexplained failure), else the error's message."""
    return stop_message(error) or str(error) or type(error).__name__
