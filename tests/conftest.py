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

# CI=true (GitHub Actions, GitLab and most others set it so); CI=false or CI= is a laptop
UNDER_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
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
        if UNDER_CI:
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
    # Nothing here reaches Chatbase: a test that forgets to point at the emulator fails at once.
    monkeypatch.setenv("CHATBASE_BASE_URL", "http://127.0.0.1:9/api/v1")
    monkeypatch.setenv("CHATBASE_API_URL", "http://127.0.0.1:9/api/v2")


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


def chatbase_v2_env(server: RunningEmulator, database_url: str, **extra: str) -> dict[str, str]:
    """:func:`chatbase_env` for a sync through API v2 (20 conversations a page: a looser client-side
    limit keeps the tests short; the emulator's own limit is off unless a test sets one)."""
    v2 = {
        "CHATBASE_API_VERSION": "2",
        "CHATBASE_API_URL": server.v2_base_url,
        "CHATSYNC_RATE_LIMIT": "1000/10s",
    }
    return chatbase_env(server, database_url, **{**v2, **extra})


# ------------------------------------------------------------------------------------------------ PgBouncer
@dataclass
class Pooler:
    """A PgBouncer in transaction mode in front of the test server."""

    port: int
    admin: str  # its console, for PAUSE/RESUME/SHOW

    def url(self, database_url: str) -> str:
        """The same database through the pooler, flagged so chatsync uses no prepared statements or pool."""
        from sqlalchemy.engine import make_url

        direct = make_url(database_url)
        return direct.set(host="127.0.0.1", port=self.port, query={"pgbouncer": "true"}).render_as_string(
            hide_password=False
        )


_PGBOUNCER_INI = """\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {auth_file}
admin_users = {user}
pool_mode = transaction
; two server connections, always open and handed out in turn: one client's transactions land on
; either, and on the ones other clients used, as on a busy pooler
default_pool_size = 2
min_pool_size = 2
server_round_robin = 1
max_client_conn = 200
ignore_startup_parameters = extra_float_digits
"""


@pytest.fixture(scope="session")
def pgbouncer() -> Iterator[Pooler]:
    """Start PgBouncer (transaction pooling) on a free port for the session; stop it afterwards.

    A missing ``pgbouncer`` skips with the reason, except under CI, where it is a failure.
    """
    import shutil
    import socket
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    import psycopg
    from sqlalchemy.engine import make_url

    _require_postgres()
    binary = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )
    if binary is None:
        if UNDER_CI:
            pytest.fail(
                "pgbouncer is not installed; CI must run the pooler tests (apt-get install pgbouncer)"
            )
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer) to run the pooler tests")
    server = make_url(POSTGRES_ADMIN_URL)
    user = server.username or "postgres"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listen = probe.getsockname()[1]
    # PgBouncer refuses to run as root: then it drops to the postgres user, which must read these files
    # (pytest's own temporary directories are private to the user running the tests).
    folder = Path(tempfile.mkdtemp(prefix="chatsync-pgbouncer-"))
    folder.chmod(0o755)
    auth_file = folder / "userlist.txt"
    auth_file.write_text(f'"{user}" ""\n')
    ini = folder / "pgbouncer.ini"
    ini.write_text(
        _PGBOUNCER_INI.format(
            host=server.host or "127.0.0.1",
            port=server.port or 5432,
            listen=listen,
            auth_file=auth_file,
            user=user,
        )
    )
    for path in (auth_file, ini):
        path.chmod(0o644)
    command = [binary, *(["-u", "postgres"] if os.geteuid() == 0 else []), str(ini)]
    # Its log goes to a file: an unread pipe fills up and then stops PgBouncer mid-test.
    log = folder / "pgbouncer.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    admin = f"postgresql://{user}@127.0.0.1:{listen}/pgbouncer"
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                pytest.fail(f"pgbouncer did not start: {log.read_text()}")
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=2, prepare_threshold=None):
                    break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield Pooler(listen, admin)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pooled_url(postgres_url: str, pgbouncer: Pooler) -> str:
    """A fresh PostgreSQL database, reached through PgBouncer in transaction mode."""
    return pgbouncer.url(postgres_url)
