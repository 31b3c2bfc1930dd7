"""The Chatbase API v2 client: the conversations export and the agents list. No SQL here.

``GET /agents/{agentId}/conversations/export`` returns conversations of every source with per-message
``createdAt``, ``feedback`` and the conversation ``status``, newest first, 1–20 a page, paged by an
opaque cursor with ``pagination: {cursor, hasMore, total}``. The last page is the one with ``hasMore``
false or no cursor. Records are yielded raw; :func:`chatsync.chatbase_records.record_from_export` turns
one into the record shape the rest of chatsync reads.

Requests, the rate limiter and retries are :class:`chatsync.chatbase.ChatbaseHTTP`'s, shared with v1:
429, 5xx and transport errors are retried within the budget honouring ``Retry-After``, else
``X-RateLimit-Reset`` (epoch seconds or milliseconds); 400 ``VALIDATION_INVALID_DATE_RANGE`` is a usage
error; other 4xx fail at once naming the setting to fix, with Chatbase's ``x-request-id``.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote

from chatsync.chatbase import (
    HISTORY_FLOOR,
    MAX_PAGES_PER_WINDOW,
    ChatbaseHTTP,
    Chatbot,
    ConversationPage,
    chatbots_from,
    rejection_hint,
)
from chatsync.chatbase_records import record_from_export
from chatsync.config import DEFAULT_API_URL, mask_url
from chatsync.errors import ChatbaseRejected, ChatbaseUnavailable, ChatsyncError, PagingError, UsageError

DEFAULT_V2_BASE_URL = "https://www.chatbase.co/api/v2"  # operation paths are appended: keep /api/v2
EXPORT_PAGE_SIZE = 20  # the export's maximum and default
AGENTS_PAGE_SIZE = 100
_AGENT_IN_PATH = re.compile(r"agents/([^/]+)")


@dataclass(frozen=True)
class CursorPage:
    """One page of a cursor-paged v2 list (the export, the agents): its raw records, the next cursor
    (None at the end), ``hasMore`` and ``total`` (items matching the query, all pages together)."""

    records: list[Any]
    cursor: str | None
    has_more: bool
    total: int | None


class ChatbaseV2Client(ChatbaseHTTP):
    """Talks to Chatbase API v2 (``base_url`` ends in ``/api/v2``); the sync engine's interface is the
    v1 client's: ``fetch_page``, ``iter_pages``, ``find_first_day``, ``list_chatbots``, ``stats``,
    ``stop``, ``limiter``. Safe to use from several threads; one window's pages are fetched in order."""

    api = "v2"
    url_setting = "CHATBASE_API_URL"
    default_url = DEFAULT_API_URL
    page_size = EXPORT_PAGE_SIZE
    cursor_paged = True  # page n needs the cursor page n - 1 handed out: a window's pages come one by one

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # each window's paging: the next page's number and its cursor (None: the window has ended)
        self._next: dict[tuple[str, date | None, date | None, tuple[str, ...]], tuple[int, str | None]] = {}
        self._handed_out: dict[tuple[str, date | None, date | None, tuple[str, ...]], set[str]] = {}
        self._paging = threading.Lock()

    def fetch_page(
        self,
        agent_id: str,
        page: int,
        start: date | None,
        end: date | None,
        sources: tuple[str, ...] = (),
        size: int = EXPORT_PAGE_SIZE,
        wanted: Callable[[], bool] | None = None,
    ) -> ConversationPage | None:
        """Page ``page`` (from 1) of a window, as the sync engine asks for pages: its records in the record
        shape chatsync reads (for paging decisions), the body exactly as sent, and whether it is the last.

        Pages are numbered for the engine's sake; under them is the cursor: page ``n`` is asked with the
        cursor page ``n - 1`` handed out, so a window's pages must be asked one after the other. A page
        past the end costs no request (an empty last page). None when ``wanted`` said no by the time the
        rate limit let the request go. Raises PagingError when a cursor comes back a second time, when
        conversations outside the window arrive, or when page ``n`` is asked before page ``n - 1``
        came back.
        """
        key = (agent_id, start, end, sources)
        cursor: str | None = None
        if page != 1:
            with self._paging:
                number, cursor = self._next.get(key, (1, None))
            if page != number:
                raise PagingError(f"page {page} of {start}..{end} was asked out of order (next is {number})")
            if cursor is None:
                return ConversationPage([], b'{"data": []}', last=True)  # the window has ended
        params = _export_params(start, end, sources, cursor, size)
        answer = self.request(_export_path(agent_id), params, wanted=wanted, raw=True)
        if answer is None:
            return None
        body, content = answer
        found = _cursor_page(body)
        _check_window(found.records, start, end)
        _check_cursor(found, page, start, end)
        last = not found.has_more
        with self._paging:
            if page == 1:
                self._handed_out[key] = set()  # the window is paged afresh
            handed_out = self._handed_out.setdefault(key, set())
            if not last and found.cursor in handed_out:
                raise PagingError(
                    f"Chatbase handed out a cursor again on page {page} for {start}..{end}: stopped paging"
                )
            if found.cursor is not None:
                handed_out.add(found.cursor)
            self._next[key] = (page + 1, None if last else found.cursor)
            if last:
                self._handed_out.pop(key, None)
        return ConversationPage([record_from_export(r) for r in found.records], content, last=last)

    def list_chatbots(self) -> list[Chatbot]:
        """Every agent of the account: :meth:`list_agents` (v1's ``get-chatbots`` under its v2 name)."""
        return self.list_agents()

    def export_page(
        self,
        agent_id: str,
        *,
        start: date | None = None,
        end: date | None = None,
        sources: tuple[str, ...] = (),
        cursor: str | None = None,
        limit: int = EXPORT_PAGE_SIZE,
        conversation_id: str | None = None,
        summary: bool = False,
    ) -> CursorPage:
        """One page of the export, created on UTC days ``start``..``end`` (both inclusive), from
        ``sources`` (all when empty); ``summary`` leaves the messages out. Raises ChatbaseUnavailable
        when the answer is not an export page."""
        params = _export_params(start, end, sources, cursor, limit)
        if conversation_id:
            params["conversationId"] = conversation_id
        if summary:
            params["include"] = "summary"
        return _cursor_page(self.request(_export_path(agent_id), params))

    def iter_pages(
        self,
        agent_id: str,
        start: date | None,
        end: date | None,
        sources: tuple[str, ...] = (),
        size: int = EXPORT_PAGE_SIZE,
    ) -> Iterator[tuple[list[Any], bool]]:
        """Every page of a window, newest first, each with whether it is the last (``hasMore`` false or
        no cursor). The same filters go with every page, as Chatbase's own CLI sends them.

        Raises PagingError when the server hands out a cursor it gave before (it would loop), pages past
        any sane bound, or sends conversations created outside the window (a deployment that ignores
        ``startDate``/``endDate`` would page through the whole history for every window).
        """
        cursor: str | None = None
        seen: set[str] = set()
        for number in range(1, MAX_PAGES_PER_WINDOW + 1):
            page = self.export_page(
                agent_id, start=start, end=end, sources=sources, cursor=cursor, limit=size
            )
            _check_window(page.records, start, end)
            _check_cursor(page, number, start, end)
            if not page.has_more:
                yield page.records, True
                return
            assert page.cursor is not None  # (checked above)
            if page.cursor in seen:
                raise PagingError(
                    f"Chatbase handed out a cursor again on page {number} for {start}..{end}: stopped paging"
                )
            seen.add(page.cursor)
            yield page.records, False
            cursor = page.cursor
        raise PagingError(f"more than {MAX_PAGES_PER_WINDOW} pages for {start}..{end}: stopped paging")

    def find_first_day(
        self, agent_id: str, today: date, sources: tuple[str, ...] = (), floor: date = HISTORY_FLOOR
    ) -> date | None:
        """The first UTC day with a conversation (None when there is none), from one-page summary
        probes of ``floor``..day: see :func:`search_first_day`."""

        def probe(day: date) -> Probe:
            page = self.export_page(agent_id, end=day, start=floor, sources=sources, summary=True)
            days = _check_window(page.records, floor, day)  # (ignoring the dates, it names no first day)
            return Probe(
                # an empty page that says more follow, or counts some, still found conversations
                found=bool(page.records) or page.has_more or bool(page.total),
                total=page.total if page.total is not None else len(page.records),
                oldest=min(days) if days else None,
                complete=not page.has_more,
            )

        return search_first_day(probe, floor, today)

    def list_agents(self, page_size: int = AGENTS_PAGE_SIZE) -> list[Chatbot]:
        """Every agent (chatbot) of the account with its name, paging ``GET /agents`` (1–100 a page)
        by cursor to the end."""
        agents: list[Chatbot] = []
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_PAGES_PER_WINDOW):
            params: dict[str, Any] = {"limit": page_size}
            if cursor:
                params["cursor"] = cursor
            page = _cursor_page(self.request("agents", params))
            agents.extend(chatbots_from(page.records))
            if not page.has_more or not page.cursor:
                return agents
            if page.cursor in seen:
                raise PagingError("Chatbase handed out an agents cursor again: stopped paging")
            seen.add(page.cursor)
            cursor = page.cursor
        raise PagingError(f"more than {MAX_PAGES_PER_WINDOW} pages of agents: stopped paging")

    def _rejected(
        self, status: int, code: str | None, message: str, path: str, params: dict[str, Any]
    ) -> ChatsyncError:
        if code == "VALIDATION_INVALID_DATE_RANGE":
            return UsageError(
                f"Chatbase refused the date window ({message}): the start must not be after the end"
            )
        agent = _AGENT_IN_PATH.search(path)
        if status == 403:  # the plan's, so every chatbot's
            hint = (
                "API v2 needs a Chatbase plan with API access (Standard or higher): "
                "upgrade the plan, or sync through API v1 (--api 1, or CHATBASE_API_VERSION=1)"
            )
            return ChatbaseRejected(status, message, hint, every_chatbot=True)
        elif status == 404 and agent and code == "AGENT_NOT_FOUND":
            hint = f"check CHATBASE_CHATBOT_ID: agent {unquote(agent.group(1))!r} was not found for this key"
        elif status == 404:  # not Chatbase's answer about an agent: the address is not the API's
            hint = f"check CHATBASE_API_URL ({mask_url(self.base_url)}): it should be the API v2 root, ending in /api/v2"
            return ChatbaseRejected(status, message, hint, every_chatbot=True)
        else:
            hint = rejection_hint(status, code, params)
        return ChatbaseRejected(status, message, hint)


