"""The API v2 client (export paging, errors, retries, rate limit, first day) and v1 chatbots and leads."""

from __future__ import annotations

import json
import math
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import vcr
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from chatsync.chatbase import ChatbaseClient, Chatbot
from chatsync.chatbase_records import record_from_export
from chatsync.chatbase_v2 import ChatbaseV2Client, Probe, search_first_day
from chatsync.config import Secret, WhatsAppRule
from chatsync.emulator import Emulator, EmulatorTransport, Faults
from chatsync.errors import ChatbaseRejected, ChatbaseUnavailable, PagingError, UsageError
from chatsync.normalize import normalize_conversation
from chatsync.timeutil import parse_timestamp
from tests.chatbase_v2_schema import EXPORT_PAGE, schema_errors

CASSETTES = Path(__file__).parent / "cassettes"
replay = vcr.VCR(cassette_library_dir=str(CASSETTES), record_mode="none", match_on=["method", "uri"])
KEY = "sk-live-echoed-secret"
END = datetime(2024, 6, 1, tzinfo=UTC)


class Recording(httpx.BaseTransport):
    """Pass requests on to another transport and keep them, to see what the client sent."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.inner.handle_request(request)


def _emulator(**kwargs: Any) -> Emulator:
    kwargs.setdefault("end", END)
    kwargs.setdefault("rate_limit", None)
    kwargs.setdefault("api_key", KEY)
    return Emulator(**kwargs)


def _v2(target: Emulator | httpx.BaseTransport, **kwargs: Any) -> ChatbaseV2Client:
    kwargs.setdefault("backoff", (0.01, 0.05))
    transport = EmulatorTransport(target) if isinstance(target, Emulator) else target
    return ChatbaseV2Client(Secret(KEY), "https://www.chatbase.co/api/v2", transport=transport, **kwargs)


def _v1(target: Emulator | httpx.BaseTransport, **kwargs: Any) -> ChatbaseClient:
    kwargs.setdefault("backoff", (0.01, 0.05))
    transport = EmulatorTransport(target) if isinstance(target, Emulator) else target
    return ChatbaseClient(Secret(KEY), "https://www.chatbase.co/api/v1", transport=transport, **kwargs)


def _day(record: dict[str, Any]) -> date:
    return datetime.fromtimestamp(record["createdAt"], UTC).date()


def _page(records: list[dict[str, Any]], cursor: str | None, total: int = 100) -> httpx.Response:
    pagination = {"cursor": cursor, "hasMore": cursor is not None, "total": total}
    return httpx.Response(200, json={"data": records, "pagination": pagination})


# ------------------------------------------------------------------------------------------------ paging
@pytest.mark.parametrize("size", [1, 7, 20])
def test_every_conversation_of_a_window_comes_exactly_once(size: int) -> None:
    emulator = _emulator(conversations=400, seed=5, days=20)
    start, end = date(2024, 5, 20), date(2024, 5, 23)
    with _v2(emulator) as client:
        pages = list(client.iter_pages("demo-bot", start, end, size=size))
    ids = [r["id"] for records, _ in pages for r in records]
    expected = {r["id"] for r in emulator.all_export_records("demo-bot") if start <= _day(r) <= end}
    assert len(ids) == len(set(ids)) and set(ids) == expected
    assert [last for _, last in pages] == [False] * (len(pages) - 1) + [True]
    assert len(pages) == math.ceil(len(expected) / size)


def test_the_same_filters_go_with_every_page() -> None:
    emulator = _emulator(conversations=300, seed=5, days=20)
    transport = Recording(EmulatorTransport(emulator))
    sources = ("WhatsApp", "Widget or Iframe")
    with _v2(transport) as client:
        records = [
            r
            for page, _ in client.iter_pages("demo-bot", date(2024, 5, 15), date(2024, 5, 31), sources)
            for r in page
        ]
    assert records and {r["source"] for r in records} == set(sources)
    assert len(transport.requests) > 2
    for number, request in enumerate(transport.requests):
        params = request.url.params
        assert (params["startDate"], params["endDate"]) == ("2024-05-15", "2024-05-31")
        assert params["source"] == "WhatsApp,Widget or Iframe" and params["limit"] == "20"
        assert ("cursor" in params) == (number > 0)
        assert request.headers["authorization"] == f"Bearer {KEY}"


def test_the_whole_history_pages_over_loopback(emulator_factory: Any) -> None:
    server = emulator_factory(conversations=250, seed=4)
    with ChatbaseV2Client(Secret("demo-key"), server.v2_base_url) as client:
        pages = list(client.iter_pages("demo-bot", None, None))
    ids = [r["id"] for records, _ in pages for r in records]
    assert sorted(ids) == sorted(r["id"] for r in server.emulator.all_export_records("demo-bot"))
    assert len(pages) == 13 and pages[-1][1] is True


def test_a_server_that_hands_out_a_cursor_again_is_stopped() -> None:
    cursors = iter(["A", "B", "A", "C"])

    def handler(request: httpx.Request) -> httpx.Response:
        return _page(
            [{"id": request.url.params.get("cursor", "first"), "createdAt": 1714557600}], next(cursors)
        )

    with _v2(httpx.MockTransport(handler)) as client, pytest.raises(PagingError, match="cursor again"):
        list(client.iter_pages("bot", None, None))


def test_conversations_from_outside_the_window_are_refused() -> None:
    """An older deployment ignores startDate/endDate: every window would page the whole history."""
    transport = httpx.MockTransport(lambda request: _page([{"id": "old", "createdAt": 1577836800}], None))
    with _v2(transport) as client, pytest.raises(PagingError, match=r"outside the window.*ignore startDate"):
        list(client.iter_pages("bot", date(2024, 5, 1), date(2024, 5, 2)))


def test_an_answer_without_pagination_is_not_taken_for_the_end() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"data": []}))
    with _v2(transport) as client, pytest.raises(ChatbaseUnavailable, match="'pagination'"):
        list(client.iter_pages("bot", None, None))


# ------------------------------------------------------------------------------------------------ errors
def test_an_inverted_window_is_a_usage_error() -> None:
    with _v2(_emulator(conversations=10)) as client, pytest.raises(UsageError, match="must not be after"):
        list(client.iter_pages("demo-bot", date(2024, 5, 10), date(2024, 5, 1)))


def test_a_bad_key_fails_at_once_naming_the_setting_and_the_request_id() -> None:
    emulator = _emulator(conversations=10, api_key="the-right-key")
    with _v2(emulator) as client, pytest.raises(ChatbaseRejected) as raised:
        list(client.iter_pages("demo-bot", None, None))
    message = str(raised.value)
    assert raised.value.status == 401 and emulator.requests == 1
    assert "CHATBASE_API_KEY" in message and "request id req_" in message and KEY not in message


def test_a_plan_without_api_access_names_the_api_version_setting() -> None:
    with _v2(_emulator(conversations=10, v2_plan=False)) as client, pytest.raises(ChatbaseRejected) as raised:
        list(client.iter_pages("demo-bot", None, None))
    assert raised.value.status == 403 and "CHATBASE_API_VERSION=1" in str(raised.value)


def test_an_unknown_agent_names_the_chatbot_setting() -> None:
    with _v2(_emulator(conversations=10)) as client, pytest.raises(ChatbaseRejected) as raised:
        list(client.iter_pages("ghost", None, None))
    assert raised.value.status == 404
    assert "CHATBASE_CHATBOT_ID" in str(raised.value) and "'ghost'" in str(raised.value)


def test_429_500_and_503_are_retried_until_the_page_arrives() -> None:
    emulator = _emulator(conversations=30)
    for status in (429, 500, 503):
        emulator.fail_next(status)
    with _v2(emulator, retry_budget=timedelta(seconds=30)) as client:
        pages = list(client.iter_pages("demo-bot", None, None))
    assert sum(len(records) for records, _ in pages) == 30
    assert (client.stats.retries, client.stats.throttled, emulator.faulted) == (3, 1, 3)


@pytest.mark.parametrize(
    ("retry_after", "unit"),
    [(True, "ms"), (False, "ms"), (False, "s")],
    ids=["retry-after", "reset-in-ms", "reset-in-s"],
)
def test_a_429_waits_as_long_as_the_server_says(retry_after: bool, unit: str) -> None:
    """Retry-After first, else X-RateLimit-Reset in either unit; the backoff here would be 0.05 s at most."""
    emulator = _emulator(conversations=5, faults=Faults(retry_after=2), reset_unit=unit)
    emulator.fail_next(429, retry_after=retry_after)
    with _v2(emulator) as client:
        assert len(client.export_page("demo-bot").records) == 5
    assert client.stats.retries == 1
    assert 1.5 <= client.stats.waited <= 3.0


def test_an_outage_that_outlasts_the_budget_reports_the_last_request_id() -> None:
    emulator = _emulator(conversations=5)
    emulator.fail_next(503, count=1000)
    with (
        _v2(emulator, retry_budget=timedelta(seconds=1)) as client,
        pytest.raises(
            ChatbaseUnavailable, match=r"kept failing.*SERVICE|kept failing.*maintenance"
        ) as raised,
    ):
        client.export_page("demo-bot")
    assert "request id req_" in str(raised.value)


def test_a_client_keeping_the_limit_never_meets_a_429() -> None:
    """The emulator's sliding window (scaled down from 100 per 10 s), three windows fetched at once."""
    emulator = _emulator(conversations=36, seed=2, days=3, rate_limit=(10, 1.0))
    days = [date(2024, 5, 29), date(2024, 5, 30), date(2024, 5, 31)]
    counts: list[int] = []
    with _v2(emulator, rate_limit=(10, 1.0)) as client:

        def fetch(day: date) -> None:
            counts.append(sum(len(p) for p, _ in client.iter_pages("demo-bot", day, day, size=1)))

        threads = [threading.Thread(target=fetch, args=(day,)) for day in days]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sum(counts) == 36 and client.stats.requests >= 36
    assert emulator.throttled == 0 and client.stats.throttled == 0


