"""Numbers from lead forms and from the WhatsApp sender, and the precedence of every source.

Leads arrive through the real API (`POST /api/webhooks/chatbase`) signed by the emulator's
`leads_submit`; conversations come from the emulator through the sync engine or, for hand-built cases,
through the sync's own write path. Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from chatsync.chatbase import ChatbaseClient
from chatsync.chatbase_records import record_from_export
from chatsync.config import Secret, WhatsAppRule
from chatsync.emulator import Emulator, EmulatorTransport, Lead
from chatsync.emulator.webhooks import SIGNATURE_HEADER, leads_submit, signature
from chatsync.normalize import normalize_conversation
from chatsync.reextract import reextract
from chatsync.store import writes
from chatsync.store.queries import set_whatsapp
from chatsync.store.tables import conversations, leads, whatsapp_audit
from chatsync.sync import Syncer, SyncRequest
from chatsync.web.app import create_app
from chatsync.whatsapp import NUMBER_SOURCES, channel_number
from tests.api_helpers import api_settings
from tests.conftest import chatbase_env

SECRET = "cb_whsec_test_0123456789"
PROMPT = "May I have your WhatsApp number?"
BOT = "demo-bot"


def _api(engine: Any, secret: str | None = SECRET) -> TestClient:
    settings = api_settings(engine, chatbase_webhook_secret=Secret(secret) if secret else None)
    return TestClient(create_app(engine, settings))


def _deliver(api: TestClient, lead: Lead, secret: str = SECRET) -> Any:
    body, headers = leads_submit(lead, secret)
    return api.post("/api/webhooks/chatbase", content=body, headers=headers)


def _lead(conversation_id: str, phone: str, number: str | None, **changes: Any) -> Lead:
    lead = Lead(
        id=f"lead-{conversation_id}-{phone}",
        chatbot_id=BOT,
        conversation_id=conversation_id,
        name="Mei Ling",
        email="mei@example.com",
        phone=phone,
        created_at="2024-05-01T08:05:00Z",
        number=number,
        matches_conversation=False,
    )
    return replace(lead, **changes)


def _sync(engine: Any, emulator: Emulator) -> None:
    with ChatbaseClient(
        Secret("demo-key"), "http://emulator/api/v1", transport=EmulatorTransport(emulator)
    ) as client:
        Syncer(engine, client, WhatsAppRule()).run(SyncRequest((BOT,)))


def _numbers(engine: Any) -> dict[str, tuple[str | None, str | None]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(conversations.c.id, conversations.c.whatsapp_number, conversations.c.whatsapp_source)
        ).all()
    return {r.id: (r.whatsapp_number, r.whatsapp_source) for r in rows}


def _audit(engine: Any) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [
            dict(r)
            for r in connection.execute(select(whatsapp_audit).order_by(whatsapp_audit.c.id)).mappings()
        ]


def _lead_count(engine: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(leads)).scalar_one())


def _store(engine: Any, raws: list[dict[str, Any]], rule: WhatsAppRule | None = None) -> None:
    """Store conversations the way a sync page does."""
    rows = [normalize_conversation(raw, BOT, rule or WhatsAppRule()) for raw in raws]
    with engine.begin() as connection:
        writes.upsert_conversations(connection, rows, datetime.now(UTC))


def _conversation(cid: str, reply: str = "no thanks", **fields: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "chatbot_id": BOT,
        "created_at": "2024-05-01T08:00:00Z",
        "source": "Widget or Iframe",
        "messages": [{"role": "assistant", "content": PROMPT}, {"role": "user", "content": reply}],
        **fields,
    }


# ------------------------------------------------------------------------------------------------ webhook
def test_a_signed_lead_is_stored_and_its_phone_becomes_the_number_when_nothing_stronger_is_there(
    engine: Any,
) -> None:
    _store(engine, [_conversation("c1"), _conversation("c2", form_submission={"phone": "6598765432"})])
    api = _api(engine)
    first = _deliver(api, _lead("c1", "9123 4567", "+85291234567"))
    second = _deliver(api, _lead("c2", "85290307208", "+85290307208"))
    assert first.json() == second.json() == {"result": "applied"}
    assert _numbers(engine) == {"c1": ("+85291234567", "lead"), "c2": ("+85290307208", "lead")}
    with engine.connect() as connection:
        stored = connection.execute(select(leads).order_by(leads.c.id)).mappings().all()
    assert [(r["conversation_id"], r["phone"], r["number"]) for r in stored] == [
        ("c1", "9123 4567", "+85291234567"),
        ("c2", "85290307208", "+85290307208"),
    ]
    assert stored[0]["raw"]["webhook"]["payload"]["customerName"] == "Mei Ling"
    assert [
        (a["conversation_id"], a["by"], a["old"], a["old_source"], a["new"], a["new_source"])
        for a in _audit(engine)
    ] == [
        ("c1", "chatbase lead webhook", None, None, "+85291234567", "lead"),
        ("c2", "chatbase lead webhook", "+6598765432", "form", "+85290307208", "lead"),
    ]


def test_a_lead_never_overwrites_a_manual_chat_or_sender_number(engine: Any) -> None:
    _store(
        engine,
        [
            _conversation("manual"),
            _conversation("cleared"),
            _conversation("chat", reply="9123 4567"),
            _conversation("sender", source="WhatsApp", customer="447700900123"),
        ],
    )
    now = datetime.now(UTC)
    with engine.begin() as connection:
        set_whatsapp(connection, "manual", number="+85261234567", auto=False, by="staff", now=now)
        set_whatsapp(connection, "cleared", number=None, auto=False, by="staff", now=now)
    before = _numbers(engine)
    audit_before = _audit(engine)
    api = _api(engine)
    for cid in ("manual", "cleared", "chat", "sender"):
        assert _deliver(api, _lead(cid, "+65 8123 4567", "+6581234567")).json() == {"result": "applied"}
    assert (
        _numbers(engine)
        == before
        == {
            "manual": ("+85261234567", "manual"),
            "cleared": (None, "manual"),
            "chat": ("+85291234567", "extracted"),
            "sender": ("+447700900123", "channel"),
        }
    )
    assert _audit(engine) == audit_before  # nothing changed, nothing audited
    # The lead is kept with each conversation: handing one back to the rule shows it.
    with engine.begin() as connection:
        change = set_whatsapp(connection, "cleared", number=None, auto=True, by="staff", now=now)
    assert (change.new, change.new_source) == ("+6581234567", "lead")


BAD = [
    "tampered body",
    "missing header",
    "wrong secret",
    "not configured",
    "not JSON",
    "no chatbotId",
    "payload not an object",
    "name not a string",
    "NaN",
    "Infinity",
    "number beyond a float",
    "conversationId with NUL",
    "chatbotId with a C1 control",
    "a key twice",
    "byte order mark",
    "UTF-16",
]


@pytest.mark.parametrize("problem", BAD)
def test_a_bad_lead_delivery_is_400_and_stores_nothing(engine: Any, problem: str) -> None:
    _store(engine, [_conversation("c1")])
    api = _api(engine, secret=None if problem == "not configured" else SECRET)
    body, headers = leads_submit(_lead("c1", "9123 4567", "+85291234567"), SECRET)
    if problem == "tampered body":
        body = body.replace(b"9123 4567", b"6123 4567")
    elif problem == "missing header":
        headers.pop(SIGNATURE_HEADER)
    elif problem == "wrong secret":
        body, headers = leads_submit(_lead("c1", "9123 4567", "+85291234567"), "not-the-secret")
    elif problem in ("not JSON", "no chatbotId", "payload not an object", "name not a string"):
        event = json.loads(body)
        if problem == "no chatbotId":
            event.pop("chatbotId")
        elif problem == "payload not an object":
            event["payload"] = "c1"
        elif problem == "name not a string":
            event["payload"]["customerName"] = 42
        body = b"{not json" if problem == "not JSON" else json.dumps(event).encode()
    elif problem in ("NaN", "Infinity", "number beyond a float"):  # JSON as JavaScript never writes it
        value = {"NaN": "NaN", "Infinity": "-Infinity", "number beyond a float": "1e400"}[problem]
        body = body.replace(b'"eventType"', b'"score": ' + value.encode() + b', "eventType"')
        headers[SIGNATURE_HEADER] = signature(body, SECRET)
    elif problem in ("conversationId with NUL", "chatbotId with a C1 control"):
        event = json.loads(body)
        if problem == "conversationId with NUL":
            event["payload"]["conversationId"] = "c1\u0000"
        else:
            event["chatbotId"] = BOT + "\u009b"
        body = json.dumps(event).encode()
        headers[SIGNATURE_HEADER] = signature(body, SECRET)
    elif problem in ("a key twice", "byte order mark", "UTF-16"):  # JSON two readers could read apart
        if problem == "a key twice":
            body = body.replace(b'"eventType"', b'"chatbotId": "other-bot", "eventType"')
        else:
            body = (
                ("\ufeff" + body.decode()).encode()
                if problem == "byte order mark"
                else body.decode().encode("utf-16")
            )
        headers[SIGNATURE_HEADER] = signature(body, SECRET)
        headers[SIGNATURE_HEADER] = signature(body, SECRET)  # signed, but not a lead
    response = api.post("/api/webhooks/chatbase", content=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] in (
        "invalid_signature",
        "invalid_payload",
        "webhook_not_configured",
    )
    assert "9123" not in response.text and SECRET not in response.text
    assert _lead_count(engine) == 0
    assert _numbers(engine) == {"c1": (None, None)} and _audit(engine) == []


def test_a_lead_with_text_no_database_holds_is_stored_with_replacement_characters(engine: Any) -> None:
    """A NUL, or half an emoji as JavaScript cuts it, in a name or email is repaired as in a conversation."""
    _store(engine, [_conversation("c1")])
    api = _api(engine)
    body, _ = leads_submit(_lead("c1", "9123 4567", "+85291234567"), SECRET)
    text = (
        body.decode()
        .replace('"Mei Ling"', '"Mei\\u0000Ling"')
        .replace("mei@example.com", "mei\\ud83d@example.com")
    )
    body = text.encode()
    response = api.post(
        "/api/webhooks/chatbase", content=body, headers={SIGNATURE_HEADER: signature(body, SECRET)}
    )
    assert response.status_code == 200 and response.json() == {"result": "applied"}
    with engine.connect() as connection:
        name, email, raw = connection.execute(select(leads.c.name, leads.c.email, leads.c.raw)).one()
    assert (name, email) == ("Mei\ufffdLing", "mei\ufffd@example.com")
    assert raw["webhook"]["payload"]["customerName"] == "Mei\ufffdLing"
    assert _numbers(engine)["c1"] == ("+85291234567", "lead")
    again = api.post(
        "/api/webhooks/chatbase", content=body, headers={SIGNATURE_HEADER: signature(body, SECRET)}
    )
    assert again.json() == {"result": "duplicate"}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("endpoint", ["/api/webhooks/chatbase", "/api/webhooks/clerk"])
def test_a_webhook_body_over_a_megabyte_is_refused_before_it_is_read_whole(
    engine: Any, endpoint: str, chunked: bool
) -> None:
    api = _api(engine)

    def chunks() -> Any:  # 4 MB in 64 kB chunks, with no Content-Length to go by
        for _ in range(64):
            yield b" " * 65536

    content: Any = chunks() if chunked else b" " * 2_000_000
    response = api.post(endpoint, content=content, headers={SIGNATURE_HEADER: "0" * 40})
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert _lead_count(engine) == 0


def test_a_database_error_names_the_statement_never_the_values(engine: Any) -> None:
    """What a refused write would log (and a 500 would report) never carries a lead's name or phone."""
    from sqlalchemy.exc import DBAPIError

    with pytest.raises(DBAPIError) as caught, engine.begin() as connection:
        connection.execute(leads.insert().values(chatbot_id=None, name="Mei Ling", phone="+85291234567"))
    assert "Mei Ling" not in str(caught.value) and "91234567" not in str(caught.value)
    assert "INSERT INTO leads" in str(caught.value)


