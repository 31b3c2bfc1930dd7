"""The report's rollups stay equal to the conversations through every kind of write.

An all-time report reads the rollups; a report with a window aggregates the conversations. Asking both
for the same set (all time vs. first day..last day) must give the same object, after syncs, changed
conversations, manual numbers and re-extraction, in zones with whole- and half-hour offsets.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from alembic import command
from sqlalchemy import inspect, select

from chatsync.analytics import report
from chatsync.chatbase_records import record_from_export
from chatsync.config import WhatsAppRule
from chatsync.emulator import Emulator
from chatsync.normalize import normalize_conversation
from chatsync.reextract import reextract
from chatsync.store import rollups
from chatsync.store.engine import _alembic_config, ensure_schema, open_engine
from chatsync.store.queries import ConversationFilter, get_conversation, set_whatsapp
from chatsync.store.tables import conversations
from chatsync.store.writes import AUTO_COLUMNS, DATA_COLUMNS, upsert_conversations
from tests.conftest import chatbase_env
from tests.helpers import rollup_snapshot

FILTERS = [
    ConversationFilter(),
    ConversationFilter(sources=("WhatsApp",)),
    ConversationFilter(sources=("Unspecified", "API")),
    ConversationFilter(chatbot_ids=("demo-bot",)),
    ConversationFilter(visible_chatbot_ids=()),
]


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _both_ways(engine: Any, filters: ConversationFilter, tz: str) -> dict[str, Any]:
    """All time from the rollups = the same set from the conversations alone = first..last day.

    A filter on "created since 1970" selects every conversation but is not one the rollups know, so
    that report is aggregated from the conversations only. The first..last day window takes its hourly
    figures from the rollups (in whole-hour zones) and its distributions from the conversations.
    """
    with engine.connect() as connection:
        via_rollups = report(connection, filters, tz=tz)
        via_rows = report(connection, replace(filters, created_from=EPOCH), tz=tz)
        days = via_rollups["by_day"]
        if days:
            since, until = date.fromisoformat(days[0]["date"]), date.fromisoformat(days[-1]["date"])
        else:
            since = until = date(2024, 1, 1)
        via_window = report(connection, filters, since, until, tz)
    assert (
        via_rollups.pop("window") == via_rows.pop("window") == {"since": None, "until": None, "timezone": tz}
    )
    via_window.pop("window")
    if not days:
        via_window["by_day"] = []  # an empty window still lists its one day
    # Leads count by their own time (a webhook's arrival), which may fall after the conversations' last day.
    via_window["whatsapp"]["leads"] = via_rows["whatsapp"]["leads"]
    assert via_rollups == via_rows
    assert via_window == via_rows
    if len(days) > 4:  # a window that starts and ends among the conversations
        inner = date.fromisoformat(days[2]["date"]), date.fromisoformat(days[-3]["date"])
        with engine.connect() as connection:
            assert report(connection, filters, *inner, tz) == report(
                connection, replace(filters, created_from=EPOCH), *inner, tz
            )
    return via_rollups


def _agree_everywhere(engine: Any) -> dict[str, Any]:
    for filters in FILTERS:
        for tz in ("UTC", "Asia/Hong_Kong", "Asia/Kolkata"):
            _both_ways(engine, filters, tz)
    # What every write kept up to date is exactly what a rebuild from the conversations gives.
    kept = rollup_snapshot(engine)
    with engine.begin() as connection:
        rollups.rebuild(connection)
    assert rollup_snapshot(engine) == kept
    return _both_ways(engine, ConversationFilter(), "UTC")


def test_rollups_follow_syncs_changes_manual_numbers_and_reextraction(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    server = emulator_factory(conversations=900, seed=17, days=20)
    env = chatbase_env(server, database_url)
    assert cli("sync", "--json", env=env).exit_code == 0
    engine = open_engine(database_url)
    first = _agree_everywhere(engine)
    assert first["conversations"] == 900 and first["users"] > 0

    # Conversations grow: counts, response times, outcome and the number can all change.
    emulator = server.emulator
    dataset = emulator.datasets["demo-bot"]
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    for index in range(0, 900, 7):
        emulator.append_messages(
            dataset.conversation_id(index),
            [
                {"role": "user", "content": "9123 4567", "createdAt": later},
                {"role": "assistant", "content": "Thanks, anything else?", "createdAt": later},
            ],
        )
    assert cli("sync", "--json", "--full", env=env).exit_code == 0
    grown = _agree_everywhere(engine)
    assert grown["messages"] == first["messages"] + 2 * len(range(0, 900, 7))

    # Support staff set, clear and hand back numbers.
    ids = [dataset.conversation_id(i) for i in (1, 2, 3, 4)]
    assert cli("set-whatsapp", ids[0], "6123 4567", env=env).exit_code == 0
    assert cli("set-whatsapp", ids[1], "--clear", env=env).exit_code == 0
    assert cli("set-whatsapp", ids[2], "+65 8123 4567", env=env).exit_code == 0
    assert cli("set-whatsapp", ids[2], "--auto", env=env).exit_code == 0
    assert cli("set-whatsapp", ids[3], "6123 4567", env=env).exit_code == 0  # same key as ids[0]
    manual = _agree_everywhere(engine)
    assert manual["whatsapp"]["manual"] == grown["whatsapp"]["manual"] + 3  # set, cleared, set

    # The rule changes and is applied again to what is stored.
    reextract(engine, WhatsAppRule(default_region="SG"))
    _agree_everywhere(engine)
    engine.dispose()


def test_rollups_follow_sender_numbers_and_leads_before_and_after_their_conversations(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    from fastapi.testclient import TestClient

    from chatsync.config import Secret
    from chatsync.emulator.webhooks import leads_submit
    from chatsync.web.app import create_app
    from tests.api_helpers import api_settings

    server = emulator_factory(conversations=600, seed=43, days=15, channel_customer=True)
    env = chatbase_env(server, database_url)
    engine = open_engine(database_url)
    ensure_schema(engine)
    api = TestClient(create_app(engine, api_settings(engine, chatbase_webhook_secret=Secret("s3cret"))))

    def deliver(lead: Any) -> str:
        body, headers = leads_submit(lead, "s3cret")
        return str(api.post("/api/webhooks/chatbase", content=body, headers=headers).json()["result"])

    leads = server.emulator.leads("demo-bot")
    assert {deliver(lead) for lead in leads[::2]} == {"pending", "stored"}  # before their conversations
    assert cli("sync", "--json", env=env).exit_code == 0
    assert {deliver(lead) for lead in leads[1::2]} == {"applied", "stored"}  # after
    data = _agree_everywhere(engine)
    wa = data["whatsapp"]
    assert wa["from_channel"] > 0 and wa["from_lead"] > 0 and wa["leads"] == len(leads)

    # A person takes over a lead's conversation and hands it back; the rule changes and runs again.
    with engine.connect() as connection:
        taken = (
            connection.execute(
                select(conversations.c.id).where(conversations.c.whatsapp_source == "lead").limit(2)
            )
            .scalars()
            .all()
        )
    for conversation_id in taken:
        assert cli("set-whatsapp", conversation_id, "6123 4567", env=env).exit_code == 0
    assert cli("set-whatsapp", taken[0], "--auto", env=env).exit_code == 0
    manual = _agree_everywhere(engine)["whatsapp"]
    assert (manual["from_lead"], manual["manual"]) == (wa["from_lead"] - 1, wa["manual"] + 1)
    reextract(engine, WhatsAppRule(default_region="SG"))
    _agree_everywhere(engine)
    engine.dispose()


def test_rollups_follow_v2_status_and_feedback_changes(engine: Any) -> None:
    """A person takes over ongoing conversations and users rate answers: the rewritten conversations move
    the takeover, status and feedback counters, which stay equal to a recomputation from scratch."""
    emulator = Emulator(conversations=500, seed=53, days=12, rate_limit=None)
    records = emulator.all_export_records("demo-bot")

    def store(batch: list[dict[str, Any]]) -> None:
        rows = [normalize_conversation(record_from_export(r), "demo-bot", WhatsAppRule()) for r in batch]
        for start in range(0, len(rows), 20):
            with engine.begin() as connection:
                upsert_conversations(connection, rows[start : start + 20], datetime.now(UTC))

    store(records)
    before = _agree_everywhere(engine)
    ongoing = [r for r in records if r["status"] == "ongoing"][:40]
    changed = []
    for record in ongoing:
        messages = [dict(m) for m in record["messages"]]
        answers = [m for m in messages if m["role"] == "assistant" and m.get("feedback") is None]
        for message in answers[:1]:
            message["feedback"] = "negative"
        changed.append({**record, "status": "taken_over", "messages": messages})
    store(changed)
    after = _agree_everywhere(engine)
    rated = sum(
        1
        for r in ongoing
        if any(m["role"] == "assistant" and m.get("feedback") is None for m in r["messages"])
    )
    assert after["by_status"]["ongoing"] == before["by_status"]["ongoing"] - 40
    assert after["by_status"]["taken_over"] == before["by_status"]["taken_over"] + 40
    assert after["takeover_rate"] == round(after["by_status"]["taken_over"] / 500, 4)
    assert (
        after["feedback"]["rated_down"]
        == before["feedback"]["rated_down"] + rated
        > before["feedback"]["rated_down"]
    )
    assert after["feedback"]["answers"] == before["feedback"]["answers"]


def test_a_conversation_chatbase_moves_to_another_hour_leaves_no_empty_hour_behind(engine: Any) -> None:
    """Chatbase corrects a conversation's creation time: its old hour's counters fall to zero and that
    hour's row goes (the same rollups a rebuild gives), on SQLite's and PostgreSQL's own write paths."""
    emulator = Emulator(conversations=200, seed=61, days=30, rate_limit=None)
    rows = [
        normalize_conversation(r, "demo-bot", WhatsAppRule()) for r in emulator.all_conversations("demo-bot")
    ]
    with engine.begin() as connection:
        upsert_conversations(connection, rows, datetime.now(UTC))
    hours_before = {row[2] for row in rollup_snapshot(engine)["report_hours"]}
    moved = dict(rows[0])
    moved["created_at"] = moved["created_at"] - timedelta(days=400)  # an hour no other conversation has
    moved["content_hash"] = "moved"
    with engine.begin() as connection:
        upsert_conversations(connection, [moved], datetime.now(UTC))
    _agree_everywhere(engine)
    hours_after = {row[2] for row in rollup_snapshot(engine)["report_hours"]}
    assert len(hours_after) == len(hours_before)  # one hour gone, one new
    assert hours_after != hours_before


