"""The Chatbase client: paging rules, retries, rate limiting, error bodies; cassettes are replayed only."""

from __future__ import annotations

import html
import json
import logging
import threading
import time
from contextlib import suppress
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
import vcr

from chatsync.chatbase import MAX_MARGIN_SECONDS, ChatbaseClient, RateLimiter, _reset_seconds
from chatsync.config import Secret, WhatsAppRule
from chatsync.emulator import Emulator, EmulatorTransport
from chatsync.errors import (
    ChatbaseRejected,
    ChatbaseUnavailable,
    ConfigError,
    ExitCode,
    PagingError,
    UsageError,
)
from chatsync.normalize import normalize_conversation
from chatsync.sources import canonical_source
from tests.conftest import chatbase_env

CASSETTES = Path(__file__).parent / "cassettes"
replay = vcr.VCR(cassette_library_dir=str(CASSETTES), record_mode="none", match_on=["method", "uri"])
KEY = "sk-live-echoed-secret"


def _client(
    transport: httpx.BaseTransport | None = None, root: str = "https://www.chatbase.co/api/v1", **kwargs: Any
) -> ChatbaseClient:
    kwargs.setdefault("backoff", (0.01, 0.05))
    return ChatbaseClient(Secret(KEY), root, transport=transport, **kwargs)


# --------------------------------------------------------------------------------------------- cassettes
def test_documented_field_variants_all_normalise() -> None:
    with replay.use_cassette("conversation_page_shapes.yaml"), _client() as client:
        pages = list(client.iter_pages("bot-1", date(2024, 5, 1), date(2024, 5, 2)))
        assert list(client.iter_pages("bot-1", date(2024, 5, 3), date(2024, 5, 3))) == [([], True)]
    assert len(pages) == 1 and len(pages[0][0]) == 3 and pages[0][1] is True
    rows = {r["id"]: r for r in (normalize_conversation(c, "bot-1", WhatsAppRule()) for c in pages[0][0])}
    live, openapi, old = rows["c-live"], rows["c-openapi"], rows["c-old"]
    assert live["last_message_at"].isoformat() == "2024-05-02T09:03:00+00:00"
    assert openapi["last_message_at"].isoformat() == "2024-05-01T10:05:00+00:00"  # updated_at variant
    assert old["last_message_at"] is None  # no timestamps anywhere
    assert (live["customer"], openapi["customer"], old["customer"]) == ("cust_42", "a@example.com", None)
    assert (live["source"], openapi["source"], old["source"]) == ("WhatsApp", "Widget or Iframe", None)
    assert (live["wa_outcome"], live["wa_extracted"], live["wa_form"]) == (
        "captured",
        "+85291234567",
        "+85291234567",
    )
    assert live["response_seconds"] is None and live["response_steps"] == 0
    assert (
        openapi["response_steps"] == 1 and openapi["first_response_seconds"] is None
    )  # assistant had no time
    assert old["assistant_messages"] == 1  # "bot" is an assistant


def test_bad_key_fails_fast_and_never_repeats_the_key() -> None:
    with replay.use_cassette("errors_v1.yaml") as cassette, _client() as client:
        with pytest.raises(ChatbaseRejected) as raised:
            client.get_conversations("bot-1", 1)
        assert cassette.play_count == 1  # not retried
    assert raised.value.status == 401
    assert KEY not in str(raised.value)
    assert "CHATBASE_API_KEY" in str(raised.value)


@pytest.mark.parametrize(("key", "root"), [(KEY + "\r", None), (KEY, "ftp://127.0.0.1/api/v1")])
def test_a_request_that_cannot_be_sent_fails_at_once_and_never_shows_the_key(
    emulator_factory: Any, key: str, root: str | None
) -> None:
    """A key with a CR (a secrets file from Windows) made an illegal header: httpx's error quoted it
    escaped, past the masking, and the sync retried it for the whole budget (found by a breaking helper).
    The settings now refuse such a key; a client made without them still fails at once, key unseen."""
    server = emulator_factory(conversations=5)
    client = ChatbaseClient(Secret(key), root or server.base_url, backoff=(0.01, 0.05))
    with client, pytest.raises(ConfigError) as raised:
        client.get_conversations(next(iter(server.emulator.datasets)), 1)
    assert client.stats.retries == 0 and server.emulator.requests == 0
    assert "sk-live" not in str(raised.value) and "cannot send a request to Chatbase" in str(raised.value)