def test_a_signature_in_capitals_still_verifies_and_other_events_are_ignored(engine: Any) -> None:
    _store(engine, [_conversation("c1")])
    api = _api(engine)
    body, headers = leads_submit(_lead("c1", "9123 4567", "+85291234567"), SECRET)
    headers[SIGNATURE_HEADER] = headers[SIGNATURE_HEADER].upper()
    assert api.post("/api/webhooks/chatbase", content=body, headers=headers).json() == {"result": "applied"}
    other = json.dumps({"eventType": "leads.deleted", "chatbotId": BOT, "payload": {}}).encode()
    ignored = api.post(
        "/api/webhooks/chatbase", content=other, headers={SIGNATURE_HEADER: signature(other, SECRET)}
    )
    assert ignored.json() == {"result": "ignored: leads.deleted"}
    assert _lead_count(engine) == 1


def test_a_redelivered_lead_changes_nothing(engine: Any) -> None:
    _store(engine, [_conversation("c1")])
    api = _api(engine)
    lead = _lead("c1", "9123 4567", "+85291234567")
    assert _deliver(api, lead).json() == {"result": "applied"}
    stored = _numbers(engine), _audit(engine), _lead_count(engine)
    assert _deliver(api, lead).json() == {"result": "duplicate"}
    # The same event written with other spacing and key order is the same delivery.
    body, _ = leads_submit(lead, SECRET)
    respelt = json.dumps(json.loads(body), indent=2, sort_keys=True).encode()
    again = api.post(
        "/api/webhooks/chatbase", content=respelt, headers={SIGNATURE_HEADER: signature(respelt, SECRET)}
    )
    assert again.json() == {"result": "duplicate"}
    assert (_numbers(engine), _audit(engine), _lead_count(engine)) == stored
    assert stored[2] == 1


