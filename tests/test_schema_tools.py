"""The schema from a checkout: `alembic` works with the top-level alembic.ini, and the migrations build
exactly the tables chatsync declares (a migration forgotten or wrong fails `alembic check`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import inspect

from chatsync.store.engine import current_revision, head_revision, open_engine

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
