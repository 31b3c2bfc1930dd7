"""The emulator's API v2 export and agents list, get-leads, get-chatbots and the signed lead webhook."""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from datetime import UTC, date, datetime
from typing import Any

import httpx
import phonenumbers
import pytest

from chatsync.chatbase_records import record_from_export
from chatsync.config import WhatsAppRule
from chatsync.emulator import Emulator, EmulatorTransport, Faults
from chatsync.emulator.webhooks import SIGNATURE_HEADER, leads_submit, signature
from chatsync.errors import BadRecord
from chatsync.normalize import normalize_conversation
from chatsync.timeutil import parse_timestamp
from tests.chatbase_v2_schema import ERROR_RESPONSE, EXPORT_PAGE, schema_errors

END = datetime(2024, 6, 1, tzinfo=UTC)
EXPORT = "agents/demo-bot/conversations/export"


def _http(emulator: Emulator, key: str | None = "demo-key") -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(
        transport=EmulatorTransport(emulator), base_url="https://www.chatbase.co/api/v2/", headers=headers
    )


def _export_all(http: httpx.Client, path: str = EXPORT, **params: Any) -> list[dict[str, Any]]:
    """Every record of an export query, following the cursor."""
    records: list[dict[str, Any]] = []
    cursor = None
    while True:
        body = http.get(path, params={**params, **({"cursor": cursor} if cursor else {})}).json()
        records += body["data"]
        if not body["pagination"]["hasMore"]:
            return records
        cursor = body["pagination"]["cursor"]


def _day(record: dict[str, Any]) -> date:
    return datetime.fromtimestamp(record["createdAt"], UTC).date()


# ------------------------------------------------------------------------------------------------ paging
def test_export_pages_newest_first_by_a_keyset_cursor_with_the_total() -> None:
    emulator = Emulator(conversations=50, seed=2, end=END, rate_limit=None)
    ids: list[str] = []
    pages = 0
    cursor = None
    with _http(emulator) as http:
        while True:
            body = http.get(EXPORT, params={"limit": 7, **({"cursor": cursor} if cursor else {})}).json()
            pages += 1
            assert body["pagination"]["total"] == 50
            ids += [r["id"] for r in body["data"]]
            if not body["pagination"]["hasMore"]:
                assert body["pagination"]["cursor"] is None
                break
            cursor = body["pagination"]["cursor"]
            keyset = json.loads(base64.b64decode(cursor))  # {"t": creation time, "id": last id of the page}
            assert keyset["id"] == body["data"][-1]["id"]
            assert parse_timestamp(keyset["t"]).timestamp() == pytest.approx(body["data"][-1]["createdAt"])
    assert pages == 8  # 7 × 7 + 1
    assert ids == [r["id"] for r in reversed(emulator.all_export_records("demo-bot"))]


def test_export_gives_20_a_page_by_default() -> None:
    emulator = Emulator(conversations=45, seed=2, end=END, rate_limit=None)
    with _http(emulator) as http:
        body = http.get(EXPORT).json()
    assert len(body["data"]) == 20 and body["pagination"]["hasMore"] is True


def test_export_days_are_whole_utc_days_and_date_times_are_instants() -> None:
    emulator = Emulator(conversations=300, seed=3, end=END, days=30, rate_limit=None)
    records = emulator.all_export_records("demo-bot")
    with _http(emulator) as http:
        one_day = _export_all(http, startDate="2024-05-10", endDate="2024-05-10")
        expected = [r["id"] for r in reversed(records) if _day(r) == date(2024, 5, 10)]
        assert expected and [r["id"] for r in one_day] == expected

        pick = records[100]
        instant = datetime.fromtimestamp(pick["createdAt"], UTC).isoformat(timespec="milliseconds")
        both_ends = _export_all(http, startDate=instant, endDate=instant)
        assert [r["id"] for r in both_ends] == [pick["id"]]  # both ends inclusive

        after = _export_all(http, startDate=instant.replace("+00:00", "Z"))
        assert [r["id"] for r in after] == [r["id"] for r in reversed(records[100:])]


