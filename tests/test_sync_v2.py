"""`chatsync sync --api v2`: the conversations export, with v1's guarantees, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from chatsync.chatbase_v2 import ChatbaseV2Client
from chatsync.config import Secret, WhatsAppRule
from chatsync.emulator import Emulator, EmulatorTransport, Faults
from chatsync.errors import ExitCode, PagingError
from chatsync.store.engine import ensure_schema, open_engine
from chatsync.store.tables import quarantine, sync_days
from chatsync.sync import Syncer, SyncRequest
from tests.conftest import chatbase_env, chatbase_v2_env
from tests.helpers import assert_exact, assert_exact_v2, stored_conversations, sync_killed_then_rerun
from tests.test_report_v2 import assert_v2_figures, expected_figures


def _summary(result: Any) -> dict[str, Any]:
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def _client(server: Any, **kwargs: Any) -> ChatbaseV2Client:
    kwargs.setdefault("backoff", (0.05, 0.3))
    kwargs.setdefault("rate_limit", (1000, 1.0))
    return ChatbaseV2Client(Secret("demo-key"), server.v2_base_url, **kwargs)


def test_v2_sync_stores_5000_conversations_exactly_and_a_rerun_changes_nothing(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    server = emulator_factory(conversations=5000, seed=7)
    env = chatbase_v2_env(server, database_url)

    first = _summary(cli("sync", "--json", env=env))
    assert first["status"] == "ok"
    assert first["inserted"] == first["fetched"] == 5000
    # 250 full pages of 20, each window's last page, and the probes that find the first day
    assert 250 < first["requests"] < 300
    assert_exact_v2(database_url, server.emulator)
    # the report on what the sync stored equals a recomputation from what the emulator says it sent
    report = json.loads(cli("report", "--format", "json", env=env).stdout)
    assert_v2_figures(report, expected_figures(server.emulator.export_truth("demo-bot").values()))
    assert report["response_time_seconds"]["coverage"] >= 0.95
    # show: the title, status, ratings and tool calls v2 brings
    truth = server.emulator.export_truth("demo-bot")
    with_tools = next(i for i, t in truth.items() if t.tool_calls and t.positive and t.status == "taken_over")
    shown = json.loads(cli("show", with_tools, "--format", "json", env=env).stdout)
    assert shown["status"] == "taken_over" and "title" in shown
    assert [m["feedback"] for m in shown["messages"]] == list(truth[with_tools].feedback)
    assert sum(bool(m["tools"]) for m in shown["messages"]) == truth[with_tools].tool_calls
    table = cli("show", with_tools, "--format", "table", env=env).stdout
    assert "taken over" in table and "[called " in table and "(rated up)" in table

    second = _summary(cli("sync", "--json", env=env))
    assert (second["inserted"], second["updated"], second["quarantined"]) == (0, 0, 0)
    assert second["unchanged"] == second["fetched"] > 0
    assert second["requests"] < first["requests"] / 5  # the lookback and today, not the history
    assert_exact_v2(database_url, server.emulator)


def test_the_api_flag_and_variable_choose_the_backend_and_each_keeps_its_own_checkpoints(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    server = emulator_factory(conversations=400, seed=31)
    v1 = chatbase_env(server, sqlite_url)
    assert _summary(cli("sync", "--json", env=v1))["inserted"] == 400
    assert_exact(sqlite_url, server.emulator)
    through_v1 = stored_conversations(sqlite_url)
    assert not any("status" in row["raw"] for row in through_v1.values())

    # the same conversations through v2: days fetched through v1 do not count, every record gains its
    # v2 fields (an update, not a second copy)
    v2 = {**v1, "CHATBASE_API_URL": server.v2_base_url, "CHATSYNC_RATE_LIMIT": "1000/10s"}
    switched = _summary(cli("sync", "--json", "--api", "2", env=v2))
    assert (switched["inserted"], switched["updated"]) == (0, 400)
    assert_exact_v2(sqlite_url, server.emulator)
    engine = open_engine(sqlite_url)
    with engine.connect() as connection:
        scopes = set(connection.execute(select(sync_days.c.scope)).scalars())
    engine.dispose()
    assert scopes == {"*", "v2:*"}
    # what only v1 sends (the user's country, the customer, the lead form and its number) is kept
    through_v2 = stored_conversations(sqlite_url)
    for conversation_id, before in through_v1.items():
        after = through_v2[conversation_id]
        for column in ("customer", "country", "wa_form"):
            assert after[column] == before[column], (conversation_id, column)
        assert after["raw"].get("form_submission") == before["raw"].get("form_submission")
    assert sum(row["wa_form"] is not None for row in through_v2.values()) > 0

    # CHATBASE_API_VERSION=2 is the same as --api 2; --api 1 overrides it
    again = _summary(cli("sync", "--json", env={**v2, "CHATBASE_API_VERSION": "v2"}))
    assert again["updated"] == 0 and again["unchanged"] == again["fetched"]
    back = _summary(cli("sync", "--json", "--full", "--api", "1", env={**v2, "CHATBASE_API_VERSION": "2"}))
    assert back["updated"] > 0 and back["inserted"] == 0  # v1's records differ from v2's
    # ... and what only v2 sends (the title, the status, the WhatsApp sender and so its number) is kept
    through_v1_again = stored_conversations(sqlite_url)
    for conversation_id, before in through_v2.items():
        after = through_v1_again[conversation_id]
        for column in ("title", "status", "chatbase_user_id", "wa_channel", "customer", "country", "wa_form"):
            assert after[column] == before[column], (conversation_id, column)
    assert sum(row["wa_channel"] is not None for row in through_v1_again.values()) > 0
    assert sum(row["status"] is not None for row in through_v1_again.values()) == 400


def test_an_unknown_api_version_is_one_line_and_syncs_nothing(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    server = emulator_factory(conversations=50, seed=3)
    result = cli("sync", "--api", "3", env=chatbase_v2_env(server, sqlite_url))
    assert result.exit_code == ExitCode.USAGE
    assert result.stderr.strip().splitlines() == [
        "error: --api: invalid Chatbase API version '3': expected 1 or 2"
    ]
    assert server.emulator.requests == 0


def test_v2_bad_records_are_quarantined_with_reasons_and_the_rest_is_stored(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    server = emulator_factory(conversations=500, seed=2, bad_records=5)
    env = chatbase_v2_env(server, database_url)
    summary = _summary(cli("sync", "--json", env=env))
    assert summary["status"] == "ok"
    assert (summary["quarantined"], summary["inserted"]) == (5, 495)
    assert_exact_v2(database_url, server.emulator)
    engine = open_engine(database_url)
    with engine.connect() as connection:
        kept = connection.execute(select(quarantine.c.reason, quarantine.c.raw)).all()
    engine.dispose()
    joined = " | ".join(reason for reason, _ in kept)
    for fragment in ("no id", "not a list", "not an object", "characters (limit", "unparsable created_at"):
        assert fragment in joined
    again = _summary(cli("sync", "--json", "--full", env=env))
    assert (again["quarantined"], again["inserted"], again["updated"]) == (5, 0, 0)


def test_v2_sync_stays_exact_through_failures_throttling_and_slow_answers(
    emulator_factory: Any, database_url: str
) -> None:
    faults = Faults(fail_rate=0.10, slow_rate=0.05, malformed_rate=0.05, slow_seconds=2.0, retry_after=1)
    server = emulator_factory(conversations=1200, seed=21, faults=faults)
    engine = open_engine(database_url)
    ensure_schema(engine)
    with _client(server, timeout=0.5) as client:
        summary = Syncer(engine, client, WhatsAppRule(), concurrency=8).run(SyncRequest(("demo-bot",)))
    engine.dispose()
    assert summary.status == "ok"
    assert summary.retries > 0 and server.emulator.faulted > 0
    assert_exact_v2(database_url, server.emulator)


def test_v2_sync_keeps_under_chatbase_rate_limit_and_is_never_throttled(
    emulator_factory: Any, sqlite_url: str
) -> None:
    # the emulator enforces Chatbase's 100 requests / 10 s; chatsync's limiter keeps under it
    server = emulator_factory(conversations=2200, seed=5, rate_limit=(100, 10.0))
    engine = open_engine(sqlite_url)
    ensure_schema(engine)
    with _client(server, rate_limit=(100, 10.0)) as client:
        summary = Syncer(engine, client, WhatsAppRule(), concurrency=8).run(SyncRequest(("demo-bot",)))
        assert client.stats.throttled == 0
    engine.dispose()
    assert summary.requests > 100  # more than one window's worth: the limiter really had to wait
    assert server.emulator.throttled == 0
    assert_exact_v2(sqlite_url, server.emulator)


def test_a_v2_outage_exits_3_and_a_later_run_completes(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    server = emulator_factory(conversations=300, seed=22, faults=Faults(fail_rate=1.0))
    env = chatbase_v2_env(server, sqlite_url)
    result = cli("sync", "--json", "--retry-budget", "3s", env=env)
    assert result.exit_code == ExitCode.PARTIAL
    assert json.loads(result.stdout)["status"] == "partial"
    assert "kept failing" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert server.v2_base_url in result.stderr and "check CHATBASE_API_URL" in result.stderr
    server.emulator.faults.fail_rate = 0.0
    assert _summary(cli("sync", "--json", env=env))["status"] == "ok"
    assert_exact_v2(sqlite_url, server.emulator)


def test_v2_sigkill_at_five_points_then_rerun_ends_exact(
    emulator_factory: Any, database_url: str, tmp_path: Path
) -> None:
    server = emulator_factory(conversations=4000, seed=23, latency_ms=60)
    env = {**os.environ, **chatbase_v2_env(server, database_url), "CHATSYNC_CONCURRENCY": "4"}
    outcomes, final = sync_killed_then_rerun(env, tmp_path, final_timeout=180)
    assert outcomes.count(-signal.SIGKILL) >= 3, outcomes  # most runs really were killed mid-way
    assert final.returncode == 0, final.stderr
    assert json.loads(final.stdout)["status"] == "ok"
    assert_exact_v2(database_url, server.emulator)


def test_v2_dry_run_finds_the_first_day_and_plans_twenty_a_page(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    server = emulator_factory(conversations=1000, seed=9, days=40)
    env = chatbase_v2_env(server, sqlite_url)
    plan = json.loads(cli("sync", "--dry-run", "--json", env=env).stdout)
    assert 0 < plan["planning_requests"] < 30  # the first-day probes only
    assert len(stored_conversations(sqlite_url)) == 0
    assert _summary(cli("sync", "--json", env=env))["inserted"] == 1000
    again = json.loads(cli("sync", "--dry-run", "--json", "--full", env=env).stdout)
    (bot,) = again["chatbots"]
    assert bot["stored_conversations"] == 1000
    # one request a page of 20, plus each window's last: 1000 / 20 + windows
    assert bot["estimated_requests"] == sum(n // 20 + 1 for n in _per_window(sqlite_url, bot["windows"]))


def _per_window(database_url: str, windows: list[list[str]]) -> list[int]:
    rows = stored_conversations(database_url).values()
    return [
        sum(start <= row["created_at"].date().isoformat() <= end for row in rows) for start, end in windows
    ]


def test_v2_sources_are_the_exports_own_and_v1_refuses_them(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    server = emulator_factory(conversations=400, seed=4)
    env = chatbase_v2_env(server, sqlite_url)
    result = cli("sync", "--json", "--source", "whatsapp", "--source", "email", env=env)
    assert result.exit_code == 0, result.stderr
    expected = {
        r["id"]
        for r in server.emulator.all_export_records("demo-bot")
        if r["source"] in ("WhatsApp", "Email")
    }
    assert set(stored_conversations(sqlite_url)) == expected
    refused = cli("sync", "--source", "email", "--api", "1", env=env)
    assert refused.exit_code == ExitCode.USAGE
    assert "unknown source 'email'" in refused.stderr


def test_v2_all_chatbots_lists_the_agents(cli: Any, emulator_factory: Any, sqlite_url: str) -> None:
    server = emulator_factory(conversations=150, seed=12, chatbot_ids=("bot-a", "bot-b"))
    env = chatbase_v2_env(server, sqlite_url)
    del env["CHATBASE_CHATBOT_ID"]
    summary = _summary(cli("sync", "--json", "--all-chatbots", env=env))
    assert sorted(summary["chatbots"]) == ["bot-a", "bot-b"]
    for bot in ("bot-a", "bot-b"):
        assert_exact_v2(sqlite_url, server.emulator, bot)


def test_a_plan_without_api_v2_is_refused_with_what_to_do(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    server = emulator_factory(conversations=50, seed=3, v2_plan=False)
    env = chatbase_v2_env(server, sqlite_url)
    result = cli("sync", env=env)
    assert result.exit_code == ExitCode.CONFIG
    assert "CHATBASE_API_VERSION=1" in result.stderr and "demo-key" not in result.stderr
    doctor = cli("doctor", env=env)
    assert doctor.exit_code != 0 and "CHATBASE_API_VERSION=1" in doctor.output
    assert cli("doctor", env={**env, "CHATBASE_API_VERSION": "1"}).exit_code == 0


def test_a_v2_root_without_api_v2_is_named_as_the_setting_to_fix_not_the_chatbot(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    server = emulator_factory(conversations=50, seed=3)
    env = chatbase_v2_env(server, sqlite_url, CHATBASE_API_URL=server.v2_base_url.removesuffix("/api/v2"))
    result = cli("sync", env=env)
    assert result.exit_code == ExitCode.CONFIG
    assert "check CHATBASE_API_URL" in result.stderr and "CHATBASE_CHATBOT_ID" not in result.stderr
    unknown = cli("sync", env=chatbase_v2_env(server, sqlite_url, CHATBASE_CHATBOT_ID="no-such-bot"))
    assert unknown.exit_code == ExitCode.CONFIG and "check CHATBASE_CHATBOT_ID" in unknown.stderr


def test_doctor_checks_the_v2_root_and_names_its_variable(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    server = emulator_factory(conversations=50, seed=3)
    env = chatbase_v2_env(server, sqlite_url)
    cli("db", "upgrade", env=env)
    good = cli("doctor", env=env)
    assert good.exit_code == 0, good.output
    assert f"API v2 answers for it at {server.v2_base_url}" in good.output
    dead = cli("doctor", env={**env, "CHATBASE_API_URL": "http://ops:hunter2@127.0.0.1:9/api/v2"})
    assert dead.exit_code != 0 and "check CHATBASE_API_URL" in dead.output
    assert "hunter2" not in dead.output and "ops:***@127.0.0.1:9" in dead.output  # a proxy's password


# ------------------------------------------------------------------------ cursor paging under the engine
def _paging_client(emulator: Emulator, tamper: Any = None) -> tuple[ChatbaseV2Client, list[httpx.Request]]:
    sent: list[httpx.Request] = []
    inner = EmulatorTransport(emulator)

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        response = inner.handle_request(request)
        return tamper(request, response) if tamper else response

    client = ChatbaseV2Client(
        Secret("demo-key"),
        "http://emulator/api/v2",
        transport=httpx.MockTransport(handle),
        rate_limit=(1000, 1.0),
    )
    return client, sent


def test_pages_follow_the_cursors_and_a_page_past_the_end_costs_no_request() -> None:
    emulator = Emulator(conversations=45, seed=3, rate_limit=None)
    client, sent = _paging_client(emulator)
    pages = [client.fetch_page("demo-bot", n, None, None) for n in (1, 2, 3, 4)]
    assert [len(p.records) if p else None for p in pages] == [20, 20, 5, 0]
    assert [p.last if p else None for p in pages] == [False, False, True, True]
    assert len(sent) == 3  # page 4 is known to be empty
    assert "cursor" not in sent[0].url.params
    assert sent[1].url.params["cursor"] and sent[1].url.params["cursor"] != sent[2].url.params["cursor"]
    ids = [r["id"] for p in pages if p for r in p.records]
    assert sorted(ids) == sorted(r["id"] for r in emulator.all_export_records("demo-bot"))
    # each record already has the shape the engine reads; the body is kept exactly as sent
    assert all("created_at" in r and "content" in r["messages"][0] for p in pages[:3] if p for r in p.records)
    with pytest.raises(PagingError, match="out of order"):
        client.fetch_page("demo-bot", 3, None, None)  # page 3 of a window paged afresh needs page 2 first
    client.close()


def test_a_cursor_handed_out_twice_stops_the_sync_before_it_loops(sqlite_url: str) -> None:
    emulator = Emulator(conversations=200, seed=3, rate_limit=None)
    first_cursor: list[str] = []

    def repeat_cursor(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        body = json.loads(response.read())
        if "pagination" in body and body["pagination"]["cursor"]:
            first_cursor.append(first_cursor[0] if first_cursor else body["pagination"]["cursor"])
            body["pagination"]["cursor"] = first_cursor[0]
        return httpx.Response(response.status_code, json=body, headers=response.headers)

    client, _ = _paging_client(emulator, repeat_cursor)
    engine = open_engine(sqlite_url)
    ensure_schema(engine)
    with client, pytest.raises(PagingError, match="cursor again"):
        Syncer(engine, client, WhatsAppRule(), concurrency=1).run(SyncRequest(("demo-bot",)))
    engine.dispose()


def test_an_empty_page_that_is_not_the_last_is_followed_to_the_rest(sqlite_url: str) -> None:
    """v2 may answer a page with no records and a cursor: the sync follows it and misses nothing."""
    emulator = Emulator(conversations=120, seed=5, rate_limit=None)
    inner = EmulatorTransport(emulator)

    def handle(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        if params.get("include") != "summary" and "cursor" not in params:
            more = {"cursor": "empty-first", "hasMore": True, "total": None}
            return httpx.Response(200, json={"data": [], "pagination": more})
        if params.get("cursor") == "empty-first":
            del params["cursor"]
            request = httpx.Request("GET", request.url.copy_with(params=params), headers=request.headers)
        return inner.handle_request(request)

    client = ChatbaseV2Client(
        Secret("demo-key"),
        "http://emulator/api/v2",
        transport=httpx.MockTransport(handle),
        rate_limit=(1000, 1.0),
    )
    engine = open_engine(sqlite_url)
    ensure_schema(engine)
    with client:
        result = Syncer(engine, client, WhatsAppRule(), concurrency=2).run(SyncRequest(("demo-bot",)))
    engine.dispose()
    assert (result.inserted, result.quarantined) == (120, 0)
    assert_exact_v2(sqlite_url, emulator)


def test_records_whose_created_at_cannot_be_right_are_quarantined_and_the_rest_stored(
    database_url: str,
) -> None:
    """Chatbase filed them under a day; a ``createdAt`` of 0, or a year before the window, says another.
    One in milliseconds still names the right moment and is stored."""
    emulator = Emulator(conversations=150, seed=6, rate_limit=None)
    changes = [lambda t: 0, lambda t: t - 400 * 86400, lambda t: t * 1000]
    changed: list[str] = []

    def tamper(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        body = json.loads(response.read())
        if (
            request.url.params.get("include") != "summary"
            and body.get("data")
            and len(changed) < len(changes)
        ):
            first = body["data"][0]
            if first["id"] not in changed:
                first["createdAt"] = changes[len(changed)](first["createdAt"])
                changed.append(first["id"])
        return httpx.Response(response.status_code, json=body, headers=response.headers)

    client, _ = _paging_client(emulator, tamper)
    engine = open_engine(database_url)
    ensure_schema(engine)
    with client:
        result = Syncer(engine, client, WhatsAppRule(), concurrency=2).run(SyncRequest(("demo-bot",)))
    with engine.connect() as connection:
        kept = connection.execute(select(quarantine.c.conversation_id, quarantine.c.reason)).all()
    engine.dispose()
    stored = stored_conversations(database_url)
    assert (result.quarantined, result.inserted) == (2, 148)
    assert {conversation_id for conversation_id, _ in kept} == set(changed[:2])
    assert all("cannot be right" in reason for _, reason in kept)
    assert set(stored) == {r["id"] for r in emulator.all_export_records("demo-bot")} - set(changed[:2])
    in_ms = next(r for r in emulator.all_export_records("demo-bot") if r["id"] == changed[2])
    assert stored[changed[2]]["created_at"].timestamp() == pytest.approx(in_ms["createdAt"])