def test_an_empty_database_reports_zeros_from_the_rollups(engine: Any) -> None:
    data = _both_ways(engine, ConversationFilter(), "UTC")
    assert data["conversations"] == 0 and data["by_day"] == [] and data["users"] == 0


def test_upgrading_a_database_fills_the_rollups_from_its_conversations(
    database_url: str, emulator_factory: Any
) -> None:
    """A database made before the rollups existed gets them, exact, from `chatsync db upgrade`."""
    server = emulator_factory(conversations=400, seed=5, days=10)
    rows = [
        normalize_conversation(raw, "demo-bot", WhatsAppRule())
        for raw in server.emulator.all_conversations("demo-bot")
    ]
    now = datetime.now(UTC)
    engine = open_engine(database_url)
    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), "0002")
        then = {column["name"] for column in inspect(connection).get_columns("conversations")}
        stored = [
            {
                "id": r["id"],
                **{k: r[k] for k in DATA_COLUMNS},
                **{k: r[a] for k, a in AUTO_COLUMNS.items()},
                "first_synced_at": now,
                "synced_at": now,
            }
            for r in rows
        ]
        connection.execute(
            conversations.insert(), [{k: v for k, v in row.items() if k in then} for row in stored]
        )
    ensure_schema(engine)
    data = _both_ways(engine, ConversationFilter(), "Asia/Hong_Kong")
    assert data["conversations"] == 400
    engine.dispose()