def test_a_later_lead_of_the_same_conversation_replaces_the_earlier_ones_number(engine: Any) -> None:
    _store(engine, [_conversation("c1")])
    api = _api(engine)
    _deliver(api, _lead("c1", "9123 4567", "+85291234567"))
    assert _deliver(api, _lead("c1", "n/a", None)).json() == {"result": "stored"}  # no usable phone
    assert _numbers(engine)["c1"] == ("+85291234567", "lead")
    _deliver(api, _lead("c1", "+65 8123 4567", "+6581234567"))
    assert _numbers(engine)["c1"] == ("+6581234567", "lead")
    assert _lead_count(engine) == 3


def test_leads_that_arrive_before_their_conversations_are_applied_when_they_sync(engine: Any) -> None:
    """Every lead of the emulator is delivered first; the sync then stores each conversation with the
    number precedence gives, computed here from the emulator's ground truth."""
    emulator = Emulator(conversations=400, seed=23, days=10, rate_limit=None)
    api = _api(engine)
    delivered = emulator.leads(BOT)
    results = [_deliver(api, lead).json()["result"] for lead in delivered]
    assert results == ["pending" if lead.number else "stored" for lead in delivered]
    _sync(engine, emulator)

    planted = emulator.planted(BOT)
    lead_numbers = {lead.conversation_id: lead.number for lead in delivered if lead.number}
    stored = _numbers(engine)
    expected = {}
    for cid, truth in planted.items():
        if truth.source == "extracted":
            expected[cid] = (truth.number, "extracted")
        elif cid in lead_numbers:
            expected[cid] = (lead_numbers[cid], "lead")
        else:
            expected[cid] = (truth.number, truth.source)
    assert stored == expected
    taken = {cid for cid, (_, source) in stored.items() if source == "lead"}
    assert taken and taken < set(lead_numbers)  # some leads lost to a chat reply
    audited = {(a["conversation_id"], a["by"], a["new_source"]) for a in _audit(engine)}
    assert audited == {(cid, "chatsync sync", "lead") for cid in taken}
    # A second sync, and the same leads again, change nothing.
    _sync(engine, emulator)
    assert {_deliver(api, lead).json()["result"] for lead in delivered} == {"duplicate"}
    assert _numbers(engine) == stored and len(_audit(engine)) == len(taken)


