"""The Chatbase client: requests, paging rules, retries and rate limiting. No SQL here.

Chatbase's ``get-conversations`` has no total, no cursor and no ``hasMore``: the last page is the first
one shorter than ``size``. Pages may shift while conversations arrive, so callers dedupe by id; a server
that repeats a page or never stops is caught here. Transient failures (408, 429, 5xx, transport errors,
truncated bodies) are retried within a budget; 400/401/403/404 fail at once with what to fix.

:class:`ChatbaseHTTP` is the part every Chatbase API shares (one GET with the rate limiter, retries,
stats and the stop flag); :class:`ChatbaseClient` is API v1 on top of it, and
:mod:`chatsync.chatbase_v2` the v2 export.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, Self

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type

from chatsync.config import DEFAULT_BASE_URL, Secret, Settings, mask_url
from chatsync.errors import ChatbaseRejected, ChatbaseUnavailable, ChatsyncError, ConfigError, PagingError
from chatsync.jsonbody import decode_body, read_body
from chatsync.logs import mask_in_logs

if TYPE_CHECKING:
    from chatsync.chatbase_v2 import ChatbaseV2Client

log = logging.getLogger("chatsync.chatbase")
PAGE_SIZE = 100  # Chatbase's maximum; omitting size silently gives 10 a page
LEADS_PAGE_SIZE = 100  # get-leads documents no maximum; the last page is the first shorter one
MAX_PAGES_PER_WINDOW = 20_000
HISTORY_FLOOR = date(2020, 1, 1)  # before Chatbase existed: the search for a chatbot's first day starts here
MAX_WAIT_SECONDS = 60.0
# Chatbase failing this long (seconds) with no answer in between is an outage or a wrong address, not a blip:
# said once a run on stderr, where the retries before it are only logged at -v and the budget may run on.
OUTAGE_WARNING_SECONDS = 30.0
# A request's last try starts this long (seconds; a tenth of a shorter budget) before its retry budget ends,
# and a retry's timeout is cut to what is left: a server that accepts and never answers is given up on when
# the budget ends, not up to a whole timeout (30 s) after it. (A first try has its whole timeout: a budget
# shorter than a slow Chatbase's answer must not fail it.)
LAST_TRY_SECONDS = 1.0
MAX_MARGIN_SECONDS = 1.0  # the most a window is stretched after 429s (see RateLimiter)
_JITTER = random.Random()  # the backoff's own: waits never draw from (or move) the program's global random


class TransientError(Exception):
    """A failure worth retrying; ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Tries:
    """One request's tries, for its retry budget and its error (monotonic seconds). A 429 is an answer
    that holds the request, not a failure: it moves neither ``failures`` nor ``first_failure``."""

    began: float | None = None  # when its first try was sent (the budget counts from here)
    failures: int = 0  # tries that failed (a transport error, 408, 5xx, a broken body)
    first_failure: float | None = None  # when the first of them was sent


class RateLimiter:
    """Keeps requests under ``limit`` per sliding ``window`` seconds across threads, and obeys pauses.

    Chatbase counts a request when it arrives, so each request is remembered by the moment it was sent
    (:meth:`sent`, from the HTTP client's trace; the moment it was let go until then), and the next
    window's first request waits ``margin`` seconds longer than the window: what a request's trip to
    Chatbase may take longer than another's. A 429 that this limiter let through means the trips vary
    more than that, so each one doubles the margin (up to ``MAX_MARGIN_SECONDS``).
    """

    def __init__(self, limit: int = 100, window: float = 10.0, margin: float = 0.05) -> None:
        self.limit = limit
        self.window = window
        self.margin = margin
        self._sent: deque[list[float]] = deque()  # one [monotonic time] a request, oldest first
        self._paused_until = 0.0
        self._waiting: deque[object] = deque()  # one token a waiting request, first come first
        self._turn = threading.Condition()

    def acquire(
        self,
        stop: threading.Event | None = None,
        deadline: float | None = None,
        wanted: Callable[[], bool] | None = None,
    ) -> list[float] | None:
        """Wait until a request may go; returns its slot for :meth:`sent`. Requests go in the order they
        asked (a sync asks for its pages in order, so the page that ends a stream is not passed by the
        pages after it). ``deadline`` (monotonic): when a pause the server asked for lasts past it, give
        up now (ChatbaseUnavailable) instead of waiting for nothing; ``stop`` set: ChatbaseUnavailable.
        ``wanted`` returning False while the request waits (a page found past the end of its stream):
        None at once, no slot taken, rather than at the moment the window would have let it go."""
        token = object()
        with self._turn:
            self._waiting.append(token)
            try:
                while True:
                    now = time.monotonic()
                    if deadline is not None and self._paused_until > deadline:
                        raise ChatbaseUnavailable(
                            f"rate limited: Chatbase asked to wait {self._paused_until - now:.1f} s, longer "
                            "than the retry budget left",
                            last="rate limited",
                        )
                    if stop is not None and stop.is_set():
                        raise ChatbaseUnavailable("sync stopped")
                    if wanted is not None and not wanted():
                        return None
                    wait = 0.1  # not this request's turn: woken when the one before it goes
                    if self._waiting[0] is token:
                        span = self.window + self.margin
                        while self._sent and self._sent[0][0] <= now - span:
                            self._sent.popleft()
                        wait = self._paused_until - now
                        if len(self._sent) >= self.limit:
                            wait = max(wait, self._sent[0][0] + span - now)
                        if wait <= 0:
                            slot = [now]
                            self._sent.append(slot)
                            return slot
                    self._turn.wait(min(wait, 0.1))  # short: a stop is seen within 0.1 s
            finally:
                self._waiting.remove(token)
                self._turn.notify_all()

    def reconsider(self) -> None:
        """Something a waiting request's ``wanted`` reads has changed (a stream learnt its end): every
        waiting request asks it again now, not at its next look (up to 0.1 s later)."""
        with self._turn:
            self._turn.notify_all()

    def sent(self, slot: list[float]) -> None:
        """The request of ``slot`` left now (its headers are written): count the window from here."""
        with self._turn:
            slot[0] = max(slot[0], time.monotonic())

    def unused(self, slot: list[float]) -> None:
        """The request of ``slot`` was not sent after all: its place in the window is free again."""
        with self._turn:
            with suppress(ValueError):
                self._sent.remove(slot)
            self._turn.notify_all()

    def throttled(self) -> None:
        """Chatbase refused a request this limiter let go (429): leave more room between windows."""
        with self._turn:
            self.margin = min(MAX_MARGIN_SECONDS, max(self.margin * 2, 0.05))

    def pause(self, seconds: float) -> None:
        """Hold every request for ``seconds`` (the server said Retry-After or its window resets then), at
        most ``MAX_WAIT_SECONDS``: a hint of hours must not hold a sync (and its lock) past its retry
        budget; if the server still refuses after the wait, the retries and their budget decide."""
        with self._turn:
            wait = min(max(0.0, seconds), MAX_WAIT_SECONDS)
            self._paused_until = max(self._paused_until, time.monotonic() + wait)


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    throttled: int = 0  # answers that were 429
    waited: float = 0.0  # seconds slept before retries, as the server's hints or the backoff asked