# --------------------------------------------------------------------------------------------- first day
def test_first_day_is_found_in_fewer_requests_than_v1_bisection() -> None:
    emulator = _emulator(conversations=300, seed=3, days=45)
    today = END.date()
    with _v2(emulator) as v2, _v1(emulator) as v1:
        first_v2 = v2.find_first_day("demo-bot", today)
        first_v1 = v1.find_first_day("demo-bot", today)
    oldest = min(_day(r) for r in emulator.all_export_records("demo-bot"))
    assert first_v2 == first_v1 == oldest
    assert v2.stats.requests < v1.stats.requests


def test_first_day_is_none_without_conversations_of_those_sources() -> None:
    emulator = _emulator(conversations=50, seed=3)
    with _v2(emulator) as client:
        assert client.find_first_day("demo-bot", END.date(), ("Slack",)) is None
        assert client.find_first_day("demo-bot", END.date(), ("API",)) == min(
            _day(r) for r in emulator.all_export_records("demo-bot") if r["source"] == "API"
        )


def _probe_over(days: list[date], limit: int, probes: list[date]) -> Any:
    """What the export answers for floor..day over a history of creation days, newest first."""
    ordered = sorted(days)

    def probe(day: date) -> Probe:
        probes.append(day)
        upto = [d for d in ordered if d <= day]
        page = upto[-limit:]
        return Probe(
            found=bool(upto), total=len(upto), oldest=min(page) if page else None, complete=len(upto) <= limit
        )

    return probe