def test_export_filters_by_source_and_conversation_and_drops_messages_for_a_summary() -> None:
    emulator = Emulator(conversations=200, seed=4, end=END, rate_limit=None)
    records = emulator.all_export_records("demo-bot")
    with _http(emulator) as http:
        chosen = _export_all(http, source="WhatsApp,API", limit=20)
        assert [r["id"] for r in chosen] == [
            r["id"] for r in reversed(records) if r["source"] in ("WhatsApp", "API")
        ]
        first = http.get(EXPORT, params={"source": "WhatsApp,API"}).json()
        assert first["pagination"]["total"] == len(chosen)

        unspecified = _export_all(http, source="Unspecified")
        assert unspecified and {r["source"] for r in unspecified} == {None}

        one = http.get(EXPORT, params={"conversationId": records[17]["id"]}).json()
        assert one["data"] == [records[17]] and one["pagination"]["total"] == 1
        foreign = http.get(EXPORT, params={"conversationId": "00000000-0000-0000-0000-000000000011"}).json()
        assert foreign["data"] == [] and foreign["pagination"]["total"] == 0

        summary = http.get(EXPORT, params={"include": "summary"}).json()["data"]
        full = http.get(EXPORT).json()["data"]
    assert all("messages" not in r for r in summary)
    assert summary == [{k: v for k, v in r.items() if k != "messages"} for r in full]


@pytest.mark.parametrize(
    ("params", "code", "field"),
    [
        ({"startDate": "2024-05-10", "endDate": "2024-05-01"}, "VALIDATION_INVALID_DATE_RANGE", "startDate"),
        ({"limit": "21"}, "VALIDATION_INVALID_BODY", "limit"),
        ({"limit": "0"}, "VALIDATION_INVALID_BODY", "limit"),
        ({"include": "everything"}, "VALIDATION_INVALID_BODY", "include"),
        ({"startDate": "2024-5-1"}, "VALIDATION_INVALID_BODY", "startDate"),
        ({"cursor": "not-a-cursor"}, "VALIDATION_INVALID_BODY", "cursor"),
        (
            {"cursor": base64.b64encode(b'{"t": "x", "id": "y"}').decode()},
            "VALIDATION_INVALID_BODY",
            "cursor",
        ),
    ],
    ids=["inverted", "limit-21", "limit-0", "include", "bad-date", "garbage-cursor", "foreign-cursor"],
)
def test_bad_export_parameters_are_400_naming_the_field(
    params: dict[str, str], code: str, field: str
) -> None:
    emulator = Emulator(conversations=30, end=END, rate_limit=None)
    with _http(emulator) as http:
        answer = http.get(EXPORT, params=params)
    assert answer.status_code == 400
    assert schema_errors(ERROR_RESPONSE, answer.json()) == []
    assert answer.json()["error"]["code"] == code and field in answer.json()["error"]["details"]


# ------------------------------------------------------------------------------------ shapes and truth
def test_export_pages_match_the_openapi_shapes_and_show_every_variant() -> None:
    emulator = Emulator(conversations=400, seed=6, end=END, rate_limit=None)
    with _http(emulator) as http:
        pages = []
        cursor = None
        while True:
            body = http.get(EXPORT, params={**({"cursor": cursor} if cursor else {})}).json()
            pages.append(body)
            cursor = body["pagination"]["cursor"]
            if not cursor:
                break
    for page in pages:
        assert schema_errors(EXPORT_PAGE, page) == []
    records = [r for page in pages for r in page["data"]]
    messages = [m for r in records for m in r["messages"]]
    parts = Counter(p["type"] for m in messages for p in m["parts"])
    assert parts["tool-call"] == parts["tool-result"] > 0
    assert {r["status"] for r in records} == {"ongoing", "ended", "taken_over", "paused"}
    assert {m.get("feedback") for m in messages if m["role"] == "assistant"} == {"positive", "negative", None}
    assert any(r["userId"] is None for r in records) and any(r["title"] is None for r in records)
    assert any(r["source"] is None for r in records)
    timed = sum("createdAt" in m for m in messages)
    assert 0.97 * len(messages) <= timed < len(messages)  # nearly every message has its time