def test_unknown_chatbot_names_the_setting_to_fix() -> None:
    expected = "CHATBASE_CHATBOT_ID: chatbot 'ghost' was not found"
    with (
        replay.use_cassette("errors_v1.yaml"),
        _client() as client,
        pytest.raises(ChatbaseRejected, match=expected),
    ):
        client.get_conversations("ghost", 1)


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(404, html="<html><body>This page could not be found.</body></html>"),
        httpx.Response(404, json=["not", "an", "error", "object"]),
        httpx.Response(404),
        # API v2's answer to a path it does not serve: its root pasted into CHATBASE_BASE_URL
        httpx.Response(404, json={"error": {"code": "RESOURCE_NOT_FOUND", "message": "Not found"}}),
    ],
)
def test_a_404_that_is_not_chatbases_blames_the_address_not_the_chatbot(answer: httpx.Response) -> None:
    """A base URL with a wrong path (…/api/v2 for v1, a missing /api) gets a web server's 404 page: it was
    once read as "chatbot not found", and a sync of several chatbots took it as each one's refusal."""
    with (
        _client(httpx.MockTransport(lambda request: answer)) as client,
        pytest.raises(ChatbaseRejected) as raised,
    ):
        client.get_conversations("bot-1", 1)
    message = str(raised.value)
    assert raised.value.every_chatbot and "check CHATBASE_BASE_URL" in message
    assert "https://www.chatbase.co/api/v1" in message and "bot-1" not in message
    assert client.stats.retries == 0


@pytest.mark.parametrize("path", ["/api/v9", "", "/api/v2"])
def test_a_mistyped_base_url_against_the_emulator_ends_at_once(
    cli: Any, emulator_factory: Any, sqlite_url: str, path: str
) -> None:
    """The emulator answered v1 under any path, so what docs/cli.md promises for a mistyped
    CHATBASE_BASE_URL (exit 4 at once, naming the setting) could not be tried with it: it synced.
    Found by helper-44. It now serves v1 under /api/v1 alone, as Chatbase does."""
    server = emulator_factory(conversations=30, seed=5)
    root = server.base_url.removesuffix("/api/v1") + path
    ran = cli("sync", "--json", env=chatbase_env(server, sqlite_url, CHATBASE_BASE_URL=root))
    assert ran.exit_code == ExitCode.CONFIG, ran.stdout + ran.stderr
    line = json.loads(ran.stdout)
    assert "check CHATBASE_BASE_URL" in line["error"] and line["inserted"] == 0


def test_v2_errors_are_retried_honouring_retry_after() -> None:
    with replay.use_cassette("errors_v2_then_ok.yaml") as cassette, _client() as client:
        started = time.monotonic()
        data = client.get_conversations("bot-1", 1)
        waited = time.monotonic() - started
        assert cassette.play_count == 3
    assert [c["id"] for c in data] == ["c1"]
    assert client.stats.retries == 2 and client.stats.throttled == 1
    assert waited >= 1.0  # Retry-After: 1


# ---------------------------------------------------------------------------------------- paging rules
def _pages_transport(pages: list[list[dict[str, Any]]], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        page = int(request.url.params["page"])
        data = pages[page - 1] if page <= len(pages) else []
        return httpx.Response(200, json={"data": data})

    return httpx.MockTransport(handler)


def _records(start: int, count: int) -> list[dict[str, Any]]:
    return [
        {"id": f"c{i}", "created_at": "2024-05-01T00:00:00Z", "messages": []}
        for i in range(start, start + count)
    ]


def test_paging_asks_100_a_page_and_stops_at_the_first_short_page() -> None:
    seen: list[httpx.Request] = []
    transport = _pages_transport([_records(0, 100), _records(100, 100), _records(200, 7)], seen)
    with _client(transport) as client:
        pages = list(client.iter_pages("bot", date(2024, 5, 1), date(2024, 5, 1)))
    assert [(len(p), last) for p, last in pages] == [(100, False), (100, False), (7, True)]
    assert [r.url.params["page"] for r in seen] == ["1", "2", "3"]
    assert {r.url.params["size"] for r in seen} == {"100"}
    assert seen[0].headers["authorization"] == f"Bearer {KEY}"


def test_a_full_last_page_is_closed_by_an_empty_one() -> None:
    seen: list[httpx.Request] = []
    with _client(_pages_transport([_records(0, 100)], seen)) as client:
        assert [(len(p), last) for p, last in client.iter_pages("bot", None, None)] == [
            (100, False),
            (0, True),
        ]
    assert len(seen) == 2


def test_a_repeated_page_is_caught() -> None:
    seen: list[httpx.Request] = []
    same = _records(0, 100)
    with (
        _client(_pages_transport([same, same, same], seen)) as client,
        pytest.raises(PagingError, match="repeated"),
    ):
        list(client.iter_pages("bot", None, None))


def test_truncated_bodies_and_transport_errors_are_retried() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            raise httpx.ReadTimeout("slow", request=request)
        if calls["n"] == 2:
            return httpx.Response(200, content=b'{"data": [{"id": "c1", "crea')
        return httpx.Response(200, json={"data": _records(0, 1)})

    with _client(httpx.MockTransport(handler)) as client:
        assert len(client.get_conversations("bot", 1)) == 1
    assert client.stats.retries == 2


def test_retry_budget_ends_an_outage() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(503, json={"message": "down"}))
    with _client(transport, retry_budget=timedelta(seconds=1)) as client:
        started = time.monotonic()
        with pytest.raises(ChatbaseUnavailable, match="kept failing"):
            client.get_conversations("bot", 1)
    assert time.monotonic() - started < 5