@settings(max_examples=300, deadline=None)
@given(
    offsets=st.lists(st.integers(min_value=0, max_value=2500), max_size=200),
    limit=st.sampled_from([1, 20]),
)
def test_the_first_day_search_finds_the_first_day_of_any_history(offsets: list[int], limit: int) -> None:
    floor, today = date(2020, 1, 1), date(2026, 11, 5)
    days = [floor + timedelta(days=o) for o in offsets]
    probes: list[date] = []
    found = search_first_day(_probe_over(days, limit, probes), floor, today)
    assert found == (min(days) if days else None)
    assert len(probes) <= 3 * (today - floor).days.bit_length() + 2  # never creeps day by day
    assert all(floor <= p <= today for p in probes)


# ------------------------------------------------------------------------------------- v1 and v2 agree
def test_v1_and_v2_serve_the_same_conversations() -> None:
    emulator = _emulator(conversations=300, seed=11)
    with _v1(emulator) as v1, _v2(emulator) as v2:
        old = {r["id"]: r for page, _ in v1.iter_pages("demo-bot", None, None) for r in page}
        new = {
            r["id"]: record_from_export(r) for page, _ in v2.iter_pages("demo-bot", None, None) for r in page
        }
    assert set(old) == set(new) and len(old) == 300
    rule = WhatsAppRule()
    for conversation_id, v1_record in old.items():
        v2_record = new[conversation_id]
        assert parse_timestamp(v2_record["created_at"]) == parse_timestamp(v1_record["created_at"])
        v1_last = v1_record.get("last_message_at") or v1_record.get("updated_at")
        assert parse_timestamp(v2_record["updated_at"]) == parse_timestamp(v1_last)
        assert [m["content"] for m in v2_record["messages"]] == [m["content"] for m in v1_record["messages"]]
        assert [m["role"] for m in v2_record["messages"]] == [m["role"] for m in v1_record["messages"]]
        for v1_message, v2_message in zip(v1_record["messages"], v2_record["messages"], strict=True):
            stamp = v1_message.get("createdAt") or v1_message.get("created_at")
            if stamp and "createdAt" in v2_message:
                assert parse_timestamp(v2_message["createdAt"]) == parse_timestamp(stamp)
        a = normalize_conversation(v1_record, "demo-bot", rule)
        b = normalize_conversation(v2_record, "demo-bot", rule)
        for field in (
            "created_at",
            "message_count",
            "user_messages",
            "assistant_messages",
            "wa_outcome",
            "wa_extracted",
        ):
            assert a[field] == b[field], field


