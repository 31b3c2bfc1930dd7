"""GET /api/events: ids and resume, nothing dropped, one change feed per process, capped and freed streams.

The load tests run a real uvicorn server in a thread and real HTTP clients; the database is real SQLite
and PostgreSQL; the changes come from the same writers a sync, set-whatsapp and the API use.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from chatsync.config import Secret, WhatsAppRule
from chatsync.normalize import normalize_conversation
from chatsync.store import writes
from chatsync.store.access import grant
from chatsync.store.queries import set_whatsapp
from chatsync.web.app import create_app
from tests.api_helpers import api_settings, bearer, conversation, parse_sse, running_server, token

ADMIN = "user_admin"


def _upsert(engine: Any, ids: list[str], bot: str = "bot-a", reply: str = "9123 4567") -> None:
    rows = [normalize_conversation(conversation(cid, bot, reply), bot, WhatsAppRule()) for cid in ids]
    with engine.begin() as connection:
        writes.upsert_conversations(connection, rows, datetime.now(UTC))


def _read_until(lines: Any, done: Any) -> list[dict[str, Any]]:
    """Events from an iterator over a stream's lines, until ``done(events)`` is true."""
    block: list[str] = []
    events: list[dict[str, Any]] = []
    for line in lines:
        if line:
            block.append(line)
            continue
        events.extend(parse_sse("\n".join(block)))
        block = []
        if done(events):
            break
    return events


def _events(client: Any, headers: dict[str, str], when_connected: Any = None) -> list[dict[str, Any]]:
    """Every event of one stream (until its token expires); ``when_connected()`` runs once it listens."""
    lines = []
    with client.stream("GET", "/api/events", headers=headers) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            lines.append(line)
            if line == ": connected" and when_connected is not None:
                when_connected()
    return parse_sse("\n".join(lines))


def test_a_stream_resumed_with_last_event_id_gets_every_missed_event_once(engine: Any) -> None:
    _upsert(engine, ["c0"])
    app = create_app(engine, api_settings(engine, events_poll=timedelta(seconds=0.1)))
    with TestClient(app) as client:
        first = _events(
            client,
            bearer(token(sub=ADMIN, exp=int(time.time()) + 2)),
            lambda: _upsert(engine, ["c1", "c2", "c3"]),
        )
        changed = [e for e in first if e["event"] == "conversation.upserted"]
        assert [e["data"]["id"] for e in changed] == ["c1", "c2", "c3"]  # c0 was before it connected
        resume_after = changed[1]["id"]  # say the client saw c1 and c2, then lost its connection

        _upsert(engine, ["c4", "c5"])  # while nobody listens
        with engine.begin() as connection:
            set_whatsapp(
                connection, "c1", number="+85261234567", auto=False, by="user_a", now=datetime.now(UTC)
            )
        headers = {**bearer(token(sub=ADMIN, exp=int(time.time()) + 2)), "Last-Event-ID": resume_after}
        missed = _events(client, headers)
    changed = [e for e in missed if e["event"] == "conversation.upserted"]
    assert [e["data"]["id"] for e in changed] == ["c3", "c4", "c5", "c1"]  # every one, none twice
    ids = [int(e["id"]) for e in missed if "id" in e]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and min(ids) > int(resume_after)
    assert missed[-1]["event"] == "expired"


