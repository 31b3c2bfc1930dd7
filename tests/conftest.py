"""Fixtures: real SQLite and PostgreSQL databases, the Chatbase emulator, and the CLI in-process.

PostgreSQL tests use ``CHATSYNC_TEST_POSTGRES_URL`` (default: the local server as postgres, database
test), create a fresh database each and drop it afterwards. On a laptop without PostgreSQL they skip with
the reason; under CI (``CI=true``) an unreachable server is an error, never a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from typer.testing import CliRunner

from chatsync.emulator import Emulator, RunningEmulator, serve_in_thread

POSTGRES_ADMIN_URL = os.environ.get("CHATSYNC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
_postgres_problem: str | None = None
_postgres_checked = False


def _postgres_available() -> str | None:
    """None when the test server answers, else why not."""
    global _postgres_checked, _postgres_problem
    if not _postgres_checked:
        _postgres_checked = True
        try:
            import psycopg

            with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
                pass
        except Exception as exc:
            _postgres_problem = f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable ({type(exc).__name__})"
    return _postgres_problem


def _require_postgres() -> None:
    problem = _postgres_available()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"{problem}; CI must run the PostgreSQL tests")
        pytest.skip(f"{problem}; set CHATSYNC_TEST_POSTGRES_URL to run them")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    _require_postgres()
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"chatsync_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path / 'chatsync.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """Each test using this runs twice: on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'chatsync.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


@pytest.fixture
def engine(database_url: str) -> Iterator[Any]:
    from chatsync.store.engine import ensure_schema, open_engine

    eng = open_engine(database_url)
    ensure_schema(eng)
    yield eng
    eng.dispose()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No developer's .env or Chatbase variables leak into a test."""
    monkeypatch.chdir(tmp_path)
    for variable in list(os.environ):
        if variable.startswith(("CHATBASE_", "CHATSYNC_")) and variable != "CHATSYNC_TEST_POSTGRES_URL":
            monkeypatch.delenv(variable)
        if variable == "DATABASE_URL":
            monkeypatch.delenv(variable)
    monkeypatch.setenv("CHATSYNC_DATABASE_URL", f"sqlite:///{tmp_path / 'default.db'}")


@pytest.fixture
def emulator_factory() -> Iterator[Any]:
    """Start emulators over loopback; every one is stopped after the test."""
    running: list[RunningEmulator] = []

    def start(**kwargs: Any) -> RunningEmulator:
        kwargs.setdefault("rate_limit", None)
        server = serve_in_thread(Emulator(**kwargs))
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``chatsync ARGS`` in-process with extra environment variables."""
    from chatsync.cli import app

    def run(*args: str, env: dict[str, str] | None = None) -> CliResult:
        runner = CliRunner()
        result = runner.invoke(app, list(args), env=env or {}, catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


def chatbase_env(server: RunningEmulator, database_url: str, **extra: str) -> dict[str, str]:
    env = {
        "CHATBASE_API_KEY": server.emulator.api_key or "demo-key",
        "CHATBASE_CHATBOT_ID": next(iter(server.emulator.datasets)),
        "CHATBASE_BASE_URL": server.base_url,
        "CHATSYNC_DATABASE_URL": database_url,
    }
    env.update(extra)
    return env