def test_ground_truth_describes_what_the_export_serves() -> None:
    emulator = Emulator(conversations=300, seed=8, end=END, rate_limit=None)
    truth = emulator.export_truth("demo-bot")
    records = emulator.all_export_records("demo-bot")
    assert set(truth) == {r["id"] for r in records}
    for record in records:
        facts = truth[record["id"]]
        messages = record["messages"]
        assert (facts.status, facts.user_id, facts.source) == (
            record["status"],
            record["userId"],
            record["source"],
        )
        assert (facts.created_at, facts.updated_at) == (record["createdAt"], record["updatedAt"])
        assert facts.roles == tuple(m["role"] for m in messages)
        assert facts.message_times == tuple(m.get("createdAt") for m in messages)
        assert facts.feedback == tuple(m.get("feedback") for m in messages)
        assert facts.positive == sum(m.get("feedback") == "positive" for m in messages)
        assert facts.tool_calls == sum(any(p["type"] == "tool-call" for p in m["parts"]) for m in messages)
        texts = tuple("\n".join(p["text"] for p in m["parts"] if p["type"] == "text") for m in messages)
        assert facts.texts == texts


def test_whatsapp_senders_carry_their_number_spelt_both_ways_and_from_any_country() -> None:
    emulator = Emulator(conversations=600, seed=9, end=END, rate_limit=None)
    truth = emulator.export_truth("demo-bot").values()
    senders = [t for t in truth if t.channel_number]
    assert senders and all(t.source == "WhatsApp" for t in senders)
    for facts in senders:
        assert facts.user_id is not None and facts.user_id.lstrip("+") == facts.channel_number.lstrip("+")
        assert phonenumbers.is_valid_number(phonenumbers.parse(facts.channel_number))
    assert any(t.user_id.startswith("+") for t in senders if t.user_id)
    assert any(t.user_id.isdigit() for t in senders if t.user_id)
    regions = {phonenumbers.region_code_for_number(phonenumbers.parse(t.channel_number)) for t in senders}
    assert "HK" in regions and regions - {"HK", "MO", "SG"}
    # WhatsApp without the number, and phone-shaped ids elsewhere that are not WhatsApp senders
    assert any(t.source == "WhatsApp" and not t.channel_number for t in truth)
    assert any(t.source != "WhatsApp" and t.user_id and t.user_id.isdigit() for t in truth)


def test_v1_customer_carries_the_sender_number_only_when_asked() -> None:
    plain = Emulator(conversations=300, seed=9, end=END, rate_limit=None)
    channel = Emulator(conversations=300, seed=9, end=END, rate_limit=None, channel_customer=True)
    assert plain.channel_numbers("demo-bot", api="v1") == {}
    numbers = channel.channel_numbers("demo-bot", api="v1")
    assert numbers == plain.channel_numbers("demo-bot", api="v2") != {}
    truth = plain.export_truth("demo-bot")
    for before, after in zip(
        plain.all_conversations("demo-bot"), channel.all_conversations("demo-bot"), strict=True
    ):
        if before["id"] in numbers:
            assert after["customer"] == truth[before["id"]].user_id
            assert {k: v for k, v in after.items() if k != "customer"} == {
                k: v for k, v in before.items() if k != "customer"
            }
        else:
            assert after == before


def test_a_grown_conversation_grows_in_the_export_too() -> None:
    emulator = Emulator(conversations=20, seed=1, end=END, rate_limit=None)
    conversation_id = emulator.datasets["demo-bot"].conversation_id(19)
    emulator.append_messages(
        conversation_id,
        [{"role": "user", "content": "one more thing", "createdAt": "2024-06-01T00:30:00.250Z"}],
    )
    with _http(emulator) as http:
        record = http.get(EXPORT, params={"conversationId": conversation_id}).json()["data"][0]
    assert record["messages"][-1]["parts"] == [{"type": "text", "text": "one more thing"}]
    assert record["messages"][-1]["createdAt"] == record["updatedAt"] == 1717201800.25


def test_broken_records_come_broken_in_the_export_too() -> None:
    emulator = Emulator(conversations=100, seed=1, end=END, rate_limit=None, bad_records=5)
    bad = set(emulator.bad_indexes("demo-bot"))
    for index, record in enumerate(emulator.all_export_records("demo-bot")):
        if index in bad:
            with pytest.raises(BadRecord):
                normalize_conversation(record_from_export(record), "demo-bot", WhatsAppRule())
        else:
            normalize_conversation(record_from_export(record), "demo-bot", WhatsAppRule())
    assert len(emulator.export_truth("demo-bot")) == 95