def test_a_resume_from_an_unknown_or_forgotten_position_says_reset(engine: Any) -> None:
    _upsert(engine, ["r1", "r2"])
    app = create_app(engine, api_settings(engine))
    with TestClient(app) as client:
        headers = {**bearer(token(sub=ADMIN, exp=int(time.time()) + 1)), "Last-Event-ID": "999999"}
        events = _events(client, headers)
        assert [e["event"] for e in events] == ["reset", "expired"]
        bad = client.get("/api/events", headers={**headers, "Last-Event-ID": "abc"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


def test_events_are_filtered_by_what_the_caller_may_see(engine: Any) -> None:
    with engine.begin() as connection:
        grant(connection, "bot-a", "user", "user_a", datetime.now(UTC))
    app = create_app(engine, api_settings(engine, events_poll=timedelta(seconds=0.1)))

    def write() -> None:
        _upsert(engine, ["mine"], bot="bot-a")
        _upsert(engine, ["theirs"], bot="bot-b")
        now = datetime.now(UTC)
        with engine.begin() as connection:  # runs: one of bot-a, one of bot-a with a chatbot not theirs
            for run_id, bots in (("run-a", ["bot-a"]), ("run-ab", ["bot-a", "bot-b"])):
                writes.start_run(connection, run_id, bots, now)
                writes.finish_run(connection, run_id, "ok", {"status": "ok", "fetched": 9}, None, now)

    with TestClient(app) as client:
        events = _events(client, bearer(token(exp=int(time.time()) + 2)), write)
    assert [(e["event"], e["data"].get("id") or e["data"].get("run_id")) for e in events] == [
        ("conversation.upserted", "mine"),
        ("sync.finished", "run-a"),  # a run that also synced bot-b carries bot-b's counts: not sent
        ("expired", None),
    ]


def test_streams_per_user_are_capped_and_a_closed_stream_frees_its_place(engine: Any) -> None:
    app = create_app(engine, api_settings(engine, events_per_user=2))
    headers = bearer(token(sub=ADMIN, exp=int(time.time()) + 30))
    with running_server(app) as base, httpx.Client(base_url=base, timeout=10) as client:
        with client.stream("GET", "/api/events", headers=headers) as one:
            assert one.status_code == 200
            with client.stream("GET", "/api/events", headers=headers) as two:
                assert two.status_code == 200
                third = client.get("/api/events", headers=headers)
                assert third.status_code == 429
                assert third.json()["error"]["code"] == "too_many_streams"
                other_user = client.get("/api/events", headers=bearer(token(exp=int(time.time()) + 1)))
                assert other_user.status_code == 200  # the cap is per user
        deadline = time.monotonic() + 10
        while app.state.feed.open_streams and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not app.state.feed.open_streams  # both places given back when the clients went
        with client.stream("GET", "/api/events", headers=headers) as again:
            assert again.status_code == 200


def test_a_keep_alive_comment_comes_while_nothing_changes(engine: Any, monkeypatch: Any) -> None:
    import fastapi.routing

    monkeypatch.setattr(fastapi.routing, "_PING_INTERVAL", 0.2)  # FastAPI's 15 s, shortened for the test
    app = create_app(engine, api_settings(engine))
    with (
        TestClient(app) as client,
        # the stream ends when the token expires: at least 2 s away, room for pings 0.2 s apart
        client.stream("GET", "/api/events", headers=bearer(token(sub=ADMIN, exp=int(time.time()) + 3))) as r,
    ):
        lines = list(r.iter_lines())
    assert ": ping" in lines


async def _open_and_drop(base: str, headers: dict[str, str], count: int) -> int:
    """Open ``count`` streams at once, wait until each is connected, then drop them all."""
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        connected = 0

        async def one() -> None:
            nonlocal connected
            async with client.stream("GET", "/api/events", headers=headers) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line == ": connected":
                        connected += 1
                        return  # leaving the block drops the connection

        await asyncio.gather(*(one() for _ in range(count)))
        return connected


def test_500_streams_opened_and_dropped_leave_the_api_answering(engine: Any) -> None:
    _upsert(engine, ["l1", "l2"])
    app = create_app(engine, api_settings(engine, events_per_user=1000))
    headers = bearer(token(sub=ADMIN, exp=int(time.time()) + 600))
    with running_server(app) as base:
        assert asyncio.run(_open_and_drop(base, headers, 500)) == 500
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}
            listed = client.get("/api/conversations", headers=headers)
            assert listed.status_code == 200 and [c["id"] for c in listed.json()["data"]] == ["l2", "l1"]
        deadline = time.monotonic() + 20
        while app.state.feed.open_streams and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not app.state.feed.open_streams  # every dropped stream ended and gave its place back


def test_a_thousand_streams_cost_one_change_log_query_per_interval(engine: Any) -> None:
    app = create_app(engine, api_settings(engine, events_per_user=1000, events_poll=timedelta(seconds=0.2)))
    headers = bearer(token(sub=ADMIN, exp=int(time.time()) + 600))
    feed = app.state.feed

    async def hold(base: str, count: int, seconds: float) -> tuple[int, int]:
        limits = httpx.Limits(max_connections=count + 10)
        async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
            ready = asyncio.Event()
            connected = 0

            async def one() -> None:
                nonlocal connected
                async with client.stream("GET", "/api/events", headers=headers) as response:
                    async for line in response.aiter_lines():
                        if line == ": connected":
                            connected += 1
                            if connected == count:
                                ready.set()
                            await asyncio.sleep(seconds + 5)
                            return

            tasks = [asyncio.create_task(one()) for _ in range(count)]
            await asyncio.wait_for(ready.wait(), 60)
            before = feed.polls
            await asyncio.sleep(seconds)
            after = feed.polls
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return before, after

    with running_server(app) as base:
        before, after = asyncio.run(hold(base, 1000, 1.0))
    # about five reads in that second (one per 0.2 s); a query per stream would be thousands
    assert 1 <= after - before < 100


def test_5000_conversations_changed_in_one_sync_reach_a_listening_stream_complete(
    engine: Any, emulator_factory: Any
) -> None:
    from sqlalchemy import select

    from chatsync.chatbase import ChatbaseClient
    from chatsync.store.tables import conversations
    from chatsync.sync import Syncer, SyncRequest

    server = emulator_factory(conversations=5000, seed=61)
    app = create_app(engine, api_settings(engine, api_key=Secret("demo-key"), base_url=server.base_url))
    headers = bearer(token(sub=ADMIN, exp=int(time.time()) + 600))
    received: set[str] = set()
    finished: list[dict[str, Any]] = []
    with (
        running_server(app) as base,
        httpx.Client(base_url=base, timeout=120) as http,
        http.stream("GET", "/api/events", headers=headers) as response,
    ):
        lines = response.iter_lines()
        assert next(line for line in lines if line == ": connected")
        with ChatbaseClient(Secret("demo-key"), server.base_url) as client:
            summary = Syncer(engine, client, WhatsAppRule()).run(SyncRequest(("demo-bot",)))
        assert summary.inserted == 5000
        events = _read_until(lines, lambda evs: any(e["event"] == "sync.finished" for e in evs))
    for event in events:
        if event["event"] == "conversation.upserted":
            assert event["data"]["id"] not in received, "an event came twice"
            received.add(event["data"]["id"])
        elif event["event"] == "sync.finished":
            finished.append(event["data"])
    with engine.connect() as connection:
        stored = set(connection.execute(select(conversations.c.id)).scalars())
    assert len(stored) == 5000 and received == stored
    assert [(f["status"], f["summary"]["inserted"]) for f in finished] == [("ok", 5000)]


@pytest.mark.postgres
def test_postgres_notify_wakes_the_feed_before_the_next_poll(postgres_url: str) -> None:
    from chatsync.store.engine import ensure_schema, open_engine

    engine = open_engine(postgres_url)
    ensure_schema(engine)
    try:
        # a poll every minute: an event that arrives at once came through LISTEN/NOTIFY
        app = create_app(engine, api_settings(engine, events_poll=timedelta(minutes=1)))
        with running_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
            headers = bearer(token(sub=ADMIN, exp=int(time.time()) + 600))
            with http.stream("GET", "/api/events", headers=headers) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line == ": connected")
                time.sleep(0.5)  # the feed's first read after this stream attached is done
                _upsert(engine, ["n1"])
                events = _read_until(lines, lambda evs: len(evs) >= 1)
        assert [e["data"]["id"] for e in events] == ["n1"]
        assert app.state.feed.notifications >= 1  # woken by NOTIFY, not by the minute's poll
    finally:
        engine.dispose()