# ------------------------------------------------------------------------------------------ first day
@dataclass(frozen=True)
class Probe:
    """What one page of conversations created from the floor to some day says."""

    found: bool  # any conversation at all
    total: int  # how many match (the page's ``total``)
    oldest: date | None  # the oldest creation day among the page's records
    complete: bool  # the page holds every match (``hasMore`` false)


def search_first_day(probe: Callable[[date], Probe], floor: date, today: date) -> date | None:
    """The first day ``d`` in ``floor``..``today`` for which ``probe(d)`` (conversations created from
    ``floor`` to ``d``) finds any, or None.

    A bisection that uses what each page also says: a complete page names the first day outright; the
    oldest record of a page bounds the answer from above; and the totals of two probes extrapolate, at
    a steady pace of conversations, to the day the count falls to zero, which is probed next when it
    lies inside the bracket. Two such guesses in a row that fail to halve the bracket fall back to
    bisection, so an uneven history costs about what bisection costs; a steady one about half.
    """
    first = probe(today)
    if not first.found:
        return None
    if first.complete and first.oldest:
        return first.oldest
    lo = floor - timedelta(days=1)  # the latest day known to have nothing up to it
    hi = min(first.oldest or today, today)  # the earliest day known to have something up to it
    counts = {today: first.total}  # day → conversations up to that day, where there are some
    slow = 0
    while (hi - lo).days > 1:
        width = (hi - lo).days
        guess = _extrapolated_last_empty_day(counts, lo, hi) if slow < 2 else None
        extrapolated = guess is not None
        if guess is None:
            guess, slow = lo + timedelta(days=width // 2), 0
        result = probe(guess)
        if not result.found:
            lo = guess
        else:
            if result.complete and result.oldest:
                return result.oldest
            hi = min(guess, result.oldest or guess)
            counts[guess] = result.total
        if extrapolated and len(counts) > 2:
            slow = slow + 1 if (hi - lo).days * 2 > width else 0
    return hi


def _extrapolated_last_empty_day(counts: dict[date, int], lo: date, hi: date) -> date | None:
    """The day before the first conversation, extrapolated from the two known counts nearest the start
    (with only one, the day before ``hi``); None when that says nothing new about ``lo``..``hi``."""
    known = sorted(counts.items())
    if len(known) < 2:
        return hi - timedelta(days=1)
    (day1, count1), (day2, count2) = known[0], known[1]
    if count2 <= count1:
        return None
    per_day = (count2 - count1) / (day2 - day1).days
    guess = day1 - timedelta(days=max(1, math.ceil(count1 / per_day)))
    if guess <= lo:
        return None
    return min(guess, hi - timedelta(days=1))


# ---------------------------------------------------------------------------------------------- pages
def _export_path(agent_id: str) -> str:
    return f"agents/{quote(agent_id, safe='')}/conversations/export"  # the id as one path segment


def _export_params(
    start: date | None, end: date | None, sources: tuple[str, ...], cursor: str | None, limit: int
) -> dict[str, Any]:
    """The export's query for a window of UTC days (both inclusive), its sources and where to go on."""
    params: dict[str, Any] = {"limit": limit}
    if cursor:
        params["cursor"] = cursor
    if start:
        params["startDate"] = start.isoformat()
    if end:
        params["endDate"] = end.isoformat()
    if sources:
        params["source"] = ",".join(sources)
    return params


def _cursor_page(body: object) -> CursorPage:
    """Read ``{data: [...], pagination: {cursor, hasMore, total}}``; anything else is a broken answer."""
    data = body.get("data") if isinstance(body, dict) else None
    pagination = body.get("pagination") if isinstance(body, dict) else None
    if not isinstance(data, list) or not isinstance(pagination, dict):
        raise ChatbaseUnavailable(
            "Chatbase answered without a 'data' list and 'pagination'; nothing of this page was saved"
        )
    cursor = pagination.get("cursor")
    total = pagination.get("total")
    count = None  # a count is a hint; one that is not a number says nothing
    if isinstance(total, int | float) and not isinstance(total, bool) and math.isfinite(total):
        count = int(total)
    return CursorPage(
        records=data,
        cursor=cursor if isinstance(cursor, str) and cursor else None,
        has_more=pagination.get("hasMore") is True,
        total=count,
    )


def _check_cursor(page: CursorPage, number: int, start: date | None, end: date | None) -> None:
    """A page that says more follow must say where they start: ending there would lose them for good."""
    if page.has_more and page.cursor is None:
        raise PagingError(
            f"Chatbase said more pages follow page {number} for {start}..{end} but sent no cursor: stopped paging"
        )


def _created_day(record: object) -> date | None:
    """The UTC day of a record's ``createdAt`` (epoch seconds); None when it has no usable one."""
    value = record.get("createdAt") if isinstance(record, dict) else None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return None
    try:
        return datetime.fromtimestamp(value, UTC).date()
    except (OverflowError, OSError, ValueError):
        return None


def _check_window(records: list[Any], start: date | None, end: date | None) -> list[date]:
    """The creation days of a page's records that lie in ``start``..``end``.

    Raises PagingError when most of the page lies outside on days Chatbase could have served: a
    deployment that ignores ``startDate`` and ``endDate`` would page the whole history once per window.
    A few outside, or any dated before 2020 or in the future, are records whose ``createdAt`` cannot be
    right (Chatbase filtered them into this window by its own): the sync quarantines them with the reason.
    """

    def within(day: date) -> bool:
        return (start is None or day >= start) and (end is None or day <= end)

    days = [day for day in (_created_day(r) for r in records) if day is not None]
    inside = [d for d in days if within(d)]
    # only a day Chatbase could have served is evidence: 1970 or year 50000 is one record's broken time
    latest = datetime.now(UTC).date() + timedelta(days=1)
    outside = [d for d in days if not within(d) and HISTORY_FLOOR <= d <= latest]
    if outside and len(outside) * 2 > len(days):
        raise PagingError(
            f"Chatbase sent conversations created on {outside[0]}, outside the window {start}..{end}: "
            "this deployment seems to ignore startDate/endDate"
        )
    return inside