def test_an_outage_is_ridden_out_to_the_end_of_the_budget_and_the_error_says_how_long() -> None:
    """The backoff's next wait (up to 30 s) once ended the retries that much before the budget did, and
    the error still claimed the whole budget: a sync gave up at 8.6 s of a 20 s budget."""
    transport = httpx.MockTransport(lambda request: httpx.Response(503, json={"message": "down"}))
    with _client(transport, retry_budget=timedelta(seconds=3), backoff=(2.0, 30.0)) as client:
        started = time.monotonic()
        with pytest.raises(ChatbaseUnavailable) as raised:
            client.get_conversations("bot", 1)
    failed_for = time.monotonic() - started
    assert 2.6 <= failed_for <= 3.1  # the last try starts a tenth of the budget before its end
    said = f"kept failing for {failed_for:.0f} s (retry budget 3 s; last: HTTP 503: down)"
    assert said in str(raised.value)


def test_chatbase_back_just_before_the_budget_ends_is_not_given_up_on() -> None:
    transport = httpx.MockTransport(_Outages(2.5))
    with _client(transport, retry_budget=timedelta(seconds=3), backoff=(2.0, 30.0)) as client:
        assert client.get_conversations("bot", 1) == []
    assert client.stats.retries >= 2


def test_a_data_less_answer_is_not_taken_for_an_empty_page() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"conversations": []}))
    with _client(transport) as client, pytest.raises(ChatbaseUnavailable, match="without a 'data' list"):
        client.get_conversations("bot", 1)


def test_first_day_is_found_by_bisection() -> None:
    emulator = Emulator(conversations=300, seed=3, days=45, rate_limit=None, api_key=KEY)
    with _client(EmulatorTransport(emulator)) as client:
        today = emulator.datasets["demo-bot"].end.date()
        first = client.find_first_day("demo-bot", today)
        requests = client.stats.requests
    oldest = min(c["created_at"][:10] for c in emulator.all_conversations("demo-bot"))
    assert first is not None and first.isoformat() == oldest
    assert requests <= 16


def test_rate_limiter_never_exceeds_its_window() -> None:
    limiter = RateLimiter(limit=5, window=0.5, margin=0.0)
    sent = []
    for _ in range(12):
        limiter.acquire()
        sent.append(time.monotonic())
    for i in range(len(sent) - 5):
        assert sent[i + 5] - sent[i] >= 0.5 - 1e-3


def test_the_rate_limit_window_counts_from_when_a_request_left() -> None:
    """Chatbase counts a request on arrival: one that left late (a slow connect) opens its window late."""
    limiter = RateLimiter(limit=2, window=0.4, margin=0.0)
    first = limiter.acquire()
    limiter.acquire()
    time.sleep(0.2)
    started = time.monotonic()  # (before the stamp: a loaded machine may take a while between the two)
    limiter.sent(first)  # its headers went out 0.2 s after it was let go
    limiter.acquire()
    assert time.monotonic() - started >= 0.4


def test_each_request_over_http_tells_the_limiter_when_it_left(emulator_factory: Any) -> None:
    """The moment comes from the HTTP client's trace, so it needs a real connection (no test transport)."""

    class Recording(RateLimiter):
        def sent(self, slot: list[float]) -> None:
            let_go = slot[0]
            super().sent(slot)
            moments.append((let_go, slot[0]))

    moments: list[tuple[float, float]] = []
    server = emulator_factory(conversations=30, chatbot_ids=("demo-bot",), latency_ms=50, api_key=KEY)
    with ChatbaseClient(Secret(KEY), server.base_url, limiter=Recording()) as client:
        for page in (1, 2, 3):
            client.fetch_page("demo-bot", page, date(2020, 1, 1), date.today(), ())
    assert len(moments) == 3
    assert all(let_go <= left < let_go + 0.05 for let_go, left in moments)  # sent before the 50 ms answer


def test_requests_waiting_for_the_window_go_in_the_order_they_asked() -> None:
    """A sync asks for its pages in order; the page that ends a stream must not wait behind later ones."""
    limiter = RateLimiter(limit=2, window=0.3, margin=0.0)
    limiter.acquire()
    limiter.acquire()
    slots: dict[int, list[float]] = {}
    threads = []
    for turn in range(6):
        thread = threading.Thread(target=lambda t=turn: slots.__setitem__(t, limiter.acquire()))
        thread.start()
        threads.append(thread)
        time.sleep(0.01)  # each asks after the one before
    for thread in threads:
        thread.join()
    let_go = [slots[t][0] for t in range(6)]
    assert let_go == sorted(let_go)