def test_a_reader_following_seq_never_skips_a_change_appended_by_concurrent_writers(
    postgres_url: str,
) -> None:
    """PostgreSQL draws ``seq`` when a row is inserted, not when it commits: without the append lock held
    to the commit, a writer that drew a smaller ``seq`` and commits later is passed over by a reader that
    already moved its cursor beyond it. Four writers append and dawdle before committing while a reader
    follows the cursor; the reader must see every change that was committed."""
    import random
    import threading

    from sqlalchemy import func, select

    from chatsync.store import changes
    from chatsync.store.engine import ensure_schema, open_engine
    from chatsync.store.tables import changes as changes_table

    engine = open_engine(postgres_url)
    ensure_schema(engine)
    with engine.connect() as connection:
        start = connection.execute(select(func.coalesce(func.max(changes_table.c.seq), 0))).scalar_one()
    writing = threading.Barrier(4)
    done = threading.Event()
    seen: list[int] = []

    def writer(number: int) -> None:
        pick = random.Random(number)
        writing.wait()
        for batch in range(40):
            with engine.begin() as connection:
                items = [(f"w{number}-{batch}-{i}", "bot-a") for i in range(pick.randint(1, 3))]
                changes.record_conversations(connection, items, datetime.now(UTC))
                time.sleep(pick.random() * 0.004)  # commit a little later, as a page's commit does

    def reader() -> None:
        cursor = start
        while True:
            finished = done.is_set()
            with engine.connect() as connection:
                batch = changes.read_changes(connection, cursor, 1000)
            seen.extend(change.seq for change in batch)
            if batch:
                cursor = batch[-1].seq
            elif finished:
                return

    try:
        following = threading.Thread(target=reader)
        following.start()
        writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        done.set()
        following.join()
        with engine.connect() as connection:
            stored = (
                connection.execute(
                    select(changes_table.c.seq)
                    .where(changes_table.c.seq > start)
                    .order_by(changes_table.c.seq)
                )
                .scalars()
                .all()
            )
        assert len(stored) >= 4 * 40
        assert seen == list(stored)  # each once, in order, none passed over
    finally:
        engine.dispose()