def test_a_lead_arriving_while_its_conversation_is_being_stored_is_applied(engine: Any) -> None:
    """The sync page holds the conversation uncommitted while the lead arrives: one waits for the other, so
    neither misses the other (on PostgreSQL each would otherwise read before the other commits)."""
    row = normalize_conversation(_conversation("c1"), BOT, WhatsAppRule())
    api = _api(engine)
    answers: list[Any] = []
    deliver = threading.Thread(
        target=lambda: answers.append(_deliver(api, _lead("c1", "9123 4567", "+85291234567")))
    )
    with engine.begin() as connection:
        writes.upsert_conversations(connection, [row], datetime.now(UTC))
        deliver.start()
        deliver.join(timeout=1.0)  # the delivery is now waiting for this page (or, rarely, not yet begun)
    deliver.join(timeout=60)
    assert not deliver.is_alive()
    assert answers[0].json() == {"result": "applied"}
    assert _numbers(engine) == {"c1": ("+85291234567", "lead")}


# -------------------------------------------------------------------------------------- the sender's number
@pytest.mark.parametrize(
    ("value", "number"),
    [
        ("85291234567", "+85291234567"),
        ("+6581234567", "+6581234567"),
        ("447700900123", "+447700900123"),
        ("+447700900123", "+447700900123"),
        ("14155550123", "+14155550123"),
        (" 85291234567 ", "+85291234567"),
        ("91234567", None),  # a Hong Kong number without country code, not +91 2345 67
        ("85212345", None),  # 8 digits without "+": local or "+852 12345", nobody can tell
        ("0085291234567", None),
        ("+852 9123 4567", None),
        ("852-9123-4567", None),
        ("whatsapp:+85291234567", None),
        ("+85", None),
        ("+999123456789", None),  # no such country code
        ("+6512345", None),  # impossible length for Singapore
        ("٨٥٢٩١٢٣٤٥٦٧", None),  # digits, but not ASCII: not a sender id
        ("cust_401454", None),
        ("mei@example.com", None),
        ("", None),
    ],
)
def test_sender_ids_count_only_when_shaped_like_an_international_number(
    value: str, number: str | None
) -> None:
    assert channel_number(value) == number