@pytest.mark.parametrize("tz", ["Asia/Kathmandu", "America/St_Johns"])
def test_zones_with_part_hour_offsets_place_conversations_in_their_local_hour(engine: Any, tz: str) -> None:
    """UTC hours straddle local hours in +05:45 or -03:30, so those zones read hours from conversations."""
    raws = [
        {
            "id": f"c{i}",
            "created_at": f"2024-05-01T{h:02d}:{m:02d}:00Z",
            "messages": [{"role": "user", "content": "hi"}],
        }
        for i, (h, m) in enumerate([(0, 5), (0, 20), (0, 50), (23, 59)])
    ]
    with engine.begin() as connection:
        upsert_conversations(
            connection, [normalize_conversation(r, "bot", WhatsAppRule()) for r in raws], datetime.now(UTC)
        )
    data = _both_ways(engine, ConversationFilter(), tz)
    starts = [
        datetime.fromisoformat(r["created_at"].replace("Z", "+00:00")).astimezone(ZoneInfo(tz)) for r in raws
    ]
    for weekday in range(7):
        for hour in range(24):
            want = sum(1 for s in starts if s.weekday() == weekday and s.hour == hour)
            assert data["by_weekday_hour"][weekday][hour] == want


def test_rebuild_rollups_repairs_conversations_changed_by_hand(cli: Any, engine: Any) -> None:
    """Someone edits a row with plain SQL: the rollups are stale until `chatsync db rebuild-rollups`."""
    raws = [
        {"id": f"c{i}", "created_at": f"2024-05-0{1 + i % 3}T10:00:00Z", "source": "API", "messages": []}
        for i in range(6)
    ]
    with engine.begin() as connection:
        upsert_conversations(
            connection, [normalize_conversation(r, "bot", WhatsAppRule()) for r in raws], datetime.now(UTC)
        )
        connection.execute(conversations.update().where(conversations.c.id == "c0").values(country="SG"))
    with engine.connect() as connection:
        assert "SG" not in report(connection, ConversationFilter())["by_country"]
    url = engine.url.render_as_string(hide_password=False)
    result = cli("--database-url", url, "db", "rebuild-rollups")
    assert result.exit_code == 0 and "6 conversations" in result.stderr
    assert _both_ways(engine, ConversationFilter(), "UTC")["by_country"] == {"Unknown": 5, "SG": 1}