@dataclass(frozen=True)
class ConversationPage:
    """A page of ``get-conversations``: its records decoded fast (for paging decisions: their number,
    ids and days; integers beyond 64 bits may be approximate) and the body exactly as sent, which is what
    gets decoded exactly and stored."""

    records: list[Any]
    body: bytes
    last: bool | None = None  # whether it is the last page, when the answer says (v2); None: by its length


@dataclass(frozen=True)
class Chatbot:
    """A chatbot (v2: agent) of the account, as ``get-chatbots`` or ``GET /agents`` lists it."""

    id: str
    name: str | None


class ErrorBody(NamedTuple):
    """What a failed answer says: the message, v2's machine-readable code and per-field details."""

    message: str
    code: str | None = None
    details: str | None = None  # "field: problem; ..." from v2's ``error.details``
    from_api: bool = True  # False: no JSON error object at all (an HTML page, say): not Chatbase's API


def _error_message(response: httpx.Response) -> ErrorBody:
    """Message and code from a v1 ``{"message"}`` or v2 ``{"error": {"code", "message", "details"}}`` body."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return ErrorBody(response.reason_phrase or "error", from_api=False)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            code = err.get("code")
            details = err.get("details")
            detail_text = (
                "; ".join(f"{field}: {problem}" for field, problem in details.items())
                if isinstance(details, dict) and details
                else None
            )
            return ErrorBody(
                str(err.get("message") or code or "error"), str(code) if code else None, detail_text
            )
        if isinstance(err, str):
            return ErrorBody(err)
        if body.get("message"):
            return ErrorBody(str(body["message"]))
    return ErrorBody(response.reason_phrase or "error", from_api=False)


def _shortened(text: str, limit: int = 300) -> str:
    """A server's message as chatsync repeats it: at most ``limit`` characters (a proxy's error page once
    made a warning line of 9,858)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _hinted_wait(state: RetryCallState) -> float | None:
    """The wait (seconds) the failed try's server asked for, as chatsync keeps it: at least 1 s (0 or a
    fraction still means wait), at most ``MAX_WAIT_SECONDS``; None when it asked for none."""
    exc = state.outcome.exception() if state.outcome else None
    hinted = getattr(exc, "retry_after", None)
    return None if hinted is None else min(max(1.0, hinted), MAX_WAIT_SECONDS)