def test_v1_whatsapp_conversations_store_the_senders_number_from_customer(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    server = emulator_factory(conversations=500, seed=29, days=10, channel_customer=True)
    assert cli("sync", "--json", env=chatbase_env(server, database_url)).exit_code == 0
    emulator = server.emulator
    senders = emulator.channel_numbers(BOT, api="v1")
    planted = emulator.planted(BOT)
    sources = {raw["id"]: raw.get("source") for raw in emulator.all_conversations(BOT)}
    from chatsync.store.engine import open_engine

    engine = open_engine(database_url)
    with engine.connect() as connection:
        stored = {
            r.id: (r.wa_channel, r.wa_form, r.whatsapp_number, r.whatsapp_source)
            for r in connection.execute(
                select(
                    conversations.c.id,
                    conversations.c.wa_channel,
                    conversations.c.wa_form,
                    conversations.c.whatsapp_number,
                    conversations.c.whatsapp_source,
                )
            )
        }
    engine.dispose()
    assert {cid: s[0] for cid, s in stored.items() if s[0]} == senders
    assert senders and all(sources[cid] == "WhatsApp" for cid in senders)
    for cid, (_, form, number, source) in stored.items():
        truth = planted[cid]
        if truth.source == "extracted":
            assert (number, source) == (truth.number, "extracted")
        elif cid in senders:
            assert (number, source) == (senders[cid], "channel")
        else:
            assert (number, source) == (truth.number, truth.source)
        if form is not None:  # the form keeps its own source, on WhatsApp conversations too
            assert truth.source != "form" or source in ("form", "channel")
    beaten = [cid for cid in senders if planted[cid].source == "form"]
    assert beaten and all(stored[cid][3] == "channel" and stored[cid][1] for cid in beaten)


def test_v2_user_id_gives_whatsapp_conversations_the_senders_number(engine: Any) -> None:
    emulator = Emulator(conversations=400, seed=9, days=10, rate_limit=None)
    dataset = emulator.datasets[BOT]
    records = [record_from_export(emulator.export_record(BOT, i)) for i in range(dataset.count)]
    _store(engine, records)
    truth = emulator.export_truth(BOT)
    with engine.connect() as connection:
        found = dict(connection.execute(select(conversations.c.id, conversations.c.wa_channel)).all())
    assert {cid: n for cid, n in found.items() if n} == emulator.channel_numbers(BOT, api="v2") != {}
    # Phone-shaped ids of other sources are never a sender's number.
    others = [t for t in truth.values() if t.source != "WhatsApp" and t.user_id and t.user_id.isdigit()]
    assert others and all(found[t.id] is None for t in others)
    numbers = _numbers(engine)
    assert any(source == "channel" for _, source in numbers.values())
    assert all(numbers[t.id][1] != "channel" for t in others)


def test_other_sources_never_get_a_senders_number_and_the_form_keeps_its_source(engine: Any) -> None:
    _store(
        engine,
        [
            _conversation("widget", customer="85291234567"),
            _conversation("api", source="API", userId="+6581234567"),
            _conversation("none", source=None, customer="85291234567"),
            _conversation(
                "form", source="WhatsApp", customer="cust_1", form_submission={"phone": "6581234567"}
            ),
            _conversation("both", source="whatsapp", customer="85291234567", userId="+6581234567"),
        ],
    )
    assert _numbers(engine) == {
        "widget": (None, None),
        "api": (None, None),
        "none": (None, None),
        "form": ("+6581234567", "form"),
        "both": (None, None),  # two fields that disagree: nothing rather than a guess
    }


# ---------------------------------------------------------------------------------------------- precedence
SOURCE_NUMBERS = {
    "extracted": ("9123 4567", "+85291234567"),
    "channel": ("447700900123", "+447700900123"),
    "lead": ("+65 8123 4567", "+6581234567"),
    "form": ("853 6263 3568", "+85362633568"),
}
ORDER = ("extracted", "channel", "lead", "form")


def _with_sources(present: tuple[str, ...]) -> dict[str, Any]:
    cid = "p-" + ("-".join(present) or "none")
    fields: dict[str, Any] = {"source": "WhatsApp", "customer": "cust_7"}
    if "channel" in present:
        fields["customer"] = SOURCE_NUMBERS["channel"][0]
    if "form" in present:
        fields["form_submission"] = {"phone": SOURCE_NUMBERS["form"][0]}
    reply = SOURCE_NUMBERS["extracted"][0] if "extracted" in present else "later"
    return _conversation(cid, reply=reply, **fields)


def test_precedence_of_every_combination_of_sources_end_to_end(cli: Any, engine: Any) -> None:
    """Every subset of chat reply, sender, lead and form, stored by the sync's write path with leads
    through the webhook; list and show name the source; --auto and reextract keep to the same order."""
    import itertools

    combos = [c for n in range(5) for c in itertools.combinations(ORDER, n)]
    raws = [_with_sources(c) for c in combos]
    _store(engine, raws)
    api = _api(engine)
    for present, raw in zip(combos, raws, strict=True):
        if "lead" in present:
            phone, number = SOURCE_NUMBERS["lead"]
            assert _deliver(api, _lead(raw["id"], phone, number)).json() == {"result": "applied"}
    expected = {}
    for present, raw in zip(combos, raws, strict=True):
        winner = next((s for s in ORDER if s in present), None)
        expected[raw["id"]] = (SOURCE_NUMBERS[winner][1], winner) if winner else (None, None)
    assert _numbers(engine) == expected

    url = engine.url.render_as_string(hide_password=False)
    listed = json.loads(cli("--database-url", url, "list", "--all", "--format", "json").stdout)
    assert {r["id"]: (r["whatsapp_number"], r["whatsapp_source"]) for r in listed} == expected
    everything = "p-" + "-".join(ORDER)
    assert cli("--database-url", url, "set-whatsapp", everything, "6123 4567", "--by", "staff").exit_code == 0
    shown = json.loads(cli("--database-url", url, "show", everything, "--format", "json").stdout)
    assert [(a["by"], a["old_source"], a["new_source"]) for a in shown["whatsapp_audit"]] == [
        ("staff", "extracted", "manual")
    ]
    assert cli("--database-url", url, "set-whatsapp", everything, "--auto").exit_code == 0
    assert _numbers(engine)[everything] == expected[everything]
    lead_only = "p-lead-form"
    assert cli("--database-url", url, "set-whatsapp", lead_only, "--clear").exit_code == 0
    assert cli("--database-url", url, "set-whatsapp", lead_only, "--auto").exit_code == 0
    assert _numbers(engine)[lead_only] == (SOURCE_NUMBERS["lead"][1], "lead")
    counts = reextract(engine, WhatsAppRule())
    assert (counts.examined, counts.changed, counts.numbers_changed) == (len(raws), 0, 0)
    assert _numbers(engine) == expected


def test_reextract_reads_sender_ids_and_lead_phones_again(engine: Any) -> None:
    """Conversations stored before chatsync read the sender's number get it from reextract; a lead typed
    without country code follows the default region; every change is audited as reextract's."""
    _store(
        engine, [_conversation("sender", source="WhatsApp", customer="447700900123"), _conversation("lead")]
    )
    with engine.begin() as connection:  # as a database from before the sender's number was read
        connection.execute(
            conversations.update()
            .where(conversations.c.id == "sender")
            .values(wa_channel=None, whatsapp_number=None, whatsapp_source=None, whatsapp_region=None)
        )
    api = _api(engine)
    _deliver(api, _lead("lead", "9123 4567", "+85291234567"))
    assert _numbers(engine) == {"sender": (None, None), "lead": ("+85291234567", "lead")}
    counts = reextract(engine, WhatsAppRule(default_region="SG"))
    assert (counts.changed, counts.numbers_changed) == (2, 2)
    assert _numbers(engine) == {"sender": ("+447700900123", "channel"), "lead": ("+6591234567", "lead")}
    with engine.connect() as connection:
        assert connection.execute(select(leads.c.number)).scalar_one() == "+6591234567"
    assert [(a["conversation_id"], a["by"], a["new_source"]) for a in _audit(engine)][-2:] == [
        ("lead", "chatsync reextract", "lead"),
        ("sender", "chatsync reextract", "channel"),
    ]


def test_a_conversation_chatbase_changes_is_audited_when_its_number_changes(engine: Any) -> None:
    _store(engine, [_conversation("c1", form_submission={"phone": "6581234567"})])
    _store(engine, [_conversation("c1", reply="9123 4567", form_submission={"phone": "6581234567"})])
    assert _numbers(engine) == {"c1": ("+85291234567", "extracted")}
    assert [(a["by"], a["old"], a["old_source"], a["new"], a["new_source"]) for a in _audit(engine)] == [
        ("chatsync sync", "+6581234567", "form", "+85291234567", "extracted")
    ]


# ------------------------------------------------------------------------------------------------ backfill
def test_leads_sync_pages_through_get_leads_and_a_second_run_stores_nothing(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    server = emulator_factory(conversations=700, seed=31, days=12)
    env = chatbase_env(server, database_url)
    expected = server.emulator.leads(BOT)
    assert len(expected) > 100  # more than one page of get-leads
    before = server.emulator.requests
    first = cli("leads", "sync", env=env)
    assert first.exit_code == 0, first.output
    assert server.emulator.requests - before == len(expected) // 100 + 1
    assert f"{len(expected):,} leads stored, 0 already received by webhook, 0 already stored" in first.stderr
    second = cli("leads", "sync", env=env)
    assert f"0 leads stored, 0 already received by webhook, {len(expected):,} already stored" in second.stderr

    from chatsync.store.engine import open_engine

    engine = open_engine(database_url)
    with engine.connect() as connection:
        rows = connection.execute(select(leads)).mappings().all()
    assert sorted(r["chatbase_id"] for r in rows) == sorted(lead.id for lead in expected)
    assert all(r["conversation_id"] is None for r in rows)  # get-leads names no conversation
    by_id = {lead.id: lead for lead in expected}
    assert all(r["number"] == by_id[r["chatbase_id"]].number for r in rows)
    assert _numbers(engine) == {}  # backfilled leads give no conversation a number
    engine.dispose()

    report = json.loads(cli("report", "--format", "json", env=env).stdout)
    assert report["whatsapp"]["leads"] == len(expected)
    day = date.fromisoformat(expected[len(expected) // 2].created_at[:10])
    on_day = sum(1 for lead in expected if lead.created_at[:10] == day.isoformat())
    one_day = json.loads(
        cli("report", "--since", str(day), "--until", str(day), "--format", "json", env=env).stdout
    )
    assert one_day["whatsapp"]["leads"] == on_day > 0
    only_whatsapp = json.loads(cli("report", "--source", "WhatsApp", "--format", "json", env=env).stdout)
    assert only_whatsapp["whatsapp"]["leads"] is None  # a lead has no source


def test_leads_sync_reads_only_the_days_asked(cli: Any, emulator_factory: Any, database_url: str) -> None:
    server = emulator_factory(conversations=300, seed=37, days=12)
    env = chatbase_env(server, database_url)
    expected = server.emulator.leads(BOT)
    first, last = (
        expected[len(expected) // 3].created_at[:10],
        expected[2 * len(expected) // 3].created_at[:10],
    )
    result = cli("leads", "sync", "--since", first, "--until", last, env=env)
    wanted = [lead for lead in expected if first <= lead.created_at[:10] <= last]
    assert result.exit_code == 0 and f"{len(wanted):,} leads stored" in result.stderr
    assert cli("leads", "sync", "--since", last, "--until", first, env=env).exit_code == 2


def test_a_lead_received_by_webhook_and_by_backfill_counts_once(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    # Leads of the last half day: a webhook comes when its lead is submitted, here "now".
    server = emulator_factory(conversations=300, seed=41, days=0.5)
    env = chatbase_env(server, database_url)
    assert cli("sync", "--json", env=env).exit_code == 0
    from chatsync.store.engine import open_engine

    engine = open_engine(database_url)
    api = _api(engine)
    expected = server.emulator.leads(BOT)
    webhook_first = expected[: len(expected) // 2]
    for lead in webhook_first:
        _deliver(api, lead)
    numbers = _numbers(engine)
    result = cli("leads", "sync", env=env)
    merged = len(webhook_first)
    assert f"{len(expected) - merged:,} leads stored, {merged:,} already received by webhook" in result.stderr
    assert _lead_count(engine) == len(expected)
    with engine.connect() as connection:
        both = connection.execute(
            select(leads.c.conversation_id, leads.c.chatbase_id, leads.c.raw).where(
                leads.c.delivery.is_not(None)
            )
        ).all()
    assert {(r.conversation_id, r.chatbase_id) for r in both} == {
        (x.conversation_id, x.id) for x in webhook_first
    }
    assert all(set(r.raw) == {"webhook", "get-leads"} for r in both)
    # The other half by webhook afterwards: matched to their backfilled rows, and applied.
    for lead in expected[len(expected) // 2 :]:
        assert _deliver(api, lead).json()["result"] in ("applied", "stored")
    assert _lead_count(engine) == len(expected)
    assert _numbers(engine) != numbers
    report = json.loads(cli("report", "--format", "json", env=env).stdout)
    assert report["whatsapp"]["leads"] == len(expected)
    engine.dispose()


# ------------------------------------------------------------------------------------------------- the API
def test_the_api_and_its_audit_trail_name_every_source(engine: Any) -> None:
    document = _api(engine).get("/openapi.json").json()
    schemas = document["components"]["schemas"]

    def enum(schema: dict[str, Any]) -> list[str]:
        return next(option["enum"] for option in schema["anyOf"] if "enum" in option)

    assert enum(schemas["ConversationOut"]["properties"]["whatsapp_source"]) == list(NUMBER_SOURCES)
    assert enum(schemas["AuditOut"]["properties"]["new_source"]) == list(NUMBER_SOURCES)
    report = schemas["WhatsAppFunnel"]["properties"]
    assert {"from_channel", "from_lead", "leads"} <= set(report)
