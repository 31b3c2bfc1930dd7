"""`chatsync sync` against the emulator over loopback, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from chatsync.store.engine import ensure_schema, open_engine
from chatsync.store.tables import conversations, quarantine
from tests.conftest import chatbase_env
from tests.helpers import assert_exact, stored_conversations


def _summary(result: Any) -> dict[str, Any]:
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def test_sync_stores_exactly_what_chatbase_serves_and_a_rerun_changes_nothing(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    server = emulator_factory(conversations=5000, seed=7)
    env = chatbase_env(server, database_url)

    first = cli("sync", "--json", env=env)
    assert first.exit_code == 0, first.stderr
    summary = _summary(first)
    assert summary["status"] == "ok"
    assert summary["inserted"] == 5000
    assert summary["fetched"] == (
        summary["inserted"] + summary["updated"] + summary["unchanged"] + summary["quarantined"]
    )
    assert_exact(database_url, server.emulator)

    second = _summary(cli("sync", "--json", env=env))
    assert (second["inserted"], second["updated"]) == (0, 0)
    assert second["unchanged"] == second["fetched"] > 0
    # the rerun fetches only the lookback (3 days and today), not the history
    assert second["requests"] < summary["requests"] / 5


def test_hashes_written_before_v2_still_tell_unchanged_conversations_from_changed_ones(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    """A database synced by a chatsync older than the v2 content hash: its hashes are compared by their own
    algorithm, so the first sync after an upgrade rewrites only what changed."""
    server = emulator_factory(conversations=800, seed=11)
    env = chatbase_env(server, database_url)
    assert _summary(cli("sync", "--json", env=env))["inserted"] == 800
    engine = open_engine(database_url)
    try:
        with engine.begin() as connection:
            rows = connection.execute(
                select(conversations.c.id, conversations.c.raw, conversations.c.messages)
            )
            legacy = {}
            for row in rows:
                # The pre-v2 hash, written here from its definition: the standard library's sorted compact
                # JSON of the stored record, SHA-256, the first 32 hex digits.
                text = json.dumps(
                    {**row.raw, "messages": row.messages},
                    sort_keys=True,
                    ensure_ascii=False,
                    separators=(",", ":"),
                )
                legacy[row.id] = hashlib.sha256(text.encode()).hexdigest()[:32]
            newest = connection.execute(
                select(conversations.c.id).order_by(conversations.c.created_at.desc()).limit(1)
            ).scalar_one()
            legacy[newest] = "0" * 32  # a hash no content has: this one must be rewritten
            for conversation_id, digest in legacy.items():
                connection.execute(
                    update(conversations)
                    .where(conversations.c.id == conversation_id)
                    .values(content_hash=digest)
                )
    finally:
        engine.dispose()

    again = _summary(cli("sync", "--json", env=env))
    assert again["fetched"] > 1
    assert (again["inserted"], again["updated"]) == (0, 1)
    assert again["unchanged"] == again["fetched"] - 1
    stored = stored_conversations(database_url)
    assert stored[newest]["content_hash"].startswith("v2")
    assert sum(1 for r in stored.values() if r["content_hash"] == legacy[r["id"]]) == 799
    assert_exact(database_url, server.emulator)


def test_messages_appended_within_the_lookback_are_picked_up(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    server = emulator_factory(conversations=600, seed=3, days=30)
    env = chatbase_env(server, database_url)
    assert cli("sync", "--json", env=env).exit_code == 0

    emulator = server.emulator
    dataset = emulator.datasets["demo-bot"]
    recent = dataset.conversation_id(dataset.count - 5)  # created within the last day
    old = dataset.conversation_id(10)  # created ~30 days ago, outside the lookback
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    for conversation_id in (recent, old):
        emulator.append_messages(
            conversation_id, [{"role": "user", "content": "one more thing", "createdAt": later}]
        )

    summary = _summary(cli("sync", "--json", env=env))
    assert summary["updated"] == 1
    stored = stored_conversations(database_url)
    assert stored[recent]["messages"][-1]["content"] == "one more thing"
    assert stored[old]["messages"][-1]["content"] != "one more thing"

    # --full ignores checkpoints and fetches the old one too
    summary = _summary(cli("sync", "--json", "--full", env=env))
    assert summary["updated"] == 1
    assert_exact(database_url, emulator)


def test_every_planted_whatsapp_number_is_stored_with_its_source(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    server = emulator_factory(conversations=1500, seed=11)
    assert cli("sync", "--json", env=chatbase_env(server, database_url)).exit_code == 0
    stored = stored_conversations(database_url)
    planted = server.emulator.planted("demo-bot")
    mismatches = [
        (cid, truth, stored[cid]["whatsapp_number"], stored[cid]["whatsapp_source"])
        for cid, truth in planted.items()
        if (stored[cid]["whatsapp_number"], stored[cid]["whatsapp_source"]) != (truth.number, truth.source)
    ]
    assert mismatches == []
    assert any(t.source == "form" for t in planted.values())
    assert any(t.source == "extracted" for t in planted.values())
    assert any(t.number is None for t in planted.values())


def test_manual_number_survives_resync_and_auto_restores_extraction(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    server = emulator_factory(conversations=300, seed=5, days=2)
    env = chatbase_env(server, database_url)
    assert cli("sync", "--json", env=env).exit_code == 0
    planted = server.emulator.planted("demo-bot")
    target = next(cid for cid, truth in planted.items() if truth.source == "extracted")
    cleared = next(cid for cid, truth in planted.items() if truth.source == "extracted" and cid != target)

    assert cli("set-whatsapp", target, "+852 6123 4567", "--by", "alice", env=env).exit_code == 0
    assert cli("set-whatsapp", cleared, "--clear", "--by", "bob", env=env).exit_code == 0
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    for cid in (target, cleared):
        server.emulator.append_messages(cid, [{"role": "user", "content": "9876 5432", "createdAt": later}])
    assert _summary(cli("sync", "--json", "--full", env=env))["updated"] == 2

    stored = stored_conversations(database_url)
    assert (stored[target]["whatsapp_number"], stored[target]["whatsapp_source"]) == (
        "+85261234567",
        "manual",
    )
    assert (stored[cleared]["whatsapp_number"], stored[cleared]["whatsapp_source"]) == (None, "manual")

    assert cli("set-whatsapp", target, "--auto", "--by", "alice", env=env).exit_code == 0
    assert _summary(cli("sync", "--json", env=env))["status"] == "ok"
    stored = stored_conversations(database_url)
    assert (stored[target]["whatsapp_number"], stored[target]["whatsapp_source"]) == (
        planted[target].number,
        "extracted",
    )
    shown = json.loads(cli("show", target, "--format", "json", env=env).stdout)
    assert [(a["by"], a["new_source"]) for a in shown["whatsapp_audit"]] == [
        ("alice", "manual"),
        ("alice", "extracted"),
    ]


def test_bad_records_are_quarantined_with_reasons_and_the_rest_is_stored(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    server = emulator_factory(conversations=500, seed=2, bad_records=5)
    summary = _summary(cli("sync", "--json", env=chatbase_env(server, database_url)))
    assert summary["status"] == "ok"
    assert summary["quarantined"] == 5
    assert summary["inserted"] == 495
    assert_exact(database_url, server.emulator)
    engine = open_engine(database_url)
    with engine.connect() as connection:
        reasons = sorted(connection.execute(select(quarantine.c.reason)).scalars())
    engine.dispose()
    assert len(reasons) == 5
    joined = " | ".join(reasons)
    for fragment in ("no id", "not a list", "not an object", "characters (limit", "unparsable created_at"):
        assert fragment in joined
    # a second run quarantines the same records again without piling up rows
    assert (
        _summary(cli("sync", "--json", "--full", env=chatbase_env(server, database_url)))["quarantined"] == 5
    )
    engine = open_engine(database_url)
    with engine.connect() as connection:
        assert len(connection.execute(select(quarantine.c.id)).all()) == 5
    engine.dispose()


@pytest.mark.parametrize("source", ["whatsapp", "Widget or Iframe"])
def test_source_filter_fetches_only_that_source(
    cli: Any, emulator_factory: Any, sqlite_url: str, source: str
) -> None:
    server = emulator_factory(conversations=400, seed=4)
    result = cli("sync", "--json", "--source", source, env=chatbase_env(server, sqlite_url))
    assert result.exit_code == 0, result.stderr
    stored = stored_conversations(sqlite_url)
    expected = {
        raw["id"]
        for raw in server.emulator.all_conversations("demo-bot")
        if (raw.get("source") or "").lower() == source.lower()
    }
    assert set(stored) == expected


def test_since_and_until_limit_to_whole_utc_days(cli: Any, emulator_factory: Any, sqlite_url: str) -> None:
    server = emulator_factory(conversations=900, seed=8, days=30)
    today = datetime.now(UTC).date()
    since, until = today - timedelta(days=20), today - timedelta(days=10)
    args = ("sync", "--json", "--since", since.isoformat(), "--until", until.isoformat())
    assert cli(*args, env=chatbase_env(server, sqlite_url)).exit_code == 0
    stored = stored_conversations(sqlite_url)
    expected = {
        raw["id"]
        for raw in server.emulator.all_conversations("demo-bot")
        if since.isoformat() <= raw["created_at"][:10] <= until.isoformat()
    }
    assert stored and set(stored) == expected


def test_the_sqlite_file_alone_holds_the_sync_once_the_command_has_exited(
    emulator_factory: Any, tmp_path: Path
) -> None:
    """The command closes its connections before it exits (it skips the collections at exit), so SQLite
    folds the write-ahead log into the file: a copy of the file alone has every conversation."""
    server = emulator_factory(conversations=300, seed=5)
    database = tmp_path / "chatsync.db"
    env = {**os.environ, **chatbase_env(server, f"sqlite:///{database}")}
    done = subprocess.run(
        [sys.executable, "-m", "chatsync", "sync", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not Path(f"{database}-wal").exists()
    copy = tmp_path / "copy.db"
    shutil.copyfile(database, copy)
    with sqlite3.connect(copy) as connection:
        assert connection.execute("SELECT count(*) FROM conversations").fetchone() == (300,)


def test_rows_the_database_refuses_are_quarantined_and_every_other_page_of_their_batch_is_saved(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    """The writer saves the pages already read together, in one transaction. When the database refuses
    a row (here a constraint of the operator's own), the batch is written again a page at a time and the
    refusing page row by row: the refused conversations are quarantined with the database's reason,
    every other conversation is stored once, and the days are recorded (a rerun fetches only the
    lookback, and the refused ones are still refused and still quarantined, once each)."""
    server = emulator_factory(conversations=3000, seed=11)
    ids = [raw["id"] for raw in server.emulator.all_conversations("demo-bot")]
    refused = {ids[150], ids[1500], ids[1501], ids[2950]}  # pages far apart, and two on one page
    engine = open_engine(database_url)
    try:
        ensure_schema(engine)
        listed = ", ".join(f"'{i}'" for i in sorted(refused))
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                connection.exec_driver_sql(
                    f"ALTER TABLE conversations ADD CONSTRAINT refused_for_the_test CHECK (id NOT IN ({listed}))"
                )
            else:
                connection.exec_driver_sql(
                    "CREATE TRIGGER refused_for_the_test BEFORE INSERT ON conversations "
                    f"WHEN NEW.id IN ({listed}) BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"
                )
    finally:
        engine.dispose()
    env = chatbase_env(server, database_url)
    first = cli("sync", "--json", env=env)
    assert first.exit_code == 0, first.stderr
    summary = _summary(first)
    assert (summary["inserted"], summary["quarantined"]) == (3000 - len(refused), len(refused))
    stored = stored_conversations(database_url)
    assert set(stored) == set(ids) - refused
    engine = open_engine(database_url)
    try:
        with engine.connect() as connection:
            kept = connection.execute(select(quarantine.c.record_key, quarantine.c.reason)).all()
    finally:
        engine.dispose()
    assert sorted(key for key, _ in kept) == sorted(refused)
    assert all(reason.startswith("database refused it: ") for _, reason in kept)
    second = _summary(cli("sync", "--json", env=env))
    assert second["requests"] < summary["requests"] / 5  # the days were recorded as fetched
    assert set(stored_conversations(database_url)) == set(ids) - refused