def test_a_slot_not_used_frees_its_place_and_a_stop_ends_the_wait() -> None:
    limiter = RateLimiter(limit=1, window=30.0)
    limiter.unused(limiter.acquire())
    started = time.monotonic()
    limiter.acquire()  # the unused slot took no place in the window
    assert time.monotonic() - started < 0.1
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    with pytest.raises(ChatbaseUnavailable, match="stopped"):
        limiter.acquire(stop)
    assert time.monotonic() - started < 1.0


def test_a_request_no_longer_wanted_leaves_the_queue_without_waiting_for_its_slot() -> None:
    """A page found past the end of its stream while it waited for the window: the sync's last page must
    not wait for that page's slot (up to a whole window) before the run can end."""
    limiter = RateLimiter(limit=1, window=30.0)
    limiter.acquire()  # the window is full for 30 s
    still_wanted = threading.Event()
    still_wanted.set()
    got: list[object] = []
    waiting = threading.Thread(target=lambda: got.append(limiter.acquire(wanted=still_wanted.is_set)))
    waiting.start()
    time.sleep(0.2)
    assert waiting.is_alive()  # wanted: it waits for the window
    still_wanted.clear()
    limiter.reconsider()
    waiting.join(timeout=5)  # (the window would have let it go only after 30 s)
    assert not waiting.is_alive() and got == [None]
    assert len(limiter._sent) == 1  # it took no place in the window


def test_a_429_the_limiter_let_through_widens_its_margin_up_to_a_cap() -> None:
    limiter = RateLimiter(margin=0.05)
    margins = []
    for _ in range(8):
        limiter.throttled()
        margins.append(limiter.margin)
    assert margins[:3] == [0.1, 0.2, 0.4]
    assert margins[-1] == MAX_MARGIN_SECONDS


def test_rate_limit_reset_is_read_as_milliseconds_or_seconds() -> None:
    now = time.time()
    in_ms = _reset_seconds(httpx.Headers({"x-ratelimit-reset": str(int((now + 3) * 1000))}))
    in_s = _reset_seconds(httpx.Headers({"x-ratelimit-reset": str(int(now + 3))}))
    assert in_ms is not None and 1.5 < in_ms <= 3.0
    assert in_s is not None and 1.5 < in_s <= 3.0


def test_sources_are_matched_in_any_case_and_misspellings_refused() -> None:
    assert canonical_source("widget OR iframe") == "Widget or Iframe"
    with pytest.raises(UsageError, match="expected one of"):
        canonical_source("Whatsap")


def test_emulator_answers_like_chatbase() -> None:
    emulator = Emulator(conversations=30, seed=1, rate_limit=(2, 60.0))
    transport = EmulatorTransport(emulator)
    with httpx.Client(transport=transport, base_url="http://emulator/api/v1/") as http:
        auth = {"Authorization": "Bearer demo-key"}
        assert http.get("get-conversations", params={"chatbotId": "demo-bot"}, headers={}).status_code == 401
        bad_date = http.get(
            "get-conversations", params={"chatbotId": "demo-bot", "startDate": "2024-1-5"}, headers=auth
        )
        assert bad_date.status_code == 400 and "message" in bad_date.json()
        limited = http.get("get-conversations", params={"chatbotId": "demo-bot"}, headers=auth)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert json.loads(limited.content)["error"]["code"] == "RATE_LIMIT_TOO_MANY_REQUESTS"


def test_the_emulator_stays_quiet_when_a_client_hangs_up(
    emulator_factory: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    server = emulator_factory(conversations=3000, seed=1, latency_ms=300)
    for _ in range(3):
        with pytest.raises(httpx.TimeoutException):
            httpx.get(
                f"{server.base_url}/get-conversations",
                params={"chatbotId": "demo-bot", "size": 100},
                headers={"Authorization": "Bearer demo-key"},
                timeout=0.1,
            )
    time.sleep(0.8)  # let the server finish writing into the closed connections
    assert "Exception occurred" not in capfd.readouterr().err


# ------------------------------------------------------------------------------------------- Retry-After
def _http_date(seconds_from_now: float) -> str:
    import email.utils

    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "low", "high"),
    [
        ({"retry-after": "7"}, 7, 7),
        ({"retry-after": " 2.5 "}, 2.5, 2.5),
        ({"retry-after": "0"}, 0, 0),
        ({"retry-after": "__HTTP_DATE_5__"}, 3.5, 5.0),  # RFC 9110's other form
        ({"retry-after": "__HTTP_DATE_-30__"}, 0, 0),  # a date in the past: no wait
        ({"retry-after": "soon", "x-ratelimit-reset": "__RESET_4__"}, 2.5, 4.0),  # unreadable: fall back
        ({"retry-after": "inf", "x-ratelimit-reset": "__RESET_4__"}, 2.5, 4.0),
        ({"retry-after": "nan"}, None, None),
        ({"x-ratelimit-reset": "inf"}, None, None),
        ({"retry-after": "Wed, 99 Foo 2015 07:28:00 GMT"}, None, None),
    ],
    ids=[
        "seconds",
        "fraction",
        "zero",
        "http-date",
        "past-date",
        "fallback",
        "infinite",
        "nan",
        "inf-reset",
        "bad-date",
    ],
)
def test_retry_after_is_read_in_both_rfc_forms_then_from_the_reset_header(
    headers: dict[str, str], low: float | None, high: float | None
) -> None:
    from chatsync.chatbase import _retry_after

    filled = {}
    for name, value in headers.items():
        if value.startswith("__HTTP_DATE_"):
            value = _http_date(float(value.removeprefix("__HTTP_DATE_").rstrip("_")))
        elif value.startswith("__RESET_"):
            value = str(int((time.time() + float(value.removeprefix("__RESET_").rstrip("_"))) * 1000))
        filled[name] = value
    seconds = _retry_after(httpx.Headers(filled))
    if low is None:
        assert seconds is None
    else:
        assert seconds is not None and low <= seconds <= high