# --------------------------------------------------------------------------------- errors and headers
def test_every_v2_answer_carries_a_request_id_and_the_rate_limit_window() -> None:
    emulator = Emulator(conversations=10, end=END, rate_limit=(3, 60.0))
    with _http(emulator) as http:
        answers = [http.get(EXPORT) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0"]
    assert {a.headers["x-ratelimit-limit"] for a in answers} == {"3"}
    assert len({a.headers["x-request-id"] for a in answers}) == 4
    limited = answers[-1]
    assert limited.json()["error"]["code"] == "RATE_LIMIT_TOO_MANY_REQUESTS"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    reset = int(limited.headers["x-ratelimit-reset"]) / 1000  # epoch milliseconds by default
    assert time.time() < reset <= time.time() + 61


def test_the_reset_header_can_be_epoch_seconds() -> None:
    emulator = Emulator(conversations=10, end=END, rate_limit=(3, 60.0), reset_unit="s")
    with _http(emulator) as http:
        reset = int(http.get(EXPORT).headers["x-ratelimit-reset"])
    assert time.time() < reset <= time.time() + 61


@pytest.mark.parametrize(
    ("setup", "status", "code"),
    [
        ({"key": None}, 401, "AUTH_MISSING_API_KEY"),
        ({"key": "wrong"}, 401, "AUTH_INVALID_API_KEY"),
        ({"v2_plan": False}, 403, "SUBSCRIPTION_API_RESTRICTED_PLAN"),
        ({"path": "agents/ghost/conversations/export"}, 404, "AGENT_NOT_FOUND"),
        ({"fail": 500}, 500, "INTERNAL_SERVER_ERROR"),
        ({"fail": 503}, 503, "SERVICE_UNDER_MAINTENANCE"),
        ({"fail": 429}, 429, "RATE_LIMIT_TOO_MANY_REQUESTS"),
    ],
    ids=["no-key", "wrong-key", "plan", "agent", "500", "503", "429"],
)
def test_v2_errors_come_in_the_openapi_envelope(setup: dict[str, Any], status: int, code: str) -> None:
    emulator = Emulator(conversations=10, end=END, rate_limit=None, v2_plan=setup.get("v2_plan", True))
    if "fail" in setup:
        emulator.fail_next(setup["fail"])
    with _http(emulator, setup.get("key", "demo-key")) as http:
        answer = http.get(setup.get("path", EXPORT))
    assert answer.status_code == status
    assert schema_errors(ERROR_RESPONSE, answer.json()) == []
    assert answer.json()["error"]["code"] == code
    assert answer.headers["x-request-id"]


def test_random_faults_answer_in_the_v2_envelope() -> None:
    emulator = Emulator(conversations=10, end=END, rate_limit=None, faults=Faults(fail_rate=1.0))
    with _http(emulator) as http:
        answers = [http.get(EXPORT) for _ in range(40)]
    statuses = Counter(a.status_code for a in answers)
    assert set(statuses) <= {429, 500, 502, 503} and statuses[429] and statuses[500]
    for answer in answers:
        if answer.status_code != 502:  # a gateway's HTML page, as proxies send
            assert schema_errors(ERROR_RESPONSE, answer.json()) == []


def test_v2_is_served_over_loopback(emulator_factory: Any) -> None:
    server = emulator_factory(conversations=30, seed=1)
    answer = httpx.get(
        f"{server.v2_base_url}/agents/demo-bot/conversations/export",
        headers={"Authorization": "Bearer demo-key"},
    )
    assert answer.status_code == 200 and len(answer.json()["data"]) == 20


# ------------------------------------------------------------------------------------------------ agents
def test_agents_are_listed_by_cursor_with_their_names() -> None:
    bots = [f"bot-{i}" for i in range(5)]
    emulator = Emulator(
        conversations=3, end=END, rate_limit=None, chatbot_ids=bots, chatbot_names={"bot-3": "Harbour Dental"}
    )
    with _http(emulator) as http:
        agents = _export_all(http, "agents", limit=2)
        first = http.get("agents", params={"limit": 2}).json()
    assert [a["id"] for a in agents] == bots
    assert agents[3]["name"] == "Harbour Dental" and agents[0]["name"] == "bot-0"
    assert first["pagination"] == {"cursor": first["pagination"]["cursor"], "hasMore": True, "total": 5}


# ------------------------------------------------------------------------------------------- v1 extras
def _v1(emulator: Emulator) -> httpx.Client:
    return httpx.Client(
        transport=EmulatorTransport(emulator),
        base_url="https://www.chatbase.co/api/v1/",
        headers={"Authorization": "Bearer demo-key"},
    )


def test_get_leads_pages_newest_first_with_no_paging_metadata() -> None:
    emulator = Emulator(conversations=400, seed=5, end=END, rate_limit=None)
    leads = emulator.leads("demo-bot")
    with _v1(emulator) as http:
        first = http.get("get-leads", params={"chatbotId": "demo-bot", "size": 7}).json()
        second = http.get("get-leads", params={"chatbotId": "demo-bot", "size": 7, "page": 2}).json()
        window = http.get(
            "get-leads",
            params={"chatbotId": "demo-bot", "startDate": "2024-05-10", "endDate": "2024-05-12", "size": 100},
        ).json()
        default = http.get("get-leads", params={"chatbotId": "demo-bot"}).json()
        statuses = [
            http.get("get-leads", params=params).status_code
            for params in ({}, {"chatbotId": "ghost"}, {"chatbotId": "demo-bot", "startDate": "2024-5-1"})
        ]
    assert set(first) == {"collectedCustomers"}
    newest = [lead.id for lead in reversed(leads)]
    assert [row["id"] for row in first["collectedCustomers"] + second["collectedCustomers"]] == newest[:14]
    assert len(default["collectedCustomers"]) == 10
    in_window = [lead.id for lead in reversed(leads) if "2024-05-10" <= lead.created_at[:10] <= "2024-05-12"]
    assert in_window and [row["id"] for row in window["collectedCustomers"]] == in_window
    row = first["collectedCustomers"][0]
    assert set(row) == {"id", "name", "email", "phone", "created_at", "chatbot_id", "account_id"}
    assert statuses == [400, 404, 400]


def test_some_leads_repeat_the_number_their_conversation_gave() -> None:
    emulator = Emulator(conversations=400, seed=5, end=END, rate_limit=None)
    planted = emulator.planted("demo-bot")
    leads = emulator.leads("demo-bot")
    matching = [lead for lead in leads if lead.matches_conversation]
    assert matching and len(matching) < len(leads)
    for lead in matching:
        assert planted[lead.conversation_id].number == lead.number
    assert any(lead.number is None for lead in leads)  # forms sent without a usable phone
    typed = [lead.phone for lead in leads if lead.number]
    assert any(p.startswith("+") for p in typed) and any(p.isdigit() for p in typed)
    local = [lead for lead in leads if lead.number and " " in lead.phone]
    assert local and all(lead.number == "+852" + lead.phone.replace(" ", "") for lead in local)


@pytest.mark.parametrize("shape", ["list", "data"])
def test_get_chatbots_answers_in_either_shape_seen_live(shape: str) -> None:
    emulator = Emulator(
        conversations=1,
        end=END,
        rate_limit=None,
        chatbot_ids=("a", "b"),
        chatbots_shape=shape,  # type: ignore[arg-type]
    )
    with _v1(emulator) as http:
        body = http.get("get-chatbots").json()
    listed = body["chatbots"] if shape == "list" else body["chatbots"]["data"]
    assert [c["id"] for c in listed] == ["a", "b"]


# ----------------------------------------------------------------------------------------------- webhook
def test_the_webhook_signature_is_hex_hmac_sha1_of_the_raw_body() -> None:
    # the well-known HMAC-SHA1 example: key "key", the quick brown fox
    assert (
        signature(b"The quick brown fox jumps over the lazy dog", "key")
        == "de7c9b85b8b78aa6bc8a7a36f70a90701c9db4d9"
    )


def test_a_leads_submit_delivery_is_signed_with_the_given_secret() -> None:
    emulator = Emulator(conversations=100, seed=5, end=END, rate_limit=None)
    lead = emulator.leads("demo-bot")[0]
    body, headers = leads_submit(lead, "whsec-test")
    event = json.loads(body)
    assert event == {
        "eventType": "leads.submit",
        "chatbotId": "demo-bot",
        "payload": {
            "conversationId": lead.conversation_id,
            "customerEmail": lead.email,
            "customerName": lead.name,
            "customerPhone": lead.phone,
        },
    }
    assert headers[SIGNATURE_HEADER] == signature(body, "whsec-test") != signature(body, "other-secret")
    assert (
        signature(body.replace(b"leads.submit", b"leads.submiT"), "whsec-test") != headers[SIGNATURE_HEADER]
    )