# --------------------------------------------------------------------------------------------- cassette
def test_an_export_page_as_the_openapi_documents_it_replays_and_maps() -> None:
    cassette_file = CASSETTES / "export_v2.yaml"
    for interaction in yaml.safe_load(cassette_file.read_text())["interactions"]:
        assert schema_errors(EXPORT_PAGE, json.loads(interaction["response"]["body"]["string"])) == []
    with replay.use_cassette(cassette_file.name) as cassette, _v2(httpx.HTTPTransport()) as client:
        pages = list(client.iter_pages("5QHA6VB-DIAbBhxwqxfdi", date(2024, 1, 1), date(2024, 1, 31)))
        assert cassette.play_count == 2
    assert [(len(records), last) for records, last in pages] == [(2, False), (1, True)]
    records = {r["id"]: record_from_export(r) for page, _ in pages for r in page}
    tools = records["a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"]
    answer = tools["messages"][1]
    assert [p["type"] for p in answer["parts"]] == ["tool-call", "tool-result", "text"]
    assert answer["content"] == "Saturday 10:30 and 15:00 are free. Which suits you?"
    assert answer["feedback"] == "positive" and answer["score"] == 0.92
    anonymous = records["0c3f9a52-7d1e-4b8a-9f60-2e5d4c3b2a19"]
    assert (anonymous["userId"], anonymous["title"], anonymous["source"]) == (None, None, None)
    rows = {
        cid: normalize_conversation(r, "5QHA6VB-DIAbBhxwqxfdi", WhatsAppRule()) for cid, r in records.items()
    }
    assert rows["a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"]["response_seconds"] == [4.0]
    assert (
        rows["0c3f9a52-7d1e-4b8a-9f60-2e5d4c3b2a19"]["created_at"].isoformat() == "2024-01-14T08:00:00+00:00"
    )


# ----------------------------------------------------------------------------------- chatbots and leads
@pytest.mark.parametrize("shape", ["list", "data"])
def test_chatbots_are_listed_from_either_shape_with_their_names(shape: str) -> None:
    emulator = _emulator(
        conversations=1,
        chatbot_ids=("a", "b"),
        chatbot_names={"a": "Harbour Dental", "b": "Kowloon Clinic"},
        chatbots_shape=shape,
    )
    with _v1(emulator) as client:
        assert client.list_chatbots() == [Chatbot("a", "Harbour Dental"), Chatbot("b", "Kowloon Clinic")]


def test_chatbot_entries_are_read_leniently() -> None:
    body = {
        "chatbots": [
            {"id": "x", "chatbotName": "Renamed field", "initial_messages": ["hi"]},
            {"id": 42},
            {"name": "no id"},
            "junk",
        ]
    }
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    with _v1(transport) as client:
        assert client.list_chatbots() == [Chatbot("x", "Renamed field"), Chatbot("42", None)]


def test_a_chatbots_answer_without_a_list_is_an_error() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"data": []}))
    with _v1(transport) as client, pytest.raises(ChatbaseUnavailable, match="list of chatbots"):
        client.list_chatbots()


