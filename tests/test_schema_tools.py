"""The schema from a checkout: `alembic` works with the top-level alembic.ini, and the migrations build
exactly the tables chatsync declares (a migration forgotten or wrong fails `alembic check`)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import inspect, text

from chatsync.store.engine import (
    HEAD_REVISION,
    create_schema,
    current_revision,
    ensure_schema,
    head_revision,
    open_engine,
    upgrade,
)

ROOT = Path(__file__).resolve().parents[1]


def _alembic(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CHATSYNC_DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_alembic_upgrade_head_from_a_checkout_builds_what_the_tables_declare(database_url: str) -> None:
    upgraded = _alembic(database_url, "upgrade", "head")
    assert upgraded.returncode == 0, upgraded.stderr
    engine = open_engine(database_url)
    try:
        assert current_revision(engine) == head_revision()
        assert "conversations" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    checked = _alembic(database_url, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "No new upgrade operations detected" in checked.stdout + checked.stderr


def test_the_head_revision_chatsync_checks_without_alembic_is_alembics_head() -> None:
    """Commands compare the database with HEAD_REVISION to skip loading Alembic; a new migration must move it."""
    from chatsync.store.engine import HEAD_REVISION

    assert head_revision() == HEAD_REVISION


def _schema(engine: Any) -> dict[str, Any]:
    """Every table as the database describes it: columns with types, keys, indexes and constraints."""
    seen = inspect(engine)
    dialect = engine.dialect
    tables: dict[str, Any] = {}
    for name in sorted(seen.get_table_names()):
        tables[name] = {
            # by name: a migration adds a column at the end, create_all where the table declares it
            "columns": sorted(
                (c["name"], c["type"].compile(dialect=dialect), c["nullable"], str(c.get("default")))
                for c in seen.get_columns(name)
            ),
            "primary_key": seen.get_pk_constraint(name)["constrained_columns"],
            "foreign_keys": sorted(
                (tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                for f in seen.get_foreign_keys(name)
            ),
            "indexes": sorted(
                (i["name"], tuple(str(c) for c in i["column_names"]), bool(i["unique"]))
                for i in seen.get_indexes(name)
            ),
            "unique": sorted(tuple(u["column_names"]) for u in seen.get_unique_constraints(name)),
            "checks": sorted(" ".join(c["sqltext"].split()) for c in seen.get_check_constraints(name)),
            "without_rowid": _without_rowid(engine, name),
        }
    return tables


def _without_rowid(engine: Any, table: str) -> bool:
    """SQLite: whether the table is WITHOUT ROWID (SQLAlchemy's inspector does not say)."""
    if engine.dialect.name != "sqlite":
        return False
    with engine.connect() as connection:
        sql = connection.execute(text("SELECT sql FROM sqlite_master WHERE name = :t"), {"t": table}).scalar()
    return "WITHOUT ROWID" in " ".join(str(sql).upper().split())


def _wipe(engine: Any, database_url: str) -> None:
    if database_url.startswith("sqlite"):
        engine.dispose()
        Path(engine.url.database).unlink()
        return
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))


def test_a_new_database_gets_the_tables_the_migrations_build_and_their_revision(database_url: str) -> None:
    """A first run creates the head schema directly (Alembic's create_all-then-stamp recipe); it must be
    table for table what running every migration builds, and later upgrades must start from it."""
    engine = open_engine(database_url)
    try:
        upgrade(engine)
        migrated = _schema(engine)
        _wipe(engine, database_url)
        ensure_schema(engine)
        created = _schema(engine)
        assert "conversations" in created
        assert created == migrated
        rollups = ("report_hours", "report_values", "report_users")
        assert all(created[t]["without_rowid"] for t in rollups) == (engine.dialect.name == "sqlite")
        assert current_revision(engine) == HEAD_REVISION
        assert create_schema(engine) is False  # a database with chatsync's tables is left to Alembic
    finally:
        engine.dispose()
    checked = _alembic(database_url, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "No new upgrade operations detected" in checked.stdout + checked.stderr


def _ensure_schema_together(engines: list[Any]) -> list[BaseException]:
    """``ensure_schema`` on each engine from its own thread, all released at once; what they raised."""
    start = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def run(engine: Any) -> None:
        start.wait()
        try:
            ensure_schema(engine)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_first_runs_at_the_same_time_create_the_schema_once(database_url: str) -> None:
    engines = [open_engine(database_url) for _ in range(4)]
    errors = _ensure_schema_together(engines)
    try:
        assert errors == []
        assert current_revision(engines[0]) == HEAD_REVISION
        with engines[0].connect() as connection:
            versions = connection.execute(text("SELECT count(*) FROM alembic_version")).scalar_one()
        assert versions == 1
    finally:
        for engine in engines:
            engine.dispose()


def test_first_runs_on_a_new_sqlite_file_all_open_it(tmp_path: Path) -> None:
    """Four first runs opening one new SQLite file together: each switches it to WAL, and SQLite refused
    all but one at once ("database is locked", no busy wait) in about one round in six. Twenty rounds
    would all pass by luck about once in thirty."""
    for round_number in range(20):
        url = f"sqlite:///{tmp_path / f'round-{round_number}.db'}"
        engines = [open_engine(url) for _ in range(4)]
        errors = _ensure_schema_together(engines)
        try:
            assert errors == [], f"round {round_number}"
            assert current_revision(engines[0]) == HEAD_REVISION
        finally:
            for engine in engines:
                engine.dispose()


def test_runs_started_together_after_an_update_of_chatsync_upgrade_the_schema_once(database_url: str) -> None:
    """After an update of chatsync, cron's sync and the API start together on a database one migration
    behind: the first takes the upgrade, the others wait for it and find the schema current. On SQLite
    each used to run the migrations itself ("table leads already exists")."""
    from alembic import command

    from chatsync.store.engine import _alembic_config

    for round_number in range(5):
        setup = open_engine(database_url)
        with setup.begin() as connection:
            command.upgrade(_alembic_config(connection), "0005")
        setup.dispose()
        engines = [open_engine(database_url) for _ in range(4)]
        errors = _ensure_schema_together(engines)
        try:
            assert errors == [], f"round {round_number}"
            assert current_revision(engines[0]) == HEAD_REVISION
            with engines[0].begin() as connection:
                command.downgrade(_alembic_config(connection), "base")  # the next round starts from 0005
        finally:
            for engine in engines:
                engine.dispose()


def test_the_rollups_keep_their_rows_through_migration_0008_down_and_up(sqlite_url: str) -> None:
    """0008 rebuilds SQLite's three rollup tables WITHOUT ROWID (and back, downgraded), copying every row."""
    engine = open_engine(sqlite_url)
    try:
        ensure_schema(engine)
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO report_values VALUES ('bot', '', 'country', 'Hong Kong', 3)")
            )
            connection.execute(text("INSERT INTO report_users VALUES ('bot', '', 'k1', 2)"))
        shapes = []
        for step in (("downgrade", "0007"), ("upgrade", "head")):
            done = _alembic(sqlite_url, *step)
            assert done.returncode == 0, done.stderr
            with engine.connect() as connection:
                rows = (
                    connection.execute(text("SELECT * FROM report_values")).all(),
                    connection.execute(text("SELECT * FROM report_users")).all(),
                )
            assert rows == ([("bot", "", "country", "Hong Kong", 3)], [("bot", "", "k1", 2)])
            shapes.append(
                [_without_rowid(engine, t) for t in ("report_hours", "report_values", "report_users")]
            )
        assert shapes == [[False] * 3, [True] * 3]
    finally:
        engine.dispose()