def test_a_429_with_an_http_date_retry_after_waits_until_that_date() -> None:
    """Chatbase (or a proxy in front of it) may send the date form; the retry must not come after 1 s."""
    arrivals: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        arrivals.append(time.monotonic())
        if len(arrivals) == 1:
            return httpx.Response(429, headers={"retry-after": _http_date(3)}, json={"message": "slow down"})
        return httpx.Response(200, json={"data": []})

    with _client(httpx.MockTransport(handler)) as client:
        assert client.get_conversations("bot", 1) == []
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 1.9  # the date is 2–3 s away at one-second resolution


def test_a_server_asking_for_hours_never_holds_a_sync_past_its_retry_budget() -> None:
    """Retry-After: 600 (or a rate-limit reset a day ahead) once stalled a sync, and its lock, for hours."""
    asked: list[float] = []
    reset = str(int((time.time() + 86_400) * 1000))

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(time.monotonic())
        if len(asked) == 1:  # a page that says the window is used up until tomorrow
            return httpx.Response(
                200, json={"data": []}, headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": reset}
            )
        return httpx.Response(429, headers={"retry-after": "600"}, json={"message": "slow down"})

    started = time.monotonic()
    with _client(httpx.MockTransport(handler), retry_budget=timedelta(seconds=3)) as client:
        assert client.get_conversations("bot", 1) == []
        with pytest.raises(ChatbaseUnavailable, match="longer than the retry budget"):
            client.get_conversations("bot", 1)
    assert time.monotonic() - started < 20  # it gives up at once: the wait asked for outlasts the budget