def test_agents_are_listed_across_cursor_pages() -> None:
    bots = tuple(f"bot-{i:02d}" for i in range(16))
    emulator = _emulator(conversations=1, chatbot_ids=bots, chatbot_names={"bot-07": "Harbour Dental"})
    with _v2(emulator) as client:
        agents = client.list_agents(page_size=5)
    assert [a.id for a in agents] == list(bots)
    assert agents[7] == Chatbot("bot-07", "Harbour Dental")
    assert client.stats.requests == 4


@pytest.mark.parametrize("size", [7, 100])
def test_leads_are_paged_until_the_first_short_page(size: int) -> None:
    emulator = _emulator(conversations=600, seed=5, days=30)
    start, end = date(2024, 5, 10), date(2024, 5, 20)
    with _v1(emulator) as client:
        pages = list(client.iter_leads("demo-bot", start, end, size=size))
    expected = [
        lead.id
        for lead in reversed(emulator.leads("demo-bot"))
        if start.isoformat() <= lead.created_at[:10] <= end.isoformat()
    ]
    assert [row["id"] for rows, _ in pages for row in rows] == expected
    assert len(pages) == len(expected) // size + 1 and [last for _, last in pages][-1] is True


def test_a_repeated_leads_page_is_caught() -> None:
    rows = [{"id": f"lead-{i}", "phone": "91234567"} for i in range(3)]
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"collectedCustomers": rows}))
    with _v1(transport) as client, pytest.raises(PagingError, match="repeated leads page"):
        list(client.iter_leads("bot", size=3))


def test_an_agent_id_travels_as_one_path_segment() -> None:
    emulator = _emulator(conversations=5, chatbot_ids=("team a/bot",))
    with _v2(emulator) as client:
        assert len(client.export_page("team a/bot").records) == 5


def test_a_page_that_says_more_follow_without_a_cursor_stops_paging() -> None:
    """Taking it for the end would drop the rest of the window for good: the run must stop instead."""
    body = {"data": [{"id": "a", "createdAt": 1714557600}], "pagination": {"cursor": None, "hasMore": True}}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    with _v2(transport) as client, pytest.raises(PagingError, match="sent no cursor"):
        list(client.iter_pages("bot", None, None))
    with _v2(transport) as client, pytest.raises(PagingError, match="sent no cursor"):
        client.fetch_page("bot", 1, date(2024, 5, 1), date(2024, 5, 1))


@pytest.mark.parametrize("total", ["NaN", "Infinity", "-Infinity", "1e400", '"12"', "true", "null"])
def test_a_count_that_is_not_a_finite_number_is_no_count(total: str) -> None:
    text = '{"data": [], "pagination": {"cursor": null, "hasMore": false, "total": TOTAL}}'.replace(
        "TOTAL", total
    )
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=text))
    with _v2(transport) as client:
        page = client.export_page("bot", start=date(2024, 5, 1), end=date(2024, 5, 1))
    assert page.total is None and page.records == [] and not page.has_more


def test_a_few_records_dated_outside_the_window_pass_to_the_sync_which_quarantines_them() -> None:
    """One broken ``createdAt`` is that record's fault, not a sign the server ignores the window."""
    records = [{"id": f"c{i}", "createdAt": 1714557600 + i} for i in range(5)] + [
        {"id": "zero", "createdAt": 0}
    ]
    transport = httpx.MockTransport(lambda request: _page(records, None))
    with _v2(transport) as client:
        pages = list(client.iter_pages("bot", date(2024, 5, 1), date(2024, 5, 1)))
    assert [r["id"] for r in pages[0][0]] == ["c0", "c1", "c2", "c3", "c4", "zero"]


def test_first_day_probes_on_a_server_that_ignores_dates_stop_with_the_reason() -> None:
    """Every probe would see the whole history: the search must not settle on a day from it."""
    records = [{"id": f"c{i}", "createdAt": 1714557600 + i * 86400} for i in range(20)]  # May 2024
    transport = httpx.MockTransport(lambda request: _page(records, "more", total=5000))
    with _v2(transport) as client, pytest.raises(PagingError, match="ignore startDate"):
        client.find_first_day("bot", date(2024, 6, 1))