def _reset_seconds(headers: httpx.Headers) -> float | None:
    """Seconds until X-RateLimit-Reset (documented both as epoch ms and epoch s: > 10^12 means ms)."""
    value = headers.get("x-ratelimit-reset")
    if not value:
        return None
    try:
        reset = float(value)
    except ValueError:
        return None
    if not math.isfinite(reset):
        return None
    if reset > 10**12:
        reset /= 1000
    if reset > 10**9:
        return max(0.0, reset - time.time())
    return max(0.0, reset)  # some servers send seconds from now


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asks us to wait: ``Retry-After`` in either form of RFC 9110 (delay-seconds or an
    HTTP-date), else ``X-RateLimit-Reset``; None when neither can be read."""
    value = (headers.get("retry-after") or "").strip()
    if value:
        seconds: float | None
        try:
            seconds = float(value)
        except ValueError:
            seconds = _seconds_until_http_date(value)
        if seconds is not None and math.isfinite(seconds):
            return max(0.0, seconds)
    return _reset_seconds(headers)


def _seconds_until_http_date(text: str) -> float | None:
    """``Wed, 21 Oct 2015 07:28:00 GMT`` (or the obsolete forms) as seconds from now; None if unreadable."""
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() - time.time()


class ChatbaseHTTP:
    """One Chatbase API root: GETs under a shared rate limiter, retried within a budget; thread-safe.

    ``limiter`` lets two clients (v1 and v2 of one key) share a rate-limit window, as Chatbase counts
    requests per key and IP. Subclasses say how a refused request reads (:meth:`_rejected`).
    """

    def __init__(
        self,
        api_key: Secret,
        base_url: str,
        *,
        transport: httpx.BaseTransport | None = None,
        rate_limit: tuple[int, float] = (100, 10.0),
        retry_budget: timedelta = timedelta(minutes=5),
        timeout: float = 30.0,
        backoff: tuple[float, float] = (0.5, 30.0),
        max_connections: int = 16,
        limiter: RateLimiter | None = None,
        warn_after: float = OUTAGE_WARNING_SECONDS,
    ) -> None:
        self._key = api_key
        self._key_forms = _key_forms(api_key.reveal())
        if self._key_forms is not None:
            mask_in_logs(self._key_forms)  # (libraries' log lines too, under --debug)
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            headers={"Authorization": f"Bearer {api_key.reveal()}", "User-Agent": "chatsync"},
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self.limiter = limiter or RateLimiter(*rate_limit)
        self.retry_budget = retry_budget.total_seconds()
        self.timeout = timeout
        self.backoff = backoff
        self.warn_after = warn_after
        # the outage clock (monotonic), guarded by _stats_lock: since when Chatbase has failed with no
        # answer in between, the last answer, and the last failure (for the warning)
        self._failing_since: float | None = None
        self._last_answer = -math.inf
        self._last_failure = ""
        self._outage_told = False
        self._outage_timer: threading.Timer | None = None  # tells the outage when it falls due
        self.stats = ClientStats()
        self._stats_lock = threading.Lock()
        self.stop = threading.Event()

    api = "v1"  # which Chatbase API this client reads
    url_setting = "CHATBASE_BASE_URL"  # the setting that names this API's root, for messages
    default_url = DEFAULT_BASE_URL  # Chatbase's own root of this API

    def close(self) -> None:
        with self._stats_lock:
            if self._outage_timer is not None:
                self._outage_timer.cancel()
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------- one request
    def _redact(self, text: str) -> str:
        """``text`` with the key taken out (a server may echo it, in any encoding: see ``_key_forms``)."""
        return text if self._key_forms is None else self._key_forms.sub("***", text)

    def _count(self, field: str) -> None:
        with self._stats_lock:
            setattr(self.stats, field, getattr(self.stats, field) + 1)

    def _send(
        self,
        path: str,
        params: dict[str, Any],
        wanted: Callable[[], bool] | None,
        raw: bool,
        tries: _Tries,
    ) -> Any:
        """One try of ``request``; raises TransientError for what is worth another (``tries`` counts it)."""
        if self.stop.is_set():
            raise ChatbaseUnavailable("sync stopped")
        deadline = (time.monotonic() if tries.began is None else tries.began) + self.retry_budget
        slot = self.limiter.acquire(self.stop, deadline, wanted)
        if slot is None:
            return None  # no longer needed while it waited for the rate limit: not sent
        if wanted is not None and not wanted():
            self.limiter.unused(slot)
            return None  # no longer needed by the time the rate limit let it go: not sent
        self._count("requests")
        if tries.began is not None:
            self._count("retries")  # (counted as it is sent: a retry a stop cut short never was one)

        def trace(event: str, info: dict[str, Any]) -> None:
            if event.endswith(".send_request_headers.complete"):  # http11 or http2: the request is out
                self.limiter.sent(slot)

        went = time.monotonic()
        if tries.began is None:  # the first try: the timeout, and the whole budget for its answer
            tries.began = went
            timeout = self.timeout
            answer_by = went + max(self.timeout, self.retry_budget)
        else:  # a retry ends with the budget (a hanging server is not waited for past it)
            answer_by = tries.began + self.retry_budget
            timeout = min(self.timeout, max(answer_by - went, 0.05))
        try:
            response = self._get(path, params, timeout, trace, answer_by)
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
            # this request cannot be sent at all (not an http(s) root, a header no server would take):
            # retrying for the whole budget would only hide it
            raise ConfigError(
                f"cannot send a request to Chatbase ({type(exc).__name__}: {self._redact(str(exc))}): "
                "check CHATBASE_BASE_URL / CHATBASE_API_URL and CHATBASE_API_KEY"
            ) from None
        except httpx.TransportError as exc:
            failure = f"{type(exc).__name__}: {self._redact(str(exc)) or 'no answer'}"
            raise self._failing(went, tries, TransientError(failure)) from None
        status = response.status_code
        if status == 200:
            remaining = response.headers.get("x-ratelimit-remaining")
            if remaining == "0":
                wait = _reset_seconds(response.headers) or 1.0
                log.info("Chatbase rate limit used up: waiting %.1f s for it to reset", wait)
                self.limiter.pause(wait)
            try:
                decoded = read_body(response.content) if raw else decode_body(response.content)
            except ValueError:
                raise self._failing(went, tries, TransientError("truncated or invalid JSON body")) from None
            self._answered()
            return (decoded, response.content) if raw else decoded
        error = _error_message(response)
        message = _shortened(self._redact(error.message))
        if error.details:
            message += f" ({_shortened(self._redact(error.details))})"
        request_id = response.headers.get("x-request-id")
        if request_id:
            message += (
                f" [request id {_shortened(self._redact(request_id))}]"  # what Chatbase support asks for
            )
        if status != 408 and status < 500:
            self._answered()  # (a refusal, or the rate limit: Chatbase is up)
        if status == 408 or status == 429 or status >= 500:
            retry_after = _retry_after(response.headers)
            if status == 429:
                self._count("throttled")
                self.limiter.throttled()
                log.info(
                    "Chatbase rate limit reached: holding every request for %.1f s",
                    max(1.0, retry_after or 1.0),
                )
                self.limiter.pause(max(1.0, retry_after or 1.0))
                raise TransientError(f"HTTP {status}: {message}", retry_after)  # (an answer: not failing)
            raise self._failing(went, tries, TransientError(f"HTTP {status}: {message}", retry_after))
        if status == 404 and (not error.from_api or (self.api == "v1" and error.code is not None)):
            # no Chatbase error at all, or API v2's error object where v1 was asked for (its root pasted
            # into CHATBASE_BASE_URL): not v1's answer about a chatbot
            raise ChatbaseRejected(
                status,
                message,
                f"the server at {mask_url(self.base_url)} answered without a Chatbase error, so the address "
                f"is not the API's: check {self.url_setting} (Chatbase's is {self.default_url})",
                every_chatbot=True,
            )
        raise self._rejected(status, error.code, message, path, params)

    def _get(
        self,
        path: str,
        params: dict[str, Any],
        timeout: float,
        trace: Callable[[str, dict[str, Any]], None],
        answer_by: float,
    ) -> httpx.Response:
        """One GET, its body read by ``answer_by`` (monotonic), and the whole answer in by then plus one
        timeout (else httpx.ReadTimeout): httpx's timeout bounds each read, so a server sending a byte every
        few seconds once held a sync for as long as it liked."""
        request = self._http.build_request(
            "GET", path, params=params, timeout=timeout, extensions={"trace": trace}
        )
        answer: Future[httpx.Response] = Future()

        def send() -> None:
            try:
                response = self._http.send(request, stream=True)
                try:
                    if isinstance(response.stream, httpx.SyncByteStream):  # (always, from a sync client)
                        response.stream = _AnsweredBy(response.stream, answer_by, request)
                    response.read()
                finally:
                    response.close()
            except BaseException as exc:
                answer.set_exception(exc)
            else:
                answer.set_result(response)

        # In a thread of its own, waited for until its answer is due plus one timeout: httpx's timeout bounds
        # each read, and a server trickling the headers of its answer a byte at a time kept the request, the
        # run and its sync lock for ever. A request given up on is left to its thread (closing the client
        # ends it).
        threading.Thread(target=send, name="chatsync-request", daemon=True).start()
        try:
            return answer.result(timeout=max(0.0, answer_by + self.timeout - time.monotonic()))
        except TimeoutError:
            raise httpx.ReadTimeout("the answer kept trickling in past its time", request=request) from None

    def _rejected(
        self, status: int, code: str | None, message: str, path: str, params: dict[str, Any]
    ) -> ChatsyncError:
        """The error to raise for a 4xx retrying cannot fix (``message`` is safe to print)."""
        return ChatbaseRejected(status, message, rejection_hint(status, code, params))

    def _tries_end(self) -> float:
        """Seconds into a request's budget after which no try starts (see ``LAST_TRY_SECONDS``)."""
        return self.retry_budget - min(LAST_TRY_SECONDS, self.retry_budget / 10)

    def _wait(self, tries: _Tries, state: RetryCallState) -> float:
        """Seconds before the next try: the server's hint, else the backoff (doubling with each failure,
        a 429 not counted), cut so that the last try still comes within the budget: a Chatbase back by
        then is not given up on."""
        hinted = _hinted_wait(state)
        if hinted is not None:
            return hinted
        base, cap = self.backoff
        backoff = min(cap, base * 2 ** max(0, tries.failures - 1)) * _JITTER.uniform(0.5, 1.0)
        return max(0.0, min(backoff, self._tries_end() - _since(tries.began)))

    def _spent(self, tries: _Tries, state: RetryCallState) -> bool:
        """Whether to stop retrying: the budget is spent, or the wait the server asked for outlasts what is
        left of it (a try before that wait would only be refused again)."""
        return _since(tries.began) + (_hinted_wait(state) or 0.0) >= self._tries_end()

    def request(
        self,
        path: str,
        params: dict[str, Any],
        *,
        wanted: Callable[[], bool] | None = None,
        raw: bool = False,
    ) -> Any:
        """One GET with retries; raises ChatbaseUnavailable when the retry budget is spent.

        The budget counts from the first try's send; every retry ends within it (``LAST_TRY_SECONDS``).
        ``wanted``: asked once the rate limit lets the request go; False skips it (None is returned).
        ``raw``: return ``(decoded, body bytes)``, decoded fast for paging decisions (see ``read_body``).
        """
        tries = _Tries()
        retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            wait=lambda state: self._wait(tries, state),
            stop=lambda state: self._spent(tries, state),
            sleep=self._sleep,
            before_sleep=self._before_retry,
            reraise=True,
        )
        try:
            return retrying(self._send, path, params, wanted, raw, tries)
        except TransientError as exc:
            raise self._budget_spent(str(exc), tries, exc.retry_after) from None
        except ChatbaseUnavailable as exc:
            if exc.last != "rate limited":
                raise  # (the sync was stopped)
            # a pause the server asked for outlasts the budget
            raise self._budget_spent(str(exc), tries) from None

    def _budget_spent(self, last: str, tries: _Tries, asked: float | None = None) -> ChatbaseUnavailable:
        """The error of a request given up: for how long Chatbase failed it, and held it before that;
        ``asked``: the wait (seconds) the last answer asked for."""
        if tries.first_failure is None:
            what = f"kept failing for {_since(tries.began):.0f} s: its rate limit refused every try"
            if asked is not None and asked >= 1:
                what += f", the last asking for {asked:.0f} s more"
        else:
            what = f"kept failing for {_since(tries.first_failure):.0f} s"
            held = tries.first_failure - (tries.began or tries.first_failure)
            if held >= 0.5:
                what += f" after {held:.0f} s held by its rate limit"
        return ChatbaseUnavailable(
            f"Chatbase at {mask_url(self.base_url)} {what} (retry budget {self.retry_budget:.0f} s; last: "
            f"{last}); what was saved is kept and the next run continues (if Chatbase is up, check "
            f"{self.url_setting})",
            last=last,
        )

    def _before_retry(self, state: RetryCallState) -> None:
        with self._stats_lock:
            self.stats.waited += state.upcoming_sleep
        exc = state.outcome.exception() if state.outcome else None
        log.info("Chatbase: %s; retry %d in %.1f s", exc, state.attempt_number, state.upcoming_sleep)

    def _failing(self, went: float, tries: _Tries, error: TransientError) -> TransientError:
        """``error``, for a try sent at ``went`` (monotonic) that failed, counted in ``tries`` and on the
        outage clock: Chatbase has failed since the later of that send and its last answer (a 429 is one)."""
        tries.failures += 1
        if tries.first_failure is None:
            tries.first_failure = went
        with self._stats_lock:
            if self._failing_since is None:
                self._failing_since = max(went, self._last_answer)
                if not self._outage_told:
                    # told when due even if every request is then inside a try that hangs (an answer,
                    # which is what clears _failing_since, also cancels the timer before this one)
                    due = self._failing_since + self.warn_after - time.monotonic()
                    # (a hair late: a timer may wake a little early, and would then find nothing due)
                    self._outage_timer = threading.Timer(max(0.0, due) + 0.01, self._tell_outage)
                    self._outage_timer.daemon = True
                    self._outage_timer.start()
            self._last_failure = str(error)
        self._tell_outage()
        return error

    def _tell_outage(self) -> None:
        """Once Chatbase has failed for ``warn_after`` seconds with no answer in between, say so on stderr,
        once a client: the retries before it are only logged at -v, and the budget may run on."""
        with self._stats_lock:
            since = self._failing_since
            failing = 0.0 if since is None else time.monotonic() - since
            tell = since is not None and failing >= self.warn_after and not self._outage_told
            self._outage_told |= tell
            last = self._last_failure
        if tell:
            log.warning(
                "Chatbase at %s has failed for %.0f s (last: %s); chatsync keeps retrying each request for up "
                "to %.0f s, its retry budget (if Chatbase is up, check %s)",
                mask_url(self.base_url),
                failing,
                last,
                self.retry_budget,
                self.url_setting,
            )

    def _answered(self) -> None:
        """Chatbase answered a request: whatever failed before was not an outage that lasts."""
        with self._stats_lock:
            self._failing_since = None
            self._last_answer = time.monotonic()
            if self._outage_timer is not None:
                self._outage_timer.cancel()
                self._outage_timer = None

    def _sleep(self, seconds: float) -> None:
        """A retry's wait; ChatbaseUnavailable when the sync is stopped meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:  # (an Event's wait may wake a little early)
            if self.stop.wait(left):
                raise ChatbaseUnavailable("sync stopped")


class _AnsweredBy(httpx.SyncByteStream):
    """A response body that must have come in full by ``deadline`` (monotonic): httpx.ReadTimeout once
    it is past, checked as each piece arrives (each read itself is bounded by the request's timeout)."""

    def __init__(self, stream: httpx.SyncByteStream, deadline: float, request: httpx.Request) -> None:
        self._stream = stream
        self._deadline = deadline
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        for piece in self._stream:
            if time.monotonic() > self._deadline:
                raise httpx.ReadTimeout("the answer kept trickling in past its time", request=self._request)
            yield piece

    def close(self) -> None:
        self._stream.close()


def _since(moment: float | None) -> float:
    """Seconds from ``moment`` (monotonic) to now; 0 for None (not yet)."""
    return 0.0 if moment is None else time.monotonic() - moment


def _key_forms(key: str) -> re.Pattern[str] | None:
    """A pattern for ``key`` as a server may echo it: as sent, or any of its characters escaped as JSON
    (once or more, ``\\/``, ``\\u002B``), percent-encoded (either case, once or twice), form-encoded or as
    an HTML entity, in any mix (encoders disagree on which characters to escape). Letters match in any
    case: masking a near-copy is harmless. None for a key of a few characters, which cannot be a real one
    and would turn every such letter into ``***``."""
    if len(key) < 6:
        return None
    parts: list[str] = []
    after_backslashes = False
    for run in re.findall(r"\\+|[^\\]", key):  # runs of backslashes, other characters one by one
        if run[0] == "\\":  # one repeat for the whole run: split between two, a run could match many ways
            parts.append(f"{_BACKSLASH}{{{len(run)},{9 * len(run)}}}")
        else:
            parts.append(_char_forms(run, escaped=not after_backslashes))
        after_backslashes = run[0] == "\\"
    return re.compile("".join(parts), re.IGNORECASE)


_SHORT_ESCAPES = {"\n": "n", "\r": "r", "\t": "t", "\b": "b", "\f": "f", "\v": "v", "\a": "a", "\0": "0"}
_NAMED_ENTITIES = {'"': "quot", "'": "apos", "<": "lt", ">": "gt", "&": "amp", "/": "sol"}
# Every repeat is bounded: with ``*`` a run of backslashes took quadratic time (100k of them: 221 s, the
# GIL held, a SIGTERM unheard), where each start position now tries at most a few lengths.
_ESCAPED = r"(?:\\|%(?:25){0,3}5c){0,8}"  # backslashes before a character, percent-encoded or not
_BACKSLASH = (
    r"(?:\\(?:u005c|x5c)?|%(?:25){0,3}u?005c|%(?:25){0,3}5c|&#0{0,8}92;?|&#x0{0,8}5c;?)"  # one backslash
)


def _char_forms(char: str, escaped: bool = True) -> str:
    """The alternatives of ``_key_forms`` for one character other than a backslash; ``escaped``: with the
    backslashes that may escape it (not after a run of the key's own, which takes them)."""
    code = ord(char)
    forms = [re.escape(char)]  # as is (after the backslashes of JSON's \/, \", \\)
    forms.append("".join(f"%(?:25){{0,3}}{byte:02x}" for byte in char.encode("utf-8", "surrogatepass")))
    units = char.encode("utf-16-be", "surrogatepass")
    pairs = [f"{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2)]
    # JSON, .NET: \u002B (the backslashes before the first unit are _ESCAPED's, so no text has two ways in)
    forms.append(r"\\{1,8}".join(f"u{pair}" for pair in pairs))
    forms.append("".join(f"%(?:25){{0,3}}u{pair}" for pair in pairs))  # JavaScript's escape(): %u002B
    if code < 256:
        forms.append(rf"x{code:02x}")
    forms += [f"&#0{{0,8}}{code};?", f"&#x0{{0,8}}{code:x};?"]
    if char in _NAMED_ENTITIES:
        forms.append(f"&{_NAMED_ENTITIES[char]};")
    if char in _SHORT_ESCAPES:
        forms.append(_SHORT_ESCAPES[char])  # (after a backslash: a str's repr, JSON: \r)
    if char == " ":
        forms.append(r"\+")
    # Only _ESCAPED takes backslashes before a form, so a text matches a character in one way alone: when
    # a later character fails, there is no other split to try (a \\u0073 form of its own, once, made a
    # key cut short take minutes, every split of every character tried in turn).
    return (_ESCAPED if escaped else "") + "(?:" + "|".join(forms) + ")"


class ConversationSource(Protocol):
    """What the sync engine needs of a Chatbase client: :class:`ChatbaseClient` (v1) or
    :class:`chatsync.chatbase_v2.ChatbaseV2Client` (v2).

    ``api``: ``"v1"`` or ``"v2"``; ``page_size``: records on a full page; ``cursor_paged``: page ``n`` can
    only be asked once page ``n - 1`` came back (v2), else pages of a window may be fetched at once.
    """

    api: str
    page_size: int
    cursor_paged: bool
    stats: ClientStats
    stop: threading.Event
    limiter: RateLimiter
    retry_budget: float  # seconds a failing request is tried for; the writer rides out its database as long

    def fetch_page(
        self,
        chatbot_id: str,
        page: int,
        start: date | None,
        end: date | None,
        sources: tuple[str, ...] = (),
        size: int = ...,
        wanted: Callable[[], bool] | None = None,
    ) -> ConversationPage | None: ...

    def find_first_day(
        self, chatbot_id: str, today: date, sources: tuple[str, ...] = (), floor: date = ...
    ) -> date | None: ...

    def list_chatbots(self) -> list[Chatbot]: ...


class ChatbaseClient(ChatbaseHTTP):
    """Talks to Chatbase v1 with one shared rate limiter; safe to use from several threads."""

    api = "v1"
    page_size = PAGE_SIZE
    cursor_paged = False  # pages are addressed by number: several of one window can be fetched at once

    # ------------------------------------------------------------------------------------------ paging
    def get_conversations(
        self,
        chatbot_id: str,
        page: int,
        *,
        start: date | None = None,
        end: date | None = None,
        sources: tuple[str, ...] = (),
        size: int = PAGE_SIZE,
    ) -> list[dict[str, Any]]:
        params = _conversations_params(chatbot_id, page, start, end, sources, size)
        return _data_list(self.request("get-conversations", params))

    def fetch_page(
        self,
        chatbot_id: str,
        page: int,
        start: date | None,
        end: date | None,
        sources: tuple[str, ...] = (),
        size: int = PAGE_SIZE,
        wanted: Callable[[], bool] | None = None,
    ) -> ConversationPage | None:
        """One page of ``get-conversations`` with the body as sent; None when ``wanted`` said no by the
        time the rate limit let the request go (nothing was sent)."""
        params = _conversations_params(chatbot_id, page, start, end, sources, size)
        answer = self.request("get-conversations", params, wanted=wanted, raw=True)
        if answer is None:
            return None
        body, content = answer
        return ConversationPage(_data_list(body), content)

    def iter_pages(
        self,
        chatbot_id: str,
        start: date | None,
        end: date | None,
        sources: tuple[str, ...] = (),
        size: int = PAGE_SIZE,
    ) -> Iterator[tuple[list[dict[str, Any]], bool]]:
        """Every page of a window in order, each with whether it is the last: the first page shorter than
        ``size``. A window whose last full page is followed by an empty one ends with ``([], True)``."""
        previous_ids: list[object] | None = None
        for page in range(1, MAX_PAGES_PER_WINDOW + 1):
            data = self.get_conversations(chatbot_id, page, start=start, end=end, sources=sources, size=size)
            ids = [c.get("id") if isinstance(c, dict) else None for c in data]
            if data and ids == previous_ids:
                raise PagingError(f"Chatbase repeated page {page - 1} as page {page} for {start}..{end}")
            previous_ids = ids
            last = len(data) < size
            yield data, last
            if last:
                return
        raise PagingError(f"more than {MAX_PAGES_PER_WINDOW} pages for {start}..{end}: stopped paging")

    def has_conversations(
        self, chatbot_id: str, start: date, end: date, sources: tuple[str, ...] = ()
    ) -> bool:
        return bool(self.get_conversations(chatbot_id, 1, start=start, end=end, sources=sources, size=1))

    def find_first_day(
        self, chatbot_id: str, today: date, sources: tuple[str, ...] = (), floor: date = HISTORY_FLOOR
    ) -> date | None:
        """The first day with a conversation, by bisection over date ranges (about 12 one-row requests)."""
        if not self.has_conversations(chatbot_id, floor, today, sources):
            return None
        lo, hi = floor, today
        while lo < hi:
            mid = lo + (hi - lo) // 2
            if self.has_conversations(chatbot_id, floor, mid, sources):
                hi = mid
            else:
                lo = mid + timedelta(days=1)
        return lo

    # ------------------------------------------------------------------------------- chatbots and leads
    def list_chatbots(self) -> list[Chatbot]:
        """Every chatbot of the account (``get-chatbots``), in Chatbase's order.

        Both shapes seen live are read, ``{"chatbots": [...]}`` and ``{"chatbots": {"data": [...]}}``; of
        each entry only ``id`` and ``name`` (else ``chatbotName``) are used and anything else is ignored.
        Raises ChatbaseUnavailable when the answer holds no list of chatbots.
        """
        body = self.request("get-chatbots", {})
        chatbots = body.get("chatbots") if isinstance(body, dict) else None
        if isinstance(chatbots, dict):
            chatbots = chatbots.get("data")
        if not isinstance(chatbots, list):
            raise ChatbaseUnavailable("Chatbase answered get-chatbots without a list of chatbots")
        return chatbots_from(chatbots)

    def get_leads(
        self,
        chatbot_id: str,
        page: int,
        *,
        start: date | None = None,
        end: date | None = None,
        size: int = LEADS_PAGE_SIZE,
    ) -> list[dict[str, Any]]:
        """One page of ``get-leads``: raw ``collectedCustomers`` rows (``id``, ``name``, ``email``,
        ``phone``, ``created_at`` ISO 8601, ``chatbot_id``; no conversation id)."""
        params: dict[str, Any] = {"chatbotId": chatbot_id, "page": page, "size": size}
        if start:
            params["startDate"] = start.isoformat()
        if end:
            params["endDate"] = end.isoformat()
        body = self.request("get-leads", params)
        rows = body.get("collectedCustomers") if isinstance(body, dict) else None
        if not isinstance(rows, list):
            raise ChatbaseUnavailable("Chatbase answered get-leads without a 'collectedCustomers' list")
        return rows

    def iter_leads(
        self,
        chatbot_id: str,
        start: date | None = None,
        end: date | None = None,
        size: int = LEADS_PAGE_SIZE,
    ) -> Iterator[tuple[list[dict[str, Any]], bool]]:
        """Every page of a chatbot's leads (whole UTC days ``start``..``end``), each with whether it is the
        last: get-leads has no paging metadata, so the last page is the first shorter than ``size``.
        Raises PagingError when the server repeats a page or never stops."""
        previous_ids: list[object] | None = None
        for page in range(1, MAX_PAGES_PER_WINDOW + 1):
            rows = self.get_leads(chatbot_id, page, start=start, end=end, size=size)
            ids = [row.get("id") if isinstance(row, dict) else None for row in rows]
            if rows and ids == previous_ids:
                raise PagingError(f"Chatbase repeated leads page {page - 1} as page {page}")
            previous_ids = ids
            last = len(rows) < size
            yield rows, last
            if last:
                return
        raise PagingError(f"more than {MAX_PAGES_PER_WINDOW} pages of leads: stopped paging")


def _conversations_params(
    chatbot_id: str,
    page: int,
    start: date | None,
    end: date | None,
    sources: tuple[str, ...],
    size: int,
) -> dict[str, Any]:
    """get-conversations' query for one page of a window of UTC days (both inclusive) and its sources."""
    params: dict[str, Any] = {"chatbotId": chatbot_id, "page": page, "size": size}
    if start:
        params["startDate"] = start.isoformat()
    if end:
        params["endDate"] = end.isoformat()
    if sources:
        params["filteredSources"] = ",".join(sources)
    return params


def _data_list(body: object) -> list[Any]:
    """The records of a get-conversations answer; ChatbaseUnavailable when it has no ``data`` list."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ChatbaseUnavailable("Chatbase answered without a 'data' list; nothing of this page was saved")
    return data


class PageAhead:
    """The first page of a sync's window of today, asked for before the sync has planned.

    A sync spends its first half second importing its database stack, opening the database and planning;
    every run's plan pages today's window from page 1 (today still grows, it is never settled), so that
    request can leave first and its answer wait for the plan. That moves the start of Chatbase's first
    rate-limit window, and with it the whole run, earlier. The sync takes the page where its plan asks
    for exactly it (:meth:`take`); a plan that does not (a lock another sync holds, a failure first)
    leaves it unused: one request.

    ``fetched_at``: when the request left (UTC), which is what the sync records for the page.
    """

    def __init__(
        self,
        client: ConversationSource,
        chatbot_id: str,
        day: date,
        sources: tuple[str, ...],
        now: Callable[[], datetime],
    ) -> None:
        self.key = (chatbot_id, 1, day, day, sources)
        self._client = client
        self._answer: Future[ConversationPage | None] = Future()
        self._taken = False
        self._lock = threading.Lock()
        self.fetched_at = now()
        threading.Thread(target=self._fetch, name="chatsync-page-ahead", daemon=True).start()

    def _fetch(self) -> None:
        chatbot_id, page, start, end, sources = self.key
        try:
            self._answer.set_result(self._client.fetch_page(chatbot_id, page, start, end, sources))
        except BaseException as exc:
            self._answer.set_exception(exc)

    def take(
        self, chatbot_id: str, page: int, start: date, end: date, sources: tuple[str, ...]
    ) -> tuple[ConversationPage | None, datetime] | None:
        """The page and ``fetched_at`` once it came back, when this is the page asked for ahead and nobody
        took it yet; else None at once. Raises what fetching it raised (after its retries, as
        :meth:`fetch_page` does)."""
        with self._lock:
            if self._taken or (chatbot_id, page, start, end, sources) != self.key:
                return None
            self._taken = True
        return self._answer.result(), self.fetched_at


def chatbots_from(entries: list[Any]) -> list[Chatbot]:
    """``Chatbot``s from listed entries that have an id; extra or unknown fields are ignored."""
    found = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("id") in (None, ""):
            continue
        name = entry.get("name") or entry.get("chatbotName")
        found.append(Chatbot(str(entry["id"]), str(name) if name not in (None, "") else None))
    return found


def rejection_hint(status: int, code: str | None, params: dict[str, Any]) -> str:
    if status == 401:
        return "check CHATBASE_API_KEY (a secret key from your Chatbase workspace settings)"
    if status == 403:
        return "this key or plan has no API access to the chatbot; check the plan and CHATBASE_CHATBOT_ID"
    if status == 404:
        return f"check CHATBASE_CHATBOT_ID: chatbot {params.get('chatbotId')!r} was not found for this key"
    return "check the chatbot id, dates (YYYY-MM-DD) and sources"


def open_client(
    settings: Settings,
    *,
    retry_budget: timedelta | None = None,
    max_connections: int = 16,
    transport: httpx.BaseTransport | None = None,
) -> ChatbaseClient | ChatbaseV2Client:
    """The client of the Chatbase API ``settings.api_version`` names (v1 at ``settings.base_url``, v2 at
    ``settings.api_url``) with the key, rate limit and retry budget of ``settings``. Raises
    MissingSetting when no key is set."""
    kwargs: dict[str, Any] = {
        "rate_limit": (settings.rate_limit_requests, settings.rate_limit_seconds),
        "retry_budget": retry_budget if retry_budget is not None else settings.retry_budget,
        "max_connections": max_connections,
        "transport": transport,
    }
    if settings.api_version == "v2":
        from chatsync.chatbase_v2 import ChatbaseV2Client

        return ChatbaseV2Client(settings.require_api_key(), settings.api_url, **kwargs)
    return ChatbaseClient(settings.require_api_key(), settings.base_url, **kwargs)


def api_root(settings: Settings) -> tuple[str, str]:
    """The API root sync reads and the variable that sets it: (URL, ``CHATBASE_BASE_URL`` or
    ``CHATBASE_API_URL``)."""
    if settings.api_version == "v2":
        return settings.api_url, "CHATBASE_API_URL"
    return settings.base_url, "CHATBASE_BASE_URL"