def test_a_sync_page_and_a_manual_number_on_the_same_conversation_both_commit(engine: Any) -> None:
    """Writers lock conversations before rollup rows, so these two wait for each other, never in a cycle.

    Support staff hold conversation c0 (as set-whatsapp does) while a sync page changes c0 and adds c1,
    which shares c0's rollup rows; then staff finish. On PostgreSQL the page waits for c0 first, holding
    nothing; with rollups written before c0 it would hold them and the database would abort one side.
    """
    raw = {"id": "c0", "created_at": "2024-05-01T10:00:00Z", "source": "API", "messages": []}
    rule = WhatsAppRule()
    with engine.begin() as connection:
        upsert_conversations(connection, [normalize_conversation(raw, "bot", rule)], datetime.now(UTC))
    grown = {**raw, "messages": [{"role": "user", "content": "hello"}]}
    added = {**raw, "id": "c1"}
    page_error: list[BaseException] = []

    def sync_page() -> None:
        try:
            with engine.begin() as connection:
                rows = [normalize_conversation(r, "bot", rule) for r in (grown, added)]
                upsert_conversations(connection, rows, datetime.now(UTC))
        except BaseException as exc:  # reported to the test's thread below
            page_error.append(exc)

    with engine.begin() as staff:
        staff.execute(select(conversations.c.id).where(conversations.c.id == "c0").with_for_update())
        page = threading.Thread(target=sync_page)
        page.start()
        page.join(timeout=1.0)  # the page is now waiting (PostgreSQL) or queued behind the writer (SQLite)
        set_whatsapp(staff, "c0", number="+85291234567", auto=False, by="staff", now=datetime.now(UTC))
    page.join(timeout=60)
    assert not page.is_alive() and page_error == []
    data = _both_ways(engine, ConversationFilter(), "UTC")
    assert data["conversations"] == 2 and data["messages"] == 1 and data["whatsapp"]["manual"] == 1


def test_showing_a_conversation_does_not_wait_for_a_writer(engine: Any) -> None:
    """Only writers lock before reading: `show` during a sync page answers at once, on SQLite too."""
    raw = {"id": "c0", "created_at": "2024-05-01T10:00:00Z", "source": "API", "messages": []}
    with engine.begin() as connection:
        upsert_conversations(
            connection, [normalize_conversation(raw, "bot", WhatsAppRule())], datetime.now(UTC)
        )
    with engine.begin() as writer:
        writer.execute(conversations.update().where(conversations.c.id == "c0").values(country="SG"))
        with engine.connect() as reader:
            reader.exec_driver_sql(
                "PRAGMA busy_timeout = 100" if engine.dialect.name == "sqlite" else "SET lock_timeout = 100"
            )
            shown = get_conversation(reader, "c0")
    assert shown["id"] == "c0" and shown["country"] is None  # the writer has not committed yet


@pytest.mark.parametrize(
    "created",
    [
        datetime(2024, 3, 5, 7, 8, 9, tzinfo=UTC),  # no microseconds: still written with six zeros
        datetime(2024, 3, 5, 7, 8, 9, 120, tzinfo=UTC),
        datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # a year of three digits
        datetime(2024, 3, 5, 7, 8, 9, 5),  # naive
    ],
)
def test_the_bulk_load_stores_a_time_as_sqlalchemys_own_insert_does(engine: Any, created: datetime) -> None:
    """A conversation the sync bulk-loads (the driver given text) and the same one inserted through
    SQLAlchemy hold the same stored time, so range filters and keys see them alike."""
    emulator = Emulator(conversations=2, seed=7, days=3, rate_limit=None)
    first, second = (
        normalize_conversation(r, "demo-bot", WhatsAppRule()) for r in emulator.all_conversations("demo-bot")
    )
    now = datetime.now(UTC)
    with engine.begin() as connection:
        upsert_conversations(connection, [{**first, "created_at": created}], now)
        stored = {
            "id": second["id"],
            **{c: second[c] for c in DATA_COLUMNS},
            **{c: second[a] for c, a in AUTO_COLUMNS.items()},
            "created_at": created,
            "first_synced_at": now,
            "synced_at": now,
        }
        connection.execute(conversations.insert(), stored)
        text_of = "CAST(created_at AS TEXT)" if engine.dialect.name == "sqlite" else "created_at::text"
        times = connection.exec_driver_sql(
            f"SELECT {text_of}, CAST(synced_at AS TEXT) FROM conversations ORDER BY id = '{first['id']}'"
        ).all()
    assert times[0] == times[1]