class _Outages:
    """A Chatbase that refuses connections (with a message echoing the key) for ``seconds`` from the first
    request after each :meth:`begin`, then answers an empty page."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.began: float | None = None

    def begin(self) -> None:
        self.began = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.began is None:
            self.began = time.monotonic()
        if time.monotonic() - self.began < self.seconds:
            raise httpx.ConnectError(f"refused (sent {KEY})", request=request)
        return httpx.Response(200, json={"data": []})


def test_an_outage_is_told_once_on_stderr_when_it_outlasts_a_blip(caplog: pytest.LogCaptureFixture) -> None:
    """Retries are logged at -v only: an unreachable host once left a sync silent for its whole budget."""
    caplog.set_level("WARNING", logger="chatsync")
    outages = _Outages(0.6)
    with _client(httpx.MockTransport(outages), warn_after=0.3) as client:
        assert client.get_conversations("bot", 1) == []
        told = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(told) == 1
        message = told[0].getMessage()
        assert message.startswith("Chatbase at https://www.chatbase.co/api/v1 has failed for ")
        assert "ConnectError" in message and "CHATBASE_BASE_URL" in message and "300 s" in message
        assert KEY not in caplog.text
        # a second outage in the same run is not told again
        outages.begin()
        assert client.get_conversations("bot", 1) == []
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
    assert client.stats.retries > 2


def test_a_blip_and_the_rate_limit_stay_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="chatsync")
    with _client(httpx.MockTransport(_Outages(0.2)), warn_after=1.0) as client:
        assert client.get_conversations("bot", 1) == []
    assert client.stats.retries >= 1
    asked: list[float] = []

    def throttling(request: httpx.Request) -> httpx.Response:
        asked.append(time.monotonic())
        if time.monotonic() - asked[0] < 2.5:
            return httpx.Response(429, headers={"retry-after": "1"}, json={"message": "slow down"})
        return httpx.Response(200, json={"data": []})

    with _client(httpx.MockTransport(throttling), warn_after=0.5) as client:
        assert client.get_conversations("bot", 1) == []
    assert len(asked) >= 3  # held by the rate limit past the warning time
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_time_held_by_the_rate_limit_is_not_an_outage(caplog: pytest.LogCaptureFixture) -> None:
    """A 429 asking for 1 s then one 503 made the warning say Chatbase "has failed" for the time the
    request had waited for the rate limit: a 429 is an answer, and the outage clock starts at the 503."""
    caplog.set_level("WARNING", logger="chatsync")
    answers = [
        httpx.Response(429, headers={"retry-after": "1"}, json={"message": "slow down"}),
        httpx.Response(503, json={"message": "down"}),
        httpx.Response(200, json={"data": []}),
    ]
    with _client(httpx.MockTransport(lambda request: answers.pop(0)), warn_after=0.5) as client:
        assert client.get_conversations("bot", 1) == []
    assert not answers and client.stats.retries == 2
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


ODD_KEY = "sk-Secret+Key/with=odd\"chars\\x<&>'"


@pytest.mark.parametrize(
    "echo",
    [
        lambda key: httpx.Response(503, headers={"x-request-id": f"Bearer {key}"}, json={"message": "down"}),
        lambda key: httpx.Response(503, content=json.dumps({"message": f"upstream said: {json.dumps(key)}"})),
        lambda key: httpx.Response(503, json={"message": "token=Bearer%20" + quote(key)}),
        lambda key: httpx.Response(503, json={"message": "token=" + quote(key, safe="")}),
        lambda key: httpx.Response(503, json={"message": "q=" + quote_plus(key)}),
        lambda key: httpx.Response(503, json={"message": "q=" + quote(key, safe="").lower()}),
        lambda key: httpx.Response(503, json={"message": "q=" + quote(key, safe="/=")}),  # JS encodeURI
        lambda key: httpx.Response(503, content=json.dumps({"message": json.dumps(key).replace("/", "\\/")})),
        lambda key: httpx.Response(503, content=json.dumps({"message": key.replace("+", "\\u002B")})),
        lambda key: httpx.Response(503, content=json.dumps({"message": json.dumps({"token": key})})),
        lambda key: httpx.Response(503, json={"message": key.replace("+", "&#43;").replace("/", "&#x2F;")}),
        lambda key: httpx.Response(503, json={"message": html.escape(key)}),
        lambda key: httpx.Response(503, json={"message": quote(json.dumps(key)[1:-1], safe="")}),
        lambda key: httpx.Response(503, json={"message": "".join(f"&#{ord(c)}" for c in key)}),
        lambda key: httpx.Response(503, json={"message": "".join(f"%u{ord(c):04X}" for c in key)}),
    ],
    ids=[
        "request-id",
        "json-escaped",
        "url-encoded",
        "url-encoded-slash",
        "form-encoded",
        "lowercase-percent",
        "partly-encoded",
        "php-slash",
        "dotnet-unicode",
        "json-twice",
        "html-entities",
        "html-named-entities",
        "percent-encoded-json",
        "entities-without-semicolons",
        "javascript-escape",
    ],
)
def test_a_key_the_server_echoes_in_any_encoding_never_reaches_the_messages(
    echo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="chatsync")
    transport = httpx.MockTransport(lambda request: echo(ODD_KEY))
    client = ChatbaseClient(
        Secret(ODD_KEY),
        "https://www.chatbase.co/api/v1",
        transport=transport,
        backoff=(0.01, 0.05),
        retry_budget=timedelta(seconds=0.5),
        warn_after=0.2,
    )
    with client, pytest.raises(ChatbaseUnavailable) as raised:
        client.get_conversations("bot", 1)
    said = str(raised.value) + caplog.text
    assert "***" in said and "WARNING" in caplog.text
    for form in (
        ODD_KEY,
        json.dumps(ODD_KEY)[1:-1],
        quote(ODD_KEY),
        quote(ODD_KEY, safe=""),
        quote_plus(ODD_KEY),
    ):
        assert form not in said
    for part in ("secret", "odd", "chars"):  # nor any piece of it, however encoded
        assert part not in said.lower()


def test_a_long_error_page_is_shortened_in_what_chatsync_says() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(503, json={"message": "x" * 10_000}))
    with (
        _client(transport, retry_budget=timedelta(seconds=0.3)) as client,
        pytest.raises(ChatbaseUnavailable) as raised,
    ):
        client.get_conversations("bot", 1)
    assert "x" * 299 + "…" in str(raised.value) and len(str(raised.value)) < 600


def test_one_request_hanging_while_chatbase_answers_the_others_is_no_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One request timed out after 30 s while 157 others were answered: the warning said Chatbase had
    failed for 30 s, counting from that request's own send although Chatbase had answered since."""
    caplog.set_level("WARNING", logger="chatsync")
    hung = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params["page"] == "9" and not hung.is_set():
            time.sleep(0.8)
            hung.set()
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(200, json={"data": []})

    with _client(httpx.MockTransport(handler), warn_after=0.4) as client:
        slow = threading.Thread(target=client.get_conversations, args=("bot", 9))
        slow.start()
        answered = 0
        while not hung.is_set():
            assert client.get_conversations("bot", 1) == []
            answered += 1
            time.sleep(0.02)
        slow.join()
    assert answered >= 5 and client.stats.retries == 1
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_the_error_counts_the_failing_not_the_time_held_by_the_rate_limit() -> None:
    """After 2 s held by a 429 and 2 s of 503s, the error said Chatbase "kept failing for 4 s"."""
    answers = iter([httpx.Response(429, headers={"retry-after": "2"}, json={"message": "slow down"})])

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or httpx.Response(503, json={"message": "down"})

    with (
        _client(httpx.MockTransport(handler), retry_budget=timedelta(seconds=4)) as client,
        pytest.raises(ChatbaseUnavailable) as raised,
    ):
        client.get_conversations("bot", 1)
    said = str(raised.value)
    assert (
        "kept failing for 2 s after 2 s held by its rate limit (retry budget 4 s; last: HTTP 503: down)"
        in said
    )


