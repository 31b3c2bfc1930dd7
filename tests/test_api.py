"""The HTTP API: Clerk tokens signed with keys made here, who sees what, webhooks, SSE, schemathesis."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from svix.webhooks import Webhook

from chatsync.config import Secret, WhatsAppRule
from chatsync.logs import scrub_event
from chatsync.normalize import normalize_conversation
from chatsync.store import writes
from chatsync.store.access import grant
from chatsync.store.tables import conversations, users, whatsapp_audit
from chatsync.web.app import create_app
from chatsync.web.auth import ClerkSettings
from tests.api_helpers import (
    FOREIGN_KEY,
    ISSUER,
    ORIGIN,
    SIGNING_KEY,
    WEBHOOK_SECRET,
    api_settings,
    bearer,
    conversation,
    forged,
    parse_sse,
    token,
)


@pytest.fixture
def api(engine: Any) -> TestClient:
    rows = [
        normalize_conversation(conversation(cid, bot), bot, WhatsAppRule())
        for cid, bot in [("a1", "bot-a"), ("a2", "bot-a"), ("b1", "bot-b")]
    ]
    now = datetime.now(UTC)
    with engine.begin() as connection:
        writes.upsert_conversations(connection, rows, now)
        grant(connection, "bot-a", "user", "user_a", now)
        grant(connection, "bot-b", "org", "org_x", now)
    return TestClient(create_app(engine, api_settings(engine, events_poll=timedelta(seconds=0.2))))


# ------------------------------------------------------------------------------------------ authentication
def test_a_valid_token_works_with_either_case_of_scheme(api: TestClient) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = api.get("/api/conversations", headers={"Authorization": f"{scheme} {token()}"})
        assert response.status_code == 200, response.text
        assert [c["id"] for c in response.json()["data"]] == ["a2", "a1"]
        assert response.headers["x-request-id"]


UNAUTHORIZED = {
    "no header": {},
    "another scheme": {"Authorization": f"Basic {token()}"},
    "scheme without token": {"Authorization": "Bearer"},
    "expired": bearer(
        token(exp=int(time.time()) - 60, iat=int(time.time()) - 400, nbf=int(time.time()) - 400)
    ),
    "not yet valid": bearer(token(nbf=int(time.time()) + 120)),
    "foreign issuer": bearer(token(iss="https://evil.example")),
    "missing azp": bearer(token(drop=("azp",))),
    "foreign azp": bearer(token(azp="https://evil.example")),
    "missing sub": bearer(token(drop=("sub",))),
    "missing exp": bearer(token(drop=("exp",))),
    "missing iat": bearer(token(drop=("iat",))),
    "missing nbf": bearer(token(drop=("nbf",))),
    "another key": bearer(token(key=FOREIGN_KEY)),
    "alg none": bearer(forged("none")),
    "HS256 with the public key": bearer(forged("HS256")),
    "garbage": bearer("not.a.token"),
}


@pytest.mark.parametrize("case", list(UNAUTHORIZED))
def test_every_bad_token_is_401_without_detail(
    api: TestClient, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="chatsync.web"):
        response = api.get("/api/conversations", headers=UNAUTHORIZED[case])
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {
        "error": {"code": "unauthorized", "message": "a valid session token is required"}
    }
    # the server's log says why, for an operator with a wrong CLERK_ISSUER or party; never the token
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("token refused: ")]
    header = UNAUTHORIZED[case].get("Authorization", "")
    assert not header.partition(" ")[2] or header.partition(" ")[2] not in line


def test_the_log_names_why_a_token_was_refused(api: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    reasons = {}
    for case in ("expired", "foreign issuer", "foreign azp", "missing iat"):
        caplog.clear()
        with caplog.at_level("INFO", logger="chatsync.web"):
            api.get("/api/conversations", headers=UNAUTHORIZED[case])
        reasons[case] = next(r.getMessage() for r in caplog.records if "token refused" in r.getMessage())
    assert "ExpiredSignatureError" in reasons["expired"]
    assert "CLERK_ISSUER" in reasons["foreign issuer"]
    assert "'https://evil.example' is not in CLERK_AUTHORIZED_PARTIES" in reasons["foreign azp"]
    assert "iat" in reasons["missing iat"]


def test_a_pending_session_is_403(api: TestClient) -> None:
    response = api.get("/api/conversations", headers=bearer(token(sts="pending")))
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"


def test_clock_skew_of_a_few_seconds_is_tolerated(api: TestClient) -> None:
    assert api.get("/api/conversations", headers=bearer(token(nbf=int(time.time()) + 3))).status_code == 200


# ------------------------------------------------------------------------------------------- authorisation
USER_A = bearer(token())
ORG_MEMBER = bearer(token(sub="user_b", o={"id": "org_x", "rol": "member"}))
ORG_ADMIN = bearer(token(sub="user_o", o={"id": "org_x", "rol": "admin"}))
NOBODY = bearer(token(sub="user_c"))
ADMIN = bearer(token(sub="user_admin"))


def test_each_caller_sees_only_their_chatbots(api: TestClient) -> None:
    def ids(headers: dict[str, str], **params: Any) -> list[str]:
        return [c["id"] for c in api.get("/api/conversations", headers=headers, params=params).json()["data"]]

    assert ids(USER_A) == ["a2", "a1"]
    assert ids(ORG_MEMBER) == ["b1"]
    assert ids(NOBODY) == []
    assert ids(ADMIN) == ["b1", "a2", "a1"]
    assert ids(USER_A, chatbot_id="bot-b") == []  # asking for another's chatbot shows nothing
    assert ids(USER_A, number="+852 9123 4567") == ["a2", "a1"]
    assert ids(USER_A, number="+60 12-351 1338") == []  # any country's number is a lookup, not an error
    foreign = api.get("/api/conversations", headers=USER_A, params={"number": "60123511338"})
    assert foreign.status_code == 422 and "CHATSYNC_ACCEPTED_REGIONS" in foreign.json()["error"]["message"]

    def conversations(headers: dict[str, str]) -> int:
        response = api.get("/api/analytics", headers=headers, params={"tz": "Asia/Hong_Kong"})
        assert response.status_code == 200
        return response.json()["conversations"]

    assert (
        conversations(USER_A),
        conversations(ORG_MEMBER),
        conversations(NOBODY),
        conversations(ADMIN),
    ) == (2, 1, 0, 3)


def test_another_callers_conversation_is_404_exactly_like_a_missing_one(api: TestClient) -> None:
    hidden = api.get("/api/conversations/b1", headers=USER_A)
    missing = api.get("/api/conversations/zz", headers=USER_A)
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
    update = api.post(
        "/api/conversations/b1/update-whatsapp", headers=USER_A, json={"whatsapp_number": "61234567"}
    )
    assert update.status_code == 404
    assert api.get("/api/conversations/b1", headers=ORG_MEMBER).status_code == 200
    assert api.get("/api/conversations/a1", headers=NOBODY).status_code == 404


def test_only_admins_may_sync(api: TestClient) -> None:
    body = {"chatbot_id": "bot-b"}
    assert api.post("/api/sync", headers=USER_A, json=body).status_code == 403
    assert api.post("/api/sync", headers=ORG_MEMBER, json=body).status_code == 403
    assert api.post("/api/sync", headers=ORG_ADMIN, json={"chatbot_id": "bot-a"}).status_code == 403
    # allowed, but this server has no CHATBASE_API_KEY: a declared 503 rather than a crash
    for who in (ADMIN, ORG_ADMIN):
        response = api.post("/api/sync", headers=who, json=body)
        assert response.status_code == 503 and "CHATBASE_API_KEY" in response.json()["error"]["message"]


def test_admin_sync_runs_in_the_background_and_a_second_one_is_409(
    engine: Any, emulator_factory: Any
) -> None:
    server = emulator_factory(conversations=300, seed=51, latency_ms=30)
    settings = api_settings(engine, api_key=Secret("demo-key"), base_url=server.base_url)
    client = TestClient(create_app(engine, settings))
    started = client.post("/api/sync", headers=ADMIN, json={"chatbot_id": "demo-bot"})
    assert started.status_code == 202
    run_id = started.json()["run_id"]
    assert client.post("/api/sync", headers=ADMIN, json={"chatbot_id": "demo-bot"}).status_code == 409
    deadline = time.monotonic() + 60
    status = client.get(f"/api/sync/{run_id}", headers=ADMIN).json()
    while status["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        status = client.get(f"/api/sync/{run_id}", headers=ADMIN).json()
    assert status["status"] == "ok"
    assert status["summary"]["inserted"] == 300 and status["summary"]["status"] == "ok"
    assert client.get("/api/sync/unknown", headers=ADMIN).status_code == 404
    assert client.get(f"/api/sync/{run_id}", headers=USER_A).status_code == 403


def test_an_api_sync_reads_the_chatbase_api_the_settings_name(engine: Any, emulator_factory: Any) -> None:
    server = emulator_factory(conversations=120, seed=52)
    settings = api_settings(engine, api_key=Secret("demo-key"), api_version="v2", api_url=server.v2_base_url)
    client = TestClient(create_app(engine, settings))
    run_id = client.post("/api/sync", headers=ADMIN, json={"chatbot_id": "demo-bot"}).json()["run_id"]
    deadline = time.monotonic() + 60
    status = client.get(f"/api/sync/{run_id}", headers=ADMIN).json()
    while status["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        status = client.get(f"/api/sync/{run_id}", headers=ADMIN).json()
    assert status["status"] == "ok", status
    assert status["summary"]["inserted"] == 120
    with engine.connect() as connection:
        statuses = connection.execute(select(conversations.c.raw)).scalars().all()
    assert len(statuses) == 120 and all(raw["status"] for raw in statuses)  # v2's records, not v1's
    some = server.emulator.all_export_records("demo-bot")[7]
    detail = client.get(f"/api/conversations/{some['id']}", headers=ADMIN).json()
    assert (detail["status"], detail["title"]) == (some["status"], some["title"])
    ratings = [m.get("feedback") for m in some["messages"]]
    assert [m["feedback"] for m in detail["messages"]] == ratings


def test_api_and_cli_corrections_store_the_same_value_and_audit(
    api: TestClient, cli: Any, engine: Any
) -> None:
    response = api.post(
        "/api/conversations/a1/update-whatsapp", headers=USER_A, json={"whatsapp_number": "6123 4567"}
    )
    assert response.status_code == 200
    assert (response.json()["whatsapp_number"], response.json()["whatsapp_source"]) == (
        "+85261234567",
        "manual",
    )
    url = engine.url.render_as_string(hide_password=False)
    assert cli("--database-url", url, "set-whatsapp", "a2", "6123 4567", "--by", "user_a").exit_code == 0
    with engine.connect() as connection:
        audit = connection.execute(
            select(
                whatsapp_audit.c.conversation_id,
                whatsapp_audit.c.by,
                whatsapp_audit.c.old,
                whatsapp_audit.c.new,
                whatsapp_audit.c.old_source,
                whatsapp_audit.c.new_source,
            ).order_by(whatsapp_audit.c.id)
        ).all()
    assert [tuple(r)[1:] for r in audit] == [
        ("user_a", "+85291234567", "+85261234567", "extracted", "manual")
    ] * 2
    shown = api.get("/api/conversations/a1", headers=USER_A).json()
    assert shown["whatsapp_audit"][0]["by"] == "user_a"

    cleared = api.post(
        "/api/conversations/a1/update-whatsapp", headers=USER_A, json={"whatsapp_number": None}
    )
    assert (cleared.json()["whatsapp_number"], cleared.json()["whatsapp_source"]) == (None, "manual")
    auto = api.post("/api/conversations/a1/update-whatsapp", headers=USER_A, json={"auto": True})
    assert (auto.json()["whatsapp_number"], auto.json()["whatsapp_source"]) == ("+85291234567", "extracted")
    invalid = api.post(
        "/api/conversations/a1/update-whatsapp", headers=USER_A, json={"whatsapp_number": "1234"}
    )
    assert invalid.status_code == 422 and "expected 8 digits" in invalid.json()["error"]["message"]
    assert api.post("/api/conversations/a1/update-whatsapp", headers=USER_A, json={}).status_code == 422


def test_update_whatsapp_ignores_invisible_characters_as_the_cli_does(api: TestClient) -> None:
    stored = api.post(
        "/api/conversations/a1/update-whatsapp",
        headers=USER_A,
        json={"whatsapp_number": "+65\ufe0d 9123 4567"},
    )
    assert stored.status_code == 200
    assert (stored.json()["whatsapp_number"], stored.json()["whatsapp_source"]) == ("+6591234567", "manual")
    refused = api.post(
        "/api/conversations/a2/update-whatsapp", headers=USER_A, json={"whatsapp_number": "+65 / 9123 4567"}
    )
    assert refused.status_code == 422
    assert api.get("/api/conversations/a2", headers=USER_A).json()["whatsapp_number"] == "+85291234567"


def test_unexpected_errors_are_500_with_a_request_id_and_no_trace(api: TestClient) -> None:
    app = api.app

    @app.get("/boom")  # type: ignore[attr-defined]
    def boom() -> None:
        raise RuntimeError("secret internals")

    client = TestClient(app, raise_server_exceptions=False)
    response = client.get("/boom", headers={"x-request-id": "req-123"})
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal", "message": "unexpected error; request id req-123"}
    }
    assert "secret internals" not in response.text
    assert response.headers.get_list("x-request-id") == ["req-123"]  # once


def test_a_path_cannot_forge_a_line_of_the_log(api: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="chatsync.access"):
        api.get("/api/conversations/x%0D%0A2026-11-30T10:00:00.000Z%20ERROR%20chatsync.web:%20forged")
    lines = [r.getMessage() for r in caplog.records if r.name == "chatsync.access"]
    assert len(lines) == 1 and "\n" not in lines[0] and "x\\r\\n2026" in lines[0]  # escaped, one line


def test_health_needs_no_token(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok", "database": "ok"}


def test_sentry_events_carry_no_tokens_or_personal_data() -> None:
    event = {
        "request": {"headers": {"Authorization": "Bearer x"}, "data": "{}", "url": "/api"},
        "user": {"id": 1},
    }
    assert scrub_event(event) == {"request": {"url": "/api"}}


# ------------------------------------------------------------------------------------------------ webhooks
def _signed(event: dict[str, Any], msg_id: str, when: datetime | None = None) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(event)
    when = when or datetime.now(UTC)
    signature = Webhook(WEBHOOK_SECRET).sign(msg_id, when, body)
    return body.encode(), {
        "svix-id": msg_id,
        "svix-timestamp": str(int(when.timestamp())),
        "svix-signature": signature,
    }


def _user_event(kind: str, updated_ms: int, first_name: str = "Mei") -> dict[str, Any]:
    return {
        "type": kind,
        "timestamp": updated_ms,
        "data": {
            "id": "user_w",
            "first_name": first_name,
            "last_name": "Chan",
            "image_url": "https://img.example/u.png",
            "primary_email_address_id": "idn_2",
            "email_addresses": [
                {"id": "idn_1", "email_address": "old@example.com"},
                {"id": "idn_2", "email_address": "mei@example.com"},
            ],
            "created_at": 1714550400000,
            "updated_at": updated_ms,
        },
    }


def _stored_user(engine: Any) -> Any:
    with engine.connect() as connection:
        return connection.execute(select(users).where(users.c.id == "user_w")).mappings().first()


def test_a_valid_webhook_is_stored_and_a_redelivery_changes_nothing(api: TestClient, engine: Any) -> None:
    body, headers = _signed(_user_event("user.created", 1714550400000), "msg_1")
    assert api.post("/api/webhooks/clerk", content=body, headers=headers).json() == {"result": "stored"}
    user = _stored_user(engine)
    assert (user["email"], user["first_name"], user["last_name"]) == ("mei@example.com", "Mei", "Chan")
    assert user["clerk_created_at"] is not None
    newer, newer_headers = _signed(_user_event("user.updated", 1714550500000, "Mei Ling"), "msg_2")
    assert api.post("/api/webhooks/clerk", content=newer, headers=newer_headers).json() == {
        "result": "stored"
    }
    replay = api.post("/api/webhooks/clerk", content=body, headers=headers)
    assert replay.json() == {"result": "duplicate"}
    assert _stored_user(engine)["first_name"] == "Mei Ling"


def test_an_older_update_after_a_newer_one_changes_nothing(api: TestClient, engine: Any) -> None:
    for msg_id, updated, name in (("m1", 2000, "New"), ("m2", 1000, "Old")):
        body, headers = _signed(_user_event("user.updated", updated, name), msg_id)
        assert api.post("/api/webhooks/clerk", content=body, headers=headers).status_code == 200
    assert _stored_user(engine)["first_name"] == "New"


def test_user_deleted_marks_the_user(api: TestClient, engine: Any) -> None:
    body, headers = _signed(_user_event("user.created", 1000), "m1")
    api.post("/api/webhooks/clerk", content=body, headers=headers)
    body, headers = _signed(
        {"type": "user.deleted", "timestamp": 1714560000000, "data": {"id": "user_w", "deleted": True}}, "m2"
    )
    assert api.post("/api/webhooks/clerk", content=body, headers=headers).json() == {"result": "deleted"}
    assert _stored_user(engine)["deleted_at"] is not None


@pytest.mark.parametrize(
    "problem", ["tampered body", "stale timestamp", "no signature", "malformed signature", "no headers"]
)
def test_bad_webhooks_are_400_and_store_nothing(api: TestClient, engine: Any, problem: str) -> None:
    when = datetime.now(UTC) - timedelta(hours=1) if problem == "stale timestamp" else None
    body, headers = _signed(_user_event("user.created", 1000), "m1", when)
    if problem == "tampered body":
        body = body.replace(b"Mei", b"Eve")
    elif problem == "no signature":
        headers.pop("svix-signature")
    elif problem == "malformed signature":
        headers["svix-signature"] = "not-a-signature"
    elif problem == "no headers":
        headers = {}
    response = api.post("/api/webhooks/clerk", content=body, headers=headers)
    assert response.status_code == 400
    assert _stored_user(engine) is None


@pytest.mark.parametrize(
    "odd",
    [
        {"updated_at": 1e20},
        {"updated_at": float("nan")},
        {"first_name": {"nested": "object"}},
        {"last_name": "x" * 201},
        {"id": "user_\u0000nul"},
        {"id": "u" * 65},
        {"id": "user_\ud83d"},
        {"first_name": "Carol\ud83d"},
        {"email_addresses": [{"id": "e1", "email_address": "x\ud83d@example.com"}]},
        {"email_addresses": 5},
        {"type": "user.created\u0000"},
        {"type": "user.created\ud83d"},
        {"type": None},
    ],
    ids=[
        "far-future",
        "nan",
        "object-name",
        "long-name",
        "nul-id",
        "long-id",
        "surrogate-id",
        "surrogate-name",
        "surrogate-email",
        "addresses-not-a-list",
        "nul-type",
        "surrogate-type",
        "no-type",
    ],
)
def test_a_signed_clerk_user_chatsync_cannot_store_is_400_not_500(
    api: TestClient, engine: Any, odd: dict[str, Any]
) -> None:
    event = _user_event("user.created", 1000)
    if "type" in odd:
        event["type"] = odd["type"]
    else:
        event["data"].update(odd)
    body, headers = _signed(event, "m-odd")
    response = api.post("/api/webhooks/clerk", content=body, headers=headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_payload"
    assert _stored_user(engine) is None
    for number, deleted_event in enumerate(
        [
            {"type": "user.deleted", "timestamp": 1e30, "data": {"id": "user_w"}},
            {"type": "user.deleted", "timestamp": 1000, "data": {"id": "user_\ud83d"}},
        ]
    ):
        deleted, deleted_headers = _signed(deleted_event, f"m-del-{number}")
        assert api.post("/api/webhooks/clerk", content=deleted, headers=deleted_headers).status_code == 400


def test_users_backfill_pages_through_clerk(engine: Any) -> None:
    import httpx

    from chatsync.clerk import fetch_clerk_users
    from chatsync.store.users import upsert_user

    everyone = [dict(_user_event("user.created", 1000 + i)["data"], id=f"user_{i}") for i in range(730)]
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer sk_test_clerk"
        seen.append(request.url.params["offset"])
        offset, limit = int(request.url.params["offset"]), int(request.url.params["limit"])
        return httpx.Response(200, json=everyone[offset : offset + limit])

    fetched = list(fetch_clerk_users(Secret("sk_test_clerk"), transport=httpx.MockTransport(handler)))
    assert len(fetched) == 730 and seen == ["0", "500"]
    with engine.begin() as connection:
        assert sum(upsert_user(connection, u) for u in fetched) == 730


# ---------------------------------------------------------------------------------------------------- SSE
def test_events_stream_what_the_caller_may_see_until_the_token_expires(api: TestClient, engine: Any) -> None:
    expiring = bearer(token(exp=int(time.time()) + 3))

    def upsert_later() -> None:
        time.sleep(0.8)
        rows = [
            normalize_conversation(conversation(cid, bot, "6123 4567"), bot, WhatsAppRule())
            for cid, bot in [("a3", "bot-a"), ("b2", "bot-b")]
        ]
        with engine.begin() as connection:
            writes.upsert_conversations(connection, rows, datetime.now(UTC))

    writer = threading.Thread(target=upsert_later)
    writer.start()
    started = time.monotonic()
    with api.stream("GET", "/api/events", headers=expiring) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    writer.join()
    assert time.monotonic() - started < 15
    events = parse_sse(text)
    assert [(e["event"], e["data"].get("id")) for e in events] == [
        ("conversation.upserted", "a3"),  # b2 is another chatbot's conversation
        ("expired", None),
    ]
    assert int(events[0]["id"]) > 0 and "id" not in events[1]  # a reconnect resumes after the last change


# ----------------------------------------------------------------------------------------------- serving
def test_serve_refuses_to_start_without_clerk_settings(cli: Any) -> None:
    result = cli("serve", env={"CLERK_ISSUER": ISSUER})
    assert result.exit_code == 4
    assert "CLERK_JWT_KEY or CLERK_JWKS_URL" in result.stderr and "CLERK_AUTHORIZED_PARTIES" in result.stderr


def test_access_commands_grant_list_and_revoke(cli: Any, sqlite_url: str) -> None:
    url = ("--database-url", sqlite_url)
    assert cli(*url, "access", "grant", "bot-a", "--user", "user_a").exit_code == 0
    assert cli(*url, "access", "grant", "bot-a", "--org", "org_x").exit_code == 0
    assert cli(*url, "access", "grant", "bot-a").exit_code == 2
    listed = json.loads(cli(*url, "access", "list", "--format", "json").stdout)
    assert [(g["chatbot_id"], g["principal_type"], g["principal_id"]) for g in listed] == [
        ("bot-a", "org", "org_x"),
        ("bot-a", "user", "user_a"),
    ]
    assert cli(*url, "access", "revoke", "bot-a", "--user", "user_a").exit_code == 0
    assert len(json.loads(cli(*url, "access", "list", "--format", "json").stdout)) == 1


# ---------------------------------------------------------------------------------------------- schemathesis
def test_openapi_declares_every_status_and_no_request_is_a_500(engine: Any, emulator_factory: Any) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import status_code_conformance

    server = emulator_factory(conversations=50, seed=52)
    configured = api_settings(
        engine, api_key=Secret("demo-key"), base_url=server.base_url, retry_budget=timedelta(seconds=2)
    )
    app = create_app(engine, configured)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = bearer(token(sub="user_admin", exp=int(time.time()) + 3600))
    operations = [op for op in schema.get_all_operations() if op.ok().path != "/api/events"]
    assert len(operations) >= 8
    for result in operations:
        operation = result.ok()

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=[not_a_server_error, status_code_conformance])

        check()


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/conversations", {"until": "9999-12-31"}),
        ("/api/conversations", {"since": "0001-01-01"}),
        ("/api/conversations", {"since": "2024-05-02", "until": "2024-05-01"}),
        ("/api/conversations", {"search": "a\x00b"}),
        ("/api/conversations", {"cursor": "not-a-cursor"}),
        ("/api/conversations", {"cursor": "WzEsMl0"}),  # [1, 2]: well formed, not chatsync's
        ("/api/conversations", {"number": "1234"}),
        ("/api/analytics", {"tz": "America"}),
        ("/api/analytics", {"tz": "x" * 60}),
        ("/api/analytics", {"since": "1990-01-01", "until": "2024-01-01"}),
        ("/api/conversations/a%00b", {}),
    ],
)
def test_bad_input_is_a_clear_422_never_a_500(api: TestClient, path: str, params: dict[str, str]) -> None:
    response = api.get(path, params=params, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"


def test_jwks_url_keys_verify_tokens_and_are_cached() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from chatsync.web.auth import ClerkVerifier, Unauthorized

    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(SIGNING_KEY.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "ins_test", "use": "sig", "alg": "RS256"}]}).encode()
    hits = []

    class Keys(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Keys)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
        verifier = ClerkVerifier(ClerkSettings(issuer=ISSUER, authorized_parties=(ORIGIN,), jwks_url=url))
        assert verifier.verify(f"Bearer {token()}").caller.user_id == "user_a"
        verifier.verify(f"Bearer {token(sub='user_b')}")
        assert len(hits) == 1  # the key set is fetched once and cached
        with pytest.raises(Unauthorized):
            verifier.verify(f"Bearer {token(key=FOREIGN_KEY)}")
    finally:
        server.shutdown()


# -------------------------------------------------------------------------------------------------- CORS
def test_cors_answers_the_frontends_preflight_and_exposes_the_request_id(api: TestClient) -> None:
    preflight = api.options(
        "/api/conversations",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, last-event-id, x-request-id",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    allowed = {h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "last-event-id", "x-request-id"} <= allowed
    response = api.get("/api/conversations", headers={**USER_A, "Origin": ORIGIN})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
    refused = api.get("/api/conversations", headers={**USER_A, "Origin": "https://evil.example"})
    # nothing that lets a browser read it (Starlette still names the exposed header, which alone grants nothing)
    assert not [h for h in refused.headers if h.startswith("access-control-allow-")]
    refused_preflight = api.options(
        "/api/conversations",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in refused_preflight.headers


def test_cors_origins_setting_replaces_the_authorized_parties(engine: Any) -> None:
    settings = api_settings(engine, cors_origins=("http://127.0.0.1:3000",))
    client = TestClient(create_app(engine, settings))
    local = client.get("/healthz", headers={"Origin": "http://127.0.0.1:3000"})
    assert local.headers["access-control-allow-origin"] == "http://127.0.0.1:3000"
    assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": ORIGIN}).headers


# ---------------------------------------------------------------------------------------------- contract
def test_openapi_declares_bearer_auth_readable_ids_our_errors_and_the_event_stream(api: TestClient) -> None:
    document = api.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert [s["scheme"] for s in schemes.values()] == ["bearer"]
    operations = {
        (path, method): op for path, item in document["paths"].items() for method, op in item.items()
    }
    assert {op["operationId"] for op in operations.values()} == {
        "list_conversations",
        "get_conversation_detail",
        "update_whatsapp",
        "start_sync",
        "get_sync",
        "get_analytics",
        "stream_events",
        "receive_clerk_webhook",
        "receive_chatbase_webhook",
        "health",
    }
    for (path, _), op in operations.items():
        if path.startswith("/api/") and "webhooks" not in path:
            assert op["security"], path
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
    events = operations[("/api/events", "get")]["responses"]
    assert list(events["200"]["content"]) == ["text/event-stream"]
    assert {"429", "401"} <= set(events)
    analytics = operations[("/api/analytics", "get")]["responses"]["200"]["content"]["application/json"]
    assert analytics["schema"] == {"$ref": "#/components/schemas/Report"}
    assert {"ConversationUpserted", "SyncFinished"} <= set(document["components"]["schemas"])
    assert "HTTPValidationError" not in document["components"]["schemas"]


# --------------------------------------------------------------------------------------- API-started sync
def test_a_sync_started_through_the_api_holds_the_lock_from_the_check_to_the_end(
    engine: Any, emulator_factory: Any
) -> None:
    from chatsync.errors import LockHeld
    from chatsync.store.locks import chatbot_lock

    server = emulator_factory(conversations=300, seed=53, latency_ms=20)
    client = TestClient(
        create_app(engine, api_settings(engine, api_key=Secret("demo-key"), base_url=server.base_url))
    )
    with chatbot_lock(engine, "demo-bot"):  # cron is syncing this chatbot
        refused = client.post("/api/sync", headers=ADMIN, json={"chatbot_id": "demo-bot"})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "sync_running"

    # A contender that takes the lock whenever it is free, as a tight cron loop would.
    stop = threading.Event()
    contender_held = []

    def contend() -> None:
        while not stop.is_set():
            try:
                with chatbot_lock(engine, "demo-bot"):
                    contender_held.append(1)
                    time.sleep(0.003)
            except LockHeld:
                time.sleep(0)

    contender = threading.Thread(target=contend)
    contender.start()
    try:
        deadline = time.monotonic() + 60
        started = None
        while started is None and time.monotonic() < deadline:
            response = client.post("/api/sync", headers=ADMIN, json={"chatbot_id": "demo-bot"})
            assert response.status_code in (202, 409), response.text
            if response.status_code == 202:
                started = response.json()["run_id"]
        assert started is not None and contender_held
        with (
            pytest.raises(LockHeld),
            chatbot_lock(engine, "demo-bot"),
        ):  # held by the API's run from its check on
            pass
    finally:
        stop.set()
        contender.join()
    status = client.get(f"/api/sync/{started}", headers=ADMIN).json()
    while status["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        status = client.get(f"/api/sync/{started}", headers=ADMIN).json()
    assert status["status"] == "ok", status  # never left "running" by a lock taken in between
    assert status["summary"]["inserted"] == 300


def test_an_api_sync_that_cannot_run_ends_failed_with_the_reason(engine: Any, emulator_factory: Any) -> None:
    server = emulator_factory(conversations=10, seed=54)  # it accepts only its own key
    settings = api_settings(engine, api_key=Secret("not-the-key"), base_url=server.base_url)
    client = TestClient(create_app(engine, settings))
    started = client.post("/api/sync", headers=ADMIN, json={"chatbot_id": "demo-bot"})
    assert started.status_code == 202
    run_id = started.json()["run_id"]
    deadline = time.monotonic() + 60
    status = client.get(f"/api/sync/{run_id}", headers=ADMIN).json()
    while status["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        status = client.get(f"/api/sync/{run_id}", headers=ADMIN).json()
    assert status["status"] == "failed"
    assert status["summary"]["status"] == "failed"  # the summary says what `sync --json` says
    assert "Chatbase rejected" in status["error"] and "not-the-key" not in json.dumps(status)
    again = client.post("/api/sync", headers=ADMIN, json={"chatbot_id": "demo-bot"})
    assert again.status_code == 202  # the lock was given back
    # and it ends too, before this test's database goes: a run left running kept its lease renewing
    # against a dropped database, and its warnings landed in a later test's output
    second = again.json()["run_id"]
    while client.get(f"/api/sync/{second}", headers=ADMIN).json()["status"] == "running":
        assert time.monotonic() < deadline + 60
        time.sleep(0.1)


def test_an_organizations_admin_sees_only_its_chatbots_runs(api: TestClient, engine: Any) -> None:
    """ORG_ADMIN administers bot-b (granted to org_x); a run of bot-a, or of bot-a and bot-b, is not theirs."""
    now = datetime.now(UTC)
    with engine.begin() as connection:
        for run_id, bots in (("run-b", ["bot-b"]), ("run-a", ["bot-a"]), ("run-ab", ["bot-a", "bot-b"])):
            writes.start_run(connection, run_id, bots, now)
            writes.finish_run(connection, run_id, "ok", {"status": "ok", "fetched": 1}, None, now)
    assert api.get("/api/sync/run-b", headers=ORG_ADMIN).json()["status"] == "ok"
    for hidden in ("run-a", "run-ab"):
        response = api.get(f"/api/sync/{hidden}", headers=ORG_ADMIN)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert api.get("/api/sync/run-ab", headers=ADMIN).status_code == 200  # the global admin sees all


def test_a_body_too_deep_or_broken_to_parse_is_a_declared_422(api: TestClient) -> None:
    for body in (b'{"whatsapp_number": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"whatsapp_number": "9123'):
        response = api.post(
            "/api/conversations/a1/update-whatsapp",
            content=body,
            headers={**ADMIN, "content-type": "application/json"},
        )
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