@pytest.mark.parametrize(
    ("asked", "budget", "said"),
    [
        ("1", 3, "kept failing for 2 s: its rate limit refused every try, the last asking for 1 s more"),
        ("60", 20, "kept failing for 0 s: its rate limit refused every try, the last asking for 60 s more"),
    ],
)
def test_a_429_that_never_ends_says_so(asked: str, budget: int, said: str) -> None:
    transport = httpx.MockTransport(
        lambda request: httpx.Response(429, headers={"retry-after": asked}, json={"message": "slow down"})
    )
    with (
        _client(transport, retry_budget=timedelta(seconds=budget)) as client,
        pytest.raises(ChatbaseUnavailable) as raised,
    ):
        client.get_conversations("bot", 1)
    assert f"{said} (retry budget {budget} s; last: HTTP 429: slow down)" in str(raised.value)


def test_the_backoff_after_a_429_storm_starts_short() -> None:
    """The backoff counted the tries a 429 refused: after a storm the first 503 waited 15 to 30 s."""
    answers = iter(
        [httpx.Response(429, headers={"retry-after": "0"}, json={"message": "slow down"})] * 5
        + [httpx.Response(503, json={"message": "down"})]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or httpx.Response(200, json={"data": []})

    with _client(httpx.MockTransport(handler), backoff=(0.2, 30.0)) as client:
        assert client.get_conversations("bot", 1) == []
    assert client.stats.waited < 5 * 1.0 + 0.2 + 0.01  # five 1 s holds, then the first backoff step


@pytest.fixture
def silent_server() -> Any:
    """A server that accepts connections and never answers (a hung proxy); yields its port."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not done.is_set():
            with suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    done.set()
    thread.join()
    for connection in held:
        connection.close()
    listener.close()


def test_a_server_that_never_answers_is_given_up_on_when_the_budget_ends(silent_server: int) -> None:
    """Each try waited its whole 30 s timeout, the last one past the budget: 62.6 s for a 35 s budget. The
    first try has its whole timeout (a budget shorter than a slow Chatbase's answer must not fail it);
    a retry has what is left of the budget."""
    client = _client(
        root=f"http://127.0.0.1:{silent_server}/api/v1", timeout=2.0, retry_budget=timedelta(seconds=3)
    )
    started = time.monotonic()
    with client, pytest.raises(ChatbaseUnavailable) as raised:
        client.get_conversations("bot", 1)
    took = time.monotonic() - started
    assert 2.8 <= took <= 3.5  # (a retry with its whole timeout: 4 s)
    assert "Timeout" in str(raised.value) and "kept failing for 3 s (retry budget 3 s" in str(raised.value)


def test_a_slow_chatbase_is_not_failed_by_a_budget_shorter_than_its_answer(emulator_factory: Any) -> None:
    """Each try's timeout was cut to the budget left, so '--retry-budget 0s' failed every request to a
    Chatbase that answers in 1.5 s, and said it 'kept failing'."""
    server = emulator_factory(conversations=30, chatbot_ids=("demo-bot",), latency_ms=600, api_key=KEY)
    with ChatbaseClient(Secret(KEY), server.base_url, retry_budget=timedelta(seconds=0)) as client:
        assert len(client.get_conversations("demo-bot", 1)) == 30
    assert client.stats.retries == 0


@pytest.mark.parametrize("part", ["body", "headers"])
def test_a_server_trickling_its_answer_is_given_up_on_when_the_budget_ends(part: str) -> None:
    """httpx's timeout bounds each read: a server sending a byte every second held a sync for good. Its
    headers trickled held any request for ever (helper-46: an API v2 sync's first-day lookup, which runs
    with the sync lock held, `doctor`, `leads sync`, `sync --all-chatbots`' list of chatbots)."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def trickle() -> None:
        connection = listener.accept()[0]
        connection.recv(65536)
        connection.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
            if part == "body"
            else b"HTTP/1.1 200 OK\r\nx-padding: "
        )
        with suppress(OSError):
            while not done.wait(0.2):
                connection.sendall(b" " if part == "body" else b"x")
        connection.close()

    threading.Thread(target=trickle, daemon=True).start()
    root = f"http://127.0.0.1:{listener.getsockname()[1]}/api/v1"
    client = _client(root=root, timeout=1.0, retry_budget=timedelta(seconds=1.5))
    started = time.monotonic()
    try:
        with client, pytest.raises(ChatbaseUnavailable) as raised:
            client.get_conversations("bot", 1)
    finally:
        done.set()
        listener.close()
    assert time.monotonic() - started < 5  # (the 100 bytes would take 20 s)
    assert "trickling" in str(raised.value)


def _warnings_after_start(transport: httpx.BaseTransport, **settings: Any) -> list[float]:
    """Seconds from the start of one request that gives up to each warning chatsync logged meanwhile."""
    told: list[float] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: told.append(time.monotonic())  # type: ignore[method-assign]
    logging.getLogger("chatsync").addHandler(handler)
    try:
        with _client(transport, **settings) as client:
            started = time.monotonic()
            with pytest.raises(ChatbaseUnavailable):
                client.get_conversations("bot", 1)
    finally:
        logging.getLogger("chatsync").removeHandler(handler)
    return [moment - started for moment in told]


def test_an_outage_is_told_when_it_reaches_the_warning_time_not_at_the_next_try() -> None:
    """The warning came with the first failed try after 30 s, so at 41 to 46 s against a closed port, and
    a 35 s budget printed it together with the error."""
    transport = httpx.MockTransport(lambda request: httpx.Response(503, json={"message": "down"}))
    told = _warnings_after_start(
        transport, warn_after=0.5, retry_budget=timedelta(seconds=2.5), backoff=(0.4, 30.0)
    )
    assert len(told) == 1 and 0.5 <= told[0] < 0.7


def test_a_retry_a_stop_cut_short_is_not_counted() -> None:
    """A SIGTERM during an outage printed "requests": 27, "retries": 27: the retry it cut short, counted
    when its wait began, was never sent."""
    transport = httpx.MockTransport(lambda request: httpx.Response(503, json={"message": "down"}))
    with _client(transport, backoff=(0.3, 0.3)) as client:
        threading.Timer(0.5, client.stop.set).start()
        with pytest.raises(ChatbaseUnavailable, match="stopped"):
            client.get_conversations("bot", 1)
    assert client.stats.requests >= 2 and client.stats.retries == client.stats.requests - 1


def test_an_outage_is_told_when_due_while_every_request_hangs() -> None:
    """503s then a server that accepts and never answers: the warning waited for the next failed try
    (at 40 s, saying 40), as it was told only at a failure or during a retry's wait."""
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(503, json={"message": "down"})
        time.sleep(1.2)
        raise httpx.ReadTimeout("timed out", request=request)

    told = _warnings_after_start(
        httpx.MockTransport(handler), warn_after=0.4, retry_budget=timedelta(seconds=1.5)
    )
    assert len(told) == 1 and 0.4 <= told[0] < 0.8


@pytest.mark.parametrize(
    ("key", "echo"),
    [
        (KEY, "\\" * 1_000_000),  # a run of backslashes: quadratic (100,000 held a 20 s budget for 106 s)
        (KEY, "".join(f"\\\\\\\\u{ord(c):04x}" for c in KEY[:14])),  # cut short: exponential (12: 121 s)
        ("sk-a\\\\b\\c-0123456789", "\\" * 40 + "sk-a" + "\\" * 30),  # the key's own backslashes
    ],
    ids=["million-backslashes", "escaped-key-cut-short", "key-with-backslashes"],
)
def test_an_echo_made_to_be_slow_to_mask_does_not_hold_the_sync(key: str, echo: str) -> None:
    """The key's pattern must take linear time whatever a server echoes: matching runs in C holding the
    GIL, so a slow one also left SIGTERM unheard (both found by breaking helpers)."""
    transport = httpx.MockTransport(lambda request: httpx.Response(503, json={"message": echo}))
    client = ChatbaseClient(
        Secret(key), "https://www.chatbase.co/api/v1", transport=transport, retry_budget=timedelta(seconds=1)
    )
    started = time.monotonic()
    with client, pytest.raises(ChatbaseUnavailable, match="kept failing"):
        client.get_conversations("bot", 1)
    assert time.monotonic() - started < 30  # (quadratic or exponential: minutes to hours)
