"""A sync stays exact when Chatbase fails, when it is killed, when the database goes away."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatsync.chatbase import ChatbaseClient
from chatsync.config import Secret, WhatsAppRule
from chatsync.emulator import Faults
from chatsync.errors import ChatbaseUnavailable, DatabaseUnavailable, ExitCode
from chatsync.store.engine import ensure_schema, open_engine
from chatsync.store.locks import chatbot_lock
from chatsync.sync import Syncer, SyncRequest
from tests.conftest import chatbase_env
from tests.helpers import assert_exact, rollup_snapshot, stored_conversations, sync_killed_then_rerun


def _client(server: Any, **kwargs: Any) -> ChatbaseClient:
    kwargs.setdefault("backoff", (0.05, 0.3))
    kwargs.setdefault("rate_limit", (1000, 1.0))
    return ChatbaseClient(Secret("demo-key"), server.base_url, **kwargs)


def test_twenty_percent_failures_end_ok_with_exact_data(emulator_factory: Any, database_url: str) -> None:
    faults = Faults(fail_rate=0.10, slow_rate=0.05, malformed_rate=0.05, slow_seconds=2.0, retry_after=1)
    server = emulator_factory(conversations=1500, seed=21, faults=faults)
    engine = open_engine(database_url)
    ensure_schema(engine)
    with _client(server, timeout=0.5) as client:
        summary = Syncer(engine, client, WhatsAppRule(), concurrency=8).run(SyncRequest(("demo-bot",)))
    engine.dispose()
    assert summary.status == "ok"
    assert summary.retries > 0
    assert server.emulator.faulted > 0
    assert_exact(database_url, server.emulator)


def test_an_outage_that_never_ends_exits_3_and_a_later_run_completes(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    server = emulator_factory(conversations=800, seed=22, faults=Faults(fail_rate=1.0))
    env = chatbase_env(server, database_url)
    started = time.monotonic()
    result = cli("sync", "--json", "--retry-budget", "3s", env=env)
    assert result.exit_code == ExitCode.PARTIAL
    assert time.monotonic() - started < 30
    assert json.loads(result.stdout)["status"] == "partial"
    assert "kept failing" in result.stderr and len(result.stderr.strip().splitlines()) == 1

    server.emulator.faults.fail_rate = 0.0
    result = cli("sync", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    assert_exact(database_url, server.emulator)


def test_sigkill_at_five_points_then_rerun_ends_exact(
    emulator_factory: Any, database_url: str, tmp_path: Path
) -> None:
    # Enough pages that a kill at 1.2–4.0 s lands mid-run: a first run pages with 4 requests in flight and
    # no first-day probes, so it outran the kills with the 3,000 conversations this test once used.
    server = emulator_factory(conversations=12000, seed=23, latency_ms=120)
    env = {**os.environ, **chatbase_env(server, database_url), "CHATSYNC_CONCURRENCY": "4"}
    outcomes, final = sync_killed_then_rerun(env, tmp_path, final_timeout=120)
    assert outcomes.count(-signal.SIGKILL) >= 3, outcomes  # most runs really were killed mid-way
    assert final.returncode == 0, final.stderr
    assert json.loads(final.stdout)["status"] == "ok"
    assert_exact(database_url, server.emulator)


def test_a_second_sync_of_the_same_chatbot_exits_75_and_does_nothing(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    server = emulator_factory(conversations=200, seed=24, chatbot_ids=("bot-a", "bot-b"))
    env = chatbase_env(server, database_url)
    engine = open_engine(database_url)
    ensure_schema(engine)
    with chatbot_lock(engine, "bot-a"):
        busy = cli("sync", "--json", "--chatbot-id", "bot-a", env=env)
        by_hand = cli("sync", "--chatbot-id", "bot-a", env=env)  # a person at a terminal is told why
        other = cli("sync", "--json", "--chatbot-id", "bot-b", env=env)
    assert busy.exit_code == ExitCode.LOCKED
    line = json.loads(busy.stdout)  # one line a run in the cron log, whatever happened
    assert (line["status"], line["exit_code"], line["fetched"]) == ("skipped", 75, 0)
    assert busy.stdout.count("\n") == 1
    assert line["error"] == "another sync of chatbot 'bot-a' is running; nothing was done"
    assert busy.stderr == ""  # nothing went wrong: a cron job's error log stays empty
    assert by_hand.exit_code == ExitCode.LOCKED
    assert by_hand.stderr.strip() == "error: another sync of chatbot 'bot-a' is running; nothing was done"
    assert other.exit_code == 0, other.stderr  # different chatbots sync at the same time
    assert json.loads(other.stdout)["inserted"] == 200
    from sqlalchemy import func, select

    from chatsync.store.tables import conversations

    with engine.connect() as connection:
        bots = dict(
            connection.execute(
                select(conversations.c.chatbot_id, func.count()).group_by(conversations.c.chatbot_id)
            ).all()
        )
    engine.dispose()
    assert bots == {"bot-b": 200}


SECRET = "sk-live-DO-NOT-PRINT-1234567890"


@pytest.mark.parametrize(
    ("args", "extra_env", "code", "fragment"),
    [
        ((), {"CHATBASE_API_KEY": SECRET}, ExitCode.CONFIG, "CHATBASE_API_KEY"),
        (("--chatbot-id", "no-such-bot"), {}, ExitCode.CONFIG, "no-such-bot"),
        (("--since", "2024-13-01"), {}, ExitCode.USAGE, "expected YYYY-MM-DD"),
        (("--since", "2024-05-01", "--until", "2024-04-01"), {}, ExitCode.USAGE, "after --until"),
        (("--source", "Whatsap"), {}, ExitCode.USAGE, "unknown source"),
        (("--lookback", "three days"), {}, ExitCode.USAGE, "invalid duration"),
    ],
    ids=["bad-key", "unknown-chatbot", "bad-date", "reversed-window", "misspelt-source", "bad-lookback"],
)
def test_configuration_errors_exit_with_one_clear_line_and_never_show_the_key(
    cli: Any,
    emulator_factory: Any,
    sqlite_url: str,
    args: tuple[str, ...],
    extra_env: dict[str, str],
    code: int,
    fragment: str,
) -> None:
    server = emulator_factory(conversations=50, seed=25, api_key=SECRET if not extra_env else "another-key")
    env = chatbase_env(server, sqlite_url)
    env["CHATBASE_API_KEY"] = SECRET
    for debug in ((), ("--debug",)):
        result = cli(*debug, "sync", *args, env=env)
        assert result.exit_code == code, result.output
        assert SECRET not in result.output
        if not debug:
            assert result.stdout == ""
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


def test_missing_api_key_names_the_variable(cli: Any, sqlite_url: str) -> None:
    result = cli("sync", env={"CHATBASE_CHATBOT_ID": "bot", "CHATSYNC_DATABASE_URL": sqlite_url})
    assert result.exit_code == ExitCode.CONFIG
    assert result.stderr.strip() == "error: CHATBASE_API_KEY is not set: export it or pass --api-key"


@pytest.mark.postgres
def test_postgres_going_away_mid_run_ends_cleanly_and_the_next_run_completes(
    emulator_factory: Any, postgres_url: str
) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    from tests.conftest import POSTGRES_ADMIN_URL

    name = make_url(postgres_url).database
    server = emulator_factory(conversations=3000, seed=26, latency_ms=80)
    engine = open_engine(postgres_url)
    ensure_schema(engine)
    saved = threading.Event()

    def progress(status: Any) -> None:
        if status.conversations >= 300:
            saved.set()

    def outage() -> None:
        saved.wait(timeout=30)
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )

    killer = threading.Thread(target=outage)
    killer.start()
    with _client(server) as client, pytest.raises(DatabaseUnavailable) as raised:
        Syncer(engine, client, WhatsAppRule(), concurrency=4, progress=progress).run(
            SyncRequest(("demo-bot",))
        )
    killer.join()
    assert raised.value.exit_code == ExitCode.PARTIAL
    engine.dispose()

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    engine = open_engine(postgres_url)
    with _client(server) as client:
        summary = Syncer(engine, client, WhatsAppRule()).run(
            SyncRequest(("demo-bot",), lookback=timedelta(days=3))
        )
    engine.dispose()
    assert summary.status == "ok"
    assert_exact(postgres_url, server.emulator)


@pytest.mark.postgres
def test_a_database_error_the_writer_cannot_handle_ends_the_sync(
    emulator_factory: Any, postgres_url: str, tmp_path: Path
) -> None:
    """The database refuses one conversation and then its quarantine row: the sync stops with an error.

    The fetchers are ahead of the writer, blocked on a full queue; the sync must release them and
    exit rather than wait for them forever. What was saved stays, and the next run completes.
    """
    server = emulator_factory(conversations=3000, seed=9, days=30)
    refused = server.emulator.datasets["demo-bot"].conversation_id(1500)
    engine = _schema_with_trigger_function(postgres_url, "refuse", "RAISE EXCEPTION 'refused';")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TRIGGER refuse_one BEFORE INSERT ON conversations FOR EACH ROW "
            f"WHEN (NEW.id = '{refused}') EXECUTE FUNCTION refuse()"
        )
        connection.exec_driver_sql(
            "CREATE TRIGGER refuse_quarantine BEFORE INSERT ON quarantine FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    env = {**os.environ, **chatbase_env(server, postgres_url), "CHATSYNC_RATE_LIMIT": "1000000/1s"}
    command = [sys.executable, "-m", "chatsync", "sync", "--json"]
    failed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0
    assert len(failed.stderr.strip().splitlines()) == 1 and "refused" in failed.stderr

    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TRIGGER refuse_one ON conversations")
        connection.exec_driver_sql("DROP TRIGGER refuse_quarantine ON quarantine")
    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert_exact(postgres_url, server.emulator)
    engine.dispose()


def test_a_server_trickling_the_headers_of_its_answers_ends_the_run(
    emulator_factory: Any, database_url: str
) -> None:
    """httpx's timeout bounds each read: a server that sends the headers of its answer a byte at a time
    (a broken proxy) kept the request open for ever, the run with it, and the sync lock, which it went
    on renewing, so every later run was turned away as "another sync is running". A request is now given
    up once it is open past the time its answer was due plus one timeout: the run ends (exit 3) with what
    was saved, and the next run completes."""
    import http.server

    server = emulator_factory(conversations=1500, seed=33, days=30)
    answered = 0
    done = threading.Event()

    class Trickling(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            nonlocal answered
            answered += 1
            if answered <= 6:  # the first pages as Chatbase sends them
                page = httpx.get(server.base_url + self.path, headers=dict(self.headers))
                self.send_response(page.status_code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(page.content)))
                self.end_headers()
                self.wfile.write(page.content)
                return
            self.wfile.write(b"HTTP/1.1 200 OK\r\nx-padding: ")
            with contextlib.suppress(OSError):
                while not done.wait(0.2):
                    self.wfile.write(b"x")
                    self.wfile.flush()

        def log_message(self, *args: Any) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickling)
    proxy.daemon_threads = True
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    engine = open_engine(database_url)
    ensure_schema(engine)
    trickling = Secret("demo-key"), f"http://127.0.0.1:{proxy.server_address[1]}"
    started = time.monotonic()
    try:
        with (
            ChatbaseClient(*trickling, timeout=1.0, retry_budget=timedelta(seconds=1.5)) as client,
            pytest.raises(ChatbaseUnavailable) as raised,
        ):
            Syncer(engine, client, WhatsAppRule(), concurrency=4).run(SyncRequest(("demo-bot",)))
        took = time.monotonic() - started
    finally:
        done.set()
        proxy.shutdown()
        proxy.server_close()
    assert took < 20, took  # (due after 1.5 s, plus the 1 s timeout)
    assert "the answer kept trickling in past its time" in str(raised.value)
    assert 0 < len(stored_conversations(database_url)) < 1500
    with _client(server) as client:
        assert Syncer(engine, client, WhatsAppRule()).run(SyncRequest(("demo-bot",))).status == "ok"
    engine.dispose()
    assert_exact(database_url, server.emulator)


def test_a_sqlite_file_that_cannot_be_written_ends_the_run_with_exit_1(
    emulator_factory: Any, tmp_path: Path
) -> None:
    """A full disk under a SQLite database (here a file-size limit the kernel enforces: the write fails
    with EFBIG, which SQLite reports as "disk I/O error") ended the run "the database went away mid-run",
    exit 3, which a cron wrapper takes for a fault that passes. It will fail the same way until someone
    frees space: exit 1, saying what to check. The file stays sound, and the next run, with room, stores
    every conversation once."""
    server = emulator_factory(conversations=3000, seed=31, days=30)
    path = tmp_path / "chatsync.db"
    url = f"sqlite:///{path}"
    engine = open_engine(url)
    ensure_schema(engine)
    engine.dispose()
    env = {**os.environ, **chatbase_env(server, url), "CHATSYNC_RATE_LIMIT": "1000000/1s"}
    command = [sys.executable, "-m", "chatsync", "sync"]
    # (room for a few pages of the 3,000 conversations' ~8 MB)
    full = _run_with_room(path.stat().st_size + 1_000_000, command, env, tmp_path)
    assert full.returncode == ExitCode.ERROR, full.stderr
    assert full.stderr.strip() == (
        "error: the database file could not be written (disk I/O error): check the free space and "
        "permissions where its file is; what was committed is kept and the next run continues"
    )
    kept = len(stored_conversations(url))
    assert 0 < kept < 3000
    engine = open_engine(url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA integrity_check").scalar_one() == "ok"
    engine.dispose()
    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert_exact(url, server.emulator)


@pytest.mark.parametrize("room", [20_000, 100_000])
def test_a_sqlite_file_that_cannot_be_written_as_its_schema_is_made_says_so(
    emulator_factory: Any, tmp_path: Path, room: int
) -> None:
    """The same full disk on a first run, while the schema is made (in 20 kB the file cannot even be
    read; in 100 kB the tables do not fit): exit 1, "unexpected OperationalError" or a bare "disk I/O
    error" before; now the same advice, and the next run, with room, is exact. Found by helper-44."""
    server = emulator_factory(conversations=300, seed=32, days=30)
    url = f"sqlite:///{tmp_path / 'chatsync.db'}"
    env = {**os.environ, **chatbase_env(server, url), "CHATSYNC_RATE_LIMIT": "1000000/1s"}
    command = [sys.executable, "-m", "chatsync", "sync"]
    full = _run_with_room(room, command, env, tmp_path)
    assert full.returncode == ExitCode.ERROR, full.stderr
    assert full.stderr.strip() == (
        "error: cannot open the database: disk I/O error: check the free space and permissions where its "
        "file is"
    )
    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert_exact(url, server.emulator)


def _run_with_room(
    room: int, command: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """``command`` with the files it writes limited to ``room`` bytes, as a full disk limits them: the
    kernel's RLIMIT_FSIZE, a write past it failing with EFBIG (SQLite: "disk I/O error"), not killed."""
    import resource

    def no_room() -> None:  # (in the child, before it runs chatsync)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, room))

    return subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120, preexec_fn=no_room
    )


def test_a_damaged_sqlite_file_ends_the_run_and_quarantines_nothing(
    emulator_factory: Any, tmp_path: Path
) -> None:
    """A SQLite index damaged on disk fails every write that touches it ("database disk image is
    malformed", a DatabaseError): each page was saved again row by row, every row quarantined for it,
    and the run ended ok, exit 0, its days recorded as fetched. Found by helper-45. Now exit 1 saying
    the file is damaged, nothing quarantined, and nothing recorded as fetched."""
    import sqlite3

    first = emulator_factory(conversations=1000, seed=41, days=30)
    path = tmp_path / "chatsync.db"
    url = f"sqlite:///{path}"
    env = {**os.environ, **chatbase_env(first, url), "CHATSYNC_RATE_LIMIT": "1000000/1s"}
    command = [sys.executable, "-m", "chatsync", "sync", "--json"]
    assert subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, timeout=120).returncode == 0
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = [
            r[0]
            for r in connection.execute("SELECT pageno FROM dbstat WHERE name = 'ix_conversations_created'")
        ]
        size = connection.execute("PRAGMA page_size").fetchone()[0]
    with path.open("r+b") as file:
        for page in pages:
            file.seek((page - 1) * size + 8)
            file.write(b"\xa5" * (size - 8))
    second = emulator_factory(conversations=1000, seed=42, days=30)  # (other conversations: all new)
    env = {**env, **chatbase_env(second, url)}
    failed = subprocess.run(
        [*command, "--full"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert failed.returncode == ExitCode.ERROR, failed.stdout + failed.stderr
    line = json.loads(failed.stdout)
    assert line["quarantined"] == 0 and "the file is damaged" in line["error"], line
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 0


@pytest.mark.postgres
def test_a_statement_postgresql_fails_for_every_row_ends_the_run_and_quarantines_nothing(
    emulator_factory: Any, postgres_url: str, tmp_path: Path
) -> None:
    """No privilege to insert into conversations (SQLSTATE 42501, here raised by a trigger as PostgreSQL
    raises it for a REVOKE) was taken for rows the database refused: every conversation of the run was
    quarantined, exit 0. Found by helper-45. Now exit 1 saying so, nothing quarantined; the next run,
    with the privilege back, is exact."""
    server = emulator_factory(conversations=600, seed=43, days=30)
    engine = _schema_with_trigger_function(
        postgres_url,
        "no_privilege",
        "RAISE EXCEPTION 'permission denied for table conversations' USING ERRCODE = '42501';",
    )
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TRIGGER no_insert BEFORE INSERT ON conversations FOR EACH ROW EXECUTE FUNCTION no_privilege()"
        )
    env = {**os.environ, **chatbase_env(server, postgres_url), "CHATSYNC_RATE_LIMIT": "1000000/1s"}
    command = [sys.executable, "-m", "chatsync", "sync", "--json"]
    failed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert failed.returncode == ExitCode.ERROR, failed.stdout + failed.stderr
    line = json.loads(failed.stdout)
    assert line["quarantined"] == 0 and "permission denied for table conversations" in line["error"], line
    with engine.begin() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM quarantine").scalar_one() == 0
        connection.exec_driver_sql("DROP TRIGGER no_insert ON conversations")
    engine.dispose()
    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert_exact(postgres_url, server.emulator)


def _schema_with_trigger_function(postgres_url: str, name: str, body: str) -> Any:
    """An engine on the test database with chatsync's schema and a trigger function ``name`` running
    ``body`` (PL/pgSQL)."""
    engine = open_engine(postgres_url)
    ensure_schema(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            f"CREATE FUNCTION {name}() RETURNS trigger AS $$ BEGIN {body} END $$ LANGUAGE plpgsql"
        )
    return engine


def test_sigterm_ends_a_sync_with_its_json_line_its_run_recorded_and_its_lock_released(
    emulator_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """systemd's timeout (and `timeout`) send SIGTERM: the run once died with no line, 'running' forever."""
    server = emulator_factory(conversations=6000, seed=25, latency_ms=150)
    env = {**os.environ, **chatbase_env(server, database_url), "CHATSYNC_CONCURRENCY": "2"}
    command = [sys.executable, "-m", "chatsync", "sync", "--json"]
    process = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    from sqlalchemy import select

    from chatsync.store.tables import sync_runs

    engine = open_engine(database_url)
    # mid-run: once the run is recorded (its schema made), however slow the machine is to get there
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with engine.connect() as connection:
                if connection.execute(select(sync_runs.c.status)).first() is not None:
                    break
        except Exception:
            pass  # no schema yet
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    line = json.loads(out)
    assert (line["exit_code"], line["status"]) == (143, "failed") and "SIGTERM" in line["error"]
    assert err.strip().splitlines()[-1] == "error: terminated (SIGTERM); what was committed is kept"
    with engine.connect() as connection:
        assert [r.status for r in connection.execute(select(sync_runs.c.status))] == ["failed"]
    engine.dispose()
    rerun = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr  # the lock went with the process
    assert_exact(database_url, server.emulator)


def test_a_stop_inside_the_pre_ping_stays_a_stop_and_the_connection_is_thrown_away(postgres_url: str) -> None:
    """CI saw a SIGTERM end a sync as "the database went away" (exit 3): it landed inside SQLAlchemy's
    pre-ping, whose clean-up ("can't change 'autocommit' now") took the stop's place. Here the pooled
    connection's server process is frozen (SIGSTOP), so the next checkout's ping waits on it, and the
    stop arrives right there."""
    from sqlalchemy import text

    from chatsync.errors import Terminated

    engine = open_engine(postgres_url)
    with engine.connect() as connection:
        frozen = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    before = signal.signal(signal.SIGALRM, terminate)
    os.kill(frozen, signal.SIGSTOP)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Terminated), engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        os.kill(frozen, signal.SIGCONT)
    with engine.connect() as connection:  # a new connection: the one stopped mid-ping was not pooled again
        assert connection.execute(text("SELECT pg_backend_pid()")).scalar_one() != frozen
    engine.dispose()


def test_bad_values_and_bytes_on_the_command_line_exit_2_with_one_line(cli: Any, tmp_path: Path) -> None:
    for args in (("sync", "--json", "--concurrency", "abc"), ("sync", "--json", "--concurrency", "0")):
        result = cli(*args, env={"CHATBASE_API_KEY": "k", "CHATBASE_CHATBOT_ID": "b"})
        assert result.exit_code == ExitCode.USAGE, result.stderr
        assert json.loads(result.stdout)["exit_code"] == ExitCode.USAGE  # one line, even then
    for env in (
        {"CHATSYNC_RATE_LIMIT": "0/10s"},
        {"CHATSYNC_LOOKBACK": "999999999d"},
        {"CHATSYNC_EVENTS_POLL": "0s"},
    ):
        result = cli("config", "show", env=env)
        assert result.exit_code == ExitCode.USAGE and next(iter(env)) in result.stderr
    broken = subprocess.run(
        [sys.executable, "-m", "chatsync", "list", "--search", b"caf\xe9".decode("utf-8", "surrogateescape")],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert broken.returncode == ExitCode.USAGE and broken.stdout == ""
    assert broken.stderr.strip() == "error: an argument is not valid UTF-8: b'caf\\xe9'"


@pytest.mark.parametrize("stop", ["SIGTERM to the sync", "Ctrl-C to its process group"])
def test_a_stop_at_any_moment_of_the_start_ends_with_its_code_and_no_traceback(
    emulator_factory: Any, sqlite_url: str, tmp_path: Path, stop: str
) -> None:
    """The start imports the database stack beside the first request (PageAhead): a signal inside an
    import once left half-imported modules and an 'unexpected NameError'; a Ctrl-C that reached a
    worker as it wrote its result left the run waiting forever."""
    server = emulator_factory(conversations=3000, seed=26, latency_ms=20)
    env = {**os.environ, **chatbase_env(server, sqlite_url)}
    command = [sys.executable, "-m", "chatsync", "sync", "--json"]
    moments = random.Random(7)
    for attempt in range(8):
        process = subprocess.Popen(
            command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        time.sleep(moments.uniform(0.05, 0.5) if stop.startswith("SIGTERM") else moments.uniform(0.3, 1.5))
        if stop.startswith("SIGTERM"):
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=60)  # a hang fails here
        if process.returncode in (0, -signal.SIGTERM):
            continue  # it finished first, or was stopped before Python ran chatsync (nothing begun)
        assert process.returncode == (143 if stop.startswith("SIGTERM") else 130), (attempt, err)
        assert "unexpected" not in err, (attempt, err)
        if stop.startswith("SIGTERM"):
            assert "Traceback" not in err, (attempt, err)
        # (a worker that was still starting when the sync ended may print multiprocessing's traceback)
        assert ("error: terminated" if stop.startswith("SIGTERM") else "error: interrupted") in err, err
        assert "Fatal Python error" not in err, (attempt, err)  # the fork server never takes Ctrl-C
        if out:
            assert json.loads(out)["exit_code"] == process.returncode


# The child sends itself signals at a chosen moment: as a module is first imported (an audit hook), or
# as a function of that name is called (a profile hook); Python features, no chatsync code replaced.
_SIGNALS_AT = """
import os, signal, sys
moment, signums, marker, *args = sys.argv[1:]
kind, _, name = moment.partition(":")
def send():
    if not os.path.exists(marker):
        open(marker, "w").close()
        for signum in signums.split(","):
            os.kill(os.getpid(), int(signum))
def audit(event, details):
    if kind == "import" and event == "import" and details[0] == name and name not in sys.modules:
        send()
def profile(frame, event, arg):
    if event == "call" and frame.f_code.co_name == name:
        send()
class AtExit:  # dropped with the modules, as the interpreter shuts down
    def __del__(self):
        send()
sys.addaudithook(audit)
if kind == "call":
    sys.setprofile(profile)
if kind == "exit":
    holder = type(sys)("signals_at_exit")
    holder.at_exit = AtExit()
    sys.modules["signals_at_exit"] = holder
    del holder
sys.argv = ["chatsync", *args]
from chatsync.__main__ import main
main()
"""


def _signalled(moment: str, signums: list[int], args: list[str], cwd: Path, env: dict[str, str]) -> Any:
    marker = cwd / "signalled"
    marker.unlink(missing_ok=True)
    codes = ",".join(str(int(s)) for s in signums)
    command = [sys.executable, "-c", _SIGNALS_AT, moment, codes, str(marker), *args]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert marker.exists()  # the signals were sent, at that moment
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    return done


_STOPPED = {130: "error: interrupted", 143: "error: terminated (SIGTERM)"}


@pytest.mark.parametrize(
    "moment",
    [
        "import:typer",  # the command line's modules loading
        "import:chatsync.logs",  # Typer parsing: the global options' callback imports it
    ],
)
@pytest.mark.parametrize(
    "signums",
    [[signal.SIGINT], [signal.SIGTERM], [signal.SIGINT, signal.SIGTERM], [signal.SIGTERM, signal.SIGINT]],
    ids=["Ctrl-C", "SIGTERM", "Ctrl-C then SIGTERM", "SIGTERM then Ctrl-C"],
)
def test_a_signal_during_start_up_waits_for_the_command_which_reports_it(
    emulator_factory: Any, sqlite_url: str, tmp_path: Path, moment: str, signums: list[int]
) -> None:
    """Before the command begins, a Ctrl-C once printed a traceback (inside an import) or ended the run
    with 130 and nothing on stdout or stderr (Typer turns KeyboardInterrupt inside its parsing into that).
    Held from the first moment, it reaches the sync, which stops before any request and says so, with
    its JSON line. Two at once: the first the process takes decides, the second does nothing (it once
    cut the JSON line short)."""
    server = emulator_factory(conversations=50, seed=3)
    env = {**os.environ, **chatbase_env(server, sqlite_url)}
    done = _signalled(moment, signums, ["sync", "--json"], tmp_path, env)
    expected = {130} if signums == [signal.SIGINT] else {143} if signums == [signal.SIGTERM] else {130, 143}
    assert done.returncode in expected, done.stderr
    assert done.stderr.startswith(_STOPPED[done.returncode]) and done.stderr.count("error:") == 1, done.stderr
    line = json.loads(done.stdout)
    assert (line["status"], line["exit_code"], line["requests"]) == ("failed", done.returncode, 0)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["sync", "--concurrency", "abc"], ["list"]])
def test_two_signals_during_start_up_end_any_command_with_one_line(
    sqlite_url: str, tmp_path: Path, args: list[str]
) -> None:
    """Ctrl-C and SIGTERM together before the command began once gave `--help` two tracebacks and exit 1:
    the second ran its handler inside the first one's message."""
    env = {**os.environ, "CHATSYNC_DATABASE_URL": sqlite_url}
    done = _signalled("import:typer", [signal.SIGINT, signal.SIGTERM], args, tmp_path, env)
    assert done.returncode == 130, done.stderr
    assert done.stderr.count("error:") == 1 and "error: interrupted" in done.stderr, done.stderr


@pytest.mark.parametrize("moment", ["call:upsert_conversations", "call:track"])
def test_a_stop_inside_a_write_waits_for_its_transaction_and_the_run_records_how_it_ended(
    emulator_factory: Any, database_url: str, tmp_path: Path, moment: str
) -> None:
    """A SIGTERM that landed inside a bulk insert (CI, a loaded machine) left its transaction open on
    SQLite: the broken statement lived on in the error's traceback with the write lock, so the run's last
    write waited 30 s for it, failed, and left the run "running" (and the process past its 60 s budget).
    A stop now waits for the transaction it lands in: the page is committed, the run is recorded as
    terminated, and the next run completes exactly."""
    from sqlalchemy import select

    from chatsync.store.tables import sync_runs

    server = emulator_factory(conversations=1500, seed=36)
    env = {**os.environ, **chatbase_env(server, database_url), "CHATSYNC_CONCURRENCY": "2"}
    done = _signalled(moment, [signal.SIGTERM], ["sync", "--json"], tmp_path, env)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip() == "error: terminated (SIGTERM); what was committed is kept", done.stderr
    line = json.loads(done.stdout)
    assert (line["status"], line["exit_code"]) == ("failed", 143)
    assert line["inserted"] > 0  # the transaction the stop landed in was committed, then the run stopped
    assert 0 < len(stored_conversations(database_url)) < 1500
    engine = open_engine(database_url)
    with engine.connect() as connection:
        runs = connection.execute(select(sync_runs.c.status, sync_runs.c.error)).all()
    engine.dispose()
    assert [(r.status, "SIGTERM" in (r.error or "")) for r in runs] == [("failed", True)]
    rerun = subprocess.run(
        [sys.executable, "-m", "chatsync", "sync"], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert_exact(database_url, server.emulator)


def test_a_signal_once_the_sync_has_succeeded_does_not_turn_it_into_a_failure(
    emulator_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """A Ctrl-C as the JSON line of a finished sync is written once ended the process with 130 and no
    line, or 130 beside a line saying "ok"; one as the interpreter shut down killed it (Python puts the
    default action back then). The outcome is decided once the sync returned: the line says ok, and the
    exit code agrees."""
    server = emulator_factory(conversations=50, seed=3)
    env = {**os.environ, **chatbase_env(server, sqlite_url)}
    for moment in ("call:write_json_line", "call:close_engines", "exit:"):
        done = _signalled(moment, [signal.SIGINT, signal.SIGTERM], ["sync", "--json"], tmp_path, env)
        assert done.returncode == 0 and done.stderr == "", (moment, done.stderr)
        line = json.loads(done.stdout)
        assert line["status"] == "ok" and "exit_code" not in line, moment
    assert_exact(sqlite_url, server.emulator)


def test_a_stop_does_not_wait_for_the_requests_in_flight(
    emulator_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """A Ctrl-C once waited for every request in flight to be answered (19.4 s against a Chatbase taking
    20 s; for ever against one trickling its bytes): their pages would not be saved anyway. It now gives
    them a second, ends cleanly with its line, and the next run stores everything exactly."""
    slow = emulator_factory(conversations=300, seed=31, latency_ms=20_000)
    process = subprocess.Popen(
        [sys.executable, "-m", "chatsync", "sync", "--json"], env={**os.environ, **chatbase_env(slow, sqlite_url)},
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    time.sleep(3)  # its first requests are out, answered in 20 s
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=10)  # not the 20 s of the answers
    assert process.returncode == 130 and err.startswith("error: interrupted") and "Traceback" not in err, err
    assert json.loads(out)["exit_code"] == 130
    fast = emulator_factory(conversations=300, seed=31)
    rerun = subprocess.run(
        [sys.executable, "-m", "chatsync", "sync", "--json"], env={**os.environ, **chatbase_env(fast, sqlite_url)},
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert_exact(sqlite_url, fast.emulator)


def test_a_second_ctrl_c_while_a_run_is_still_ending_stops_it_at_once(
    emulator_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """The first stop decides how the run ends, and a signal arriving with it does nothing; but a person
    pressing Ctrl-C again a moment later wants out now. Here the run's ending waits on a heartbeat monitor
    that does not answer (10 s timeout): the second Ctrl-C ends the process at once, as SIGKILL would."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Silent(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            time.sleep(15)

        def log_message(self, *args: Any) -> None:
            pass

    monitor = ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    monitor.daemon_threads = True
    threading.Thread(target=monitor.serve_forever, daemon=True).start()
    try:
        slow = emulator_factory(conversations=3_000, seed=31, latency_ms=2_000)
        env = {
            **os.environ,
            **chatbase_env(slow, sqlite_url),
            "CHATSYNC_HEARTBEAT_URL": f"http://127.0.0.1:{monitor.server_address[1]}/ping",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "chatsync", "sync", "--json"], env=env, cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        time.sleep(3)
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(2.5)
        assert process.poll() is None  # still ending: telling the monitor
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=5)  # not the rest of the monitor's 10 s
        assert process.returncode == 130 and "Traceback" not in err, err
        assert "error: stopped at once" in err
    finally:
        monitor.shutdown()
        monitor.server_close()


def test_status_tells_a_killed_run_from_a_running_one(
    emulator_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """A SIGKILLed sync leaves its run marked running; status said "running" until the next sync (found by
    a breaking helper). It now looks at the chatbot's sync lock, without taking it."""
    # pages enough that the sync is still running when a loaded machine gets its status (300 at 1.5 s a
    # page once finished first)
    slow = emulator_factory(conversations=3_000, seed=33, latency_ms=2_000)
    env = {**os.environ, **chatbase_env(slow, database_url)}

    def status() -> dict[str, Any]:
        shown = subprocess.run(
            [sys.executable, "-m", "chatsync", "status", "--json"], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        run: dict[str, Any] = json.loads(shown.stdout)["chatbots"][0]["last_run"]
        return run

    process = subprocess.Popen(
        [sys.executable, "-m", "chatsync", "sync"], env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    engine = open_engine(database_url)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                try:
                    if connection.exec_driver_sql("SELECT 1 FROM sync_runs WHERE status = 'running'").first():
                        break
                except Exception:  # the schema is not made yet
                    pass
            time.sleep(0.05)
        assert status()["status"] == "running"  # it is: its lock is held
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        killed = status()
        assert killed["status"] == "interrupted" and "ended without recording how" in killed["error"]
        with engine.connect() as connection:  # status changed nothing: the next sync records it
            assert connection.exec_driver_sql("SELECT status FROM sync_runs").scalar_one() == "running"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        engine.dispose()


def test_a_sigkill_of_the_sync_alone_leaves_stderr_empty(
    emulator_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """kill -9 of the sync's process (not its group) left multiprocessing's resource tracker warning of
    "leaked semaphore objects" on the sync's stderr, which cron mails (found by a breaking helper)."""
    # Enough pages at 2 s each that a loaded machine cannot finish the run before the kill (300
    # conversations at 1 s once did: the sync exited 0 first).
    slow = emulator_factory(conversations=3_000, seed=34, latency_ms=2_000)
    env = {**os.environ, **chatbase_env(slow, sqlite_url)}
    process = subprocess.Popen(
        [sys.executable, "-m", "chatsync", "sync"], env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    database = Path(sqlite_url.removeprefix("sqlite:///"))
    _wait_for_a_running_run(database, process)
    _wait_for_stored_conversations(database, process)  # a page went through the worker pool
    assert process.poll() is None, "the sync ended before it could be killed"
    process.kill()
    _, err = process.communicate(timeout=60)  # until every process holding its stderr has ended
    assert process.returncode == -signal.SIGKILL and err == "", err


def _wait_for_a_running_run(database: Path, process: subprocess.Popen[str], timeout: float = 60) -> None:
    """Until the sync has recorded its run (a loaded machine takes seconds to get there: a fixed sleep
    once stopped it before, and status then rightly showed no run at all)."""
    import sqlite3
    from contextlib import closing

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
                if connection.execute("SELECT 1 FROM sync_runs WHERE status = 'running'").fetchone():
                    return
        except sqlite3.OperationalError:  # not created or not migrated yet
            pass
        time.sleep(0.05)
    raise AssertionError("the sync never recorded its run")


def _wait_for_stored_conversations(
    database: Path, process: subprocess.Popen[str], timeout: float = 60
) -> None:
    """Until the sync has committed at least one conversation, so its worker processes exist."""
    import sqlite3
    from contextlib import closing

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            if connection.execute("SELECT 1 FROM conversations LIMIT 1").fetchone():
                return
        time.sleep(0.05)
    raise AssertionError("the sync never stored a conversation")


def test_a_stop_after_a_refused_chatbot_still_names_it(
    emulator_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """A SIGTERM (systemd's timeout) while the good chatbot synced left only "terminated" on stderr: the
    typo met before it was in the JSON line alone (found by a breaking helper)."""
    slow = emulator_factory(conversations=3_000, seed=35, latency_ms=2_000, chatbot_ids=("bot-a",))
    env = {**os.environ, **chatbase_env(slow, sqlite_url, CHATBASE_CHATBOT_ID="bot-typo,bot-a")}
    process = subprocess.Popen(
        [sys.executable, "-m", "chatsync", "sync"], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    database = Path(sqlite_url.removeprefix("sqlite:///"))
    _wait_for_a_running_run(database, process)
    _wait_for_stored_conversations(database, process)  # bot-a's, synced after the typo was refused
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "chatbot bot-typo: Chatbase rejected" in err and "'bot-typo' was not found" in err
    assert err.strip().splitlines()[-1].startswith("error: terminated (SIGTERM)")


def test_status_says_a_run_was_interrupted(emulator_factory: Any, sqlite_url: str, tmp_path: Path) -> None:
    """A Ctrl-C's message is empty: the run was once stored failed with no reason, and `chatsync status`
    could not tell it from a real failure (found by a newcomer helper)."""
    slow = emulator_factory(conversations=300, seed=32, latency_ms=2_000)
    env = {**os.environ, **chatbase_env(slow, sqlite_url)}
    process = subprocess.Popen(
        [sys.executable, "-m", "chatsync", "sync"], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    _wait_for_a_running_run(Path(sqlite_url.removeprefix("sqlite:///")), process)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    status = subprocess.run(
        [sys.executable, "-m", "chatsync", "status", "--json"], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "interrupted; what was committed is kept" in status.stdout, status.stdout


def _free_port() -> int:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


class _Forwarder:
    """A TCP forwarder on ``port`` to ``target`` (a real PostgreSQL) that can go away and come back: a
    database server restarting or failing over. It listens only while up; :meth:`cut` also drops every
    connection through it, as a server going down does; :meth:`go_down_at` does so as a given statement
    is sent."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self._up = threading.Event()
        self._listening = threading.Event()
        self._done = threading.Event()
        self._open: set[Any] = set()
        self._lock = threading.Lock()
        self._armed: tuple[bytes, str, float, bytes] | None = None
        self._replies_lost = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def up(self) -> None:
        """Listen again (returns once it does)."""
        self._up.set()
        assert self._listening.wait(5)

    def cut(self) -> None:
        """Stop listening (returns once it has) and drop every connection."""
        import socket

        self._up.clear()
        while self._listening.is_set():
            time.sleep(0.01)
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # (a close alone leaves a recv in another thread be)
                sock.close()
            self._open.clear()

    def close(self) -> None:
        self._done.set()
        self.cut()
        self._thread.join()

    def go_down_at(self, marker: bytes, outage: float, moment: str = "before", after: bytes = b"") -> None:
        """Go down (for ``outage`` seconds) as the next statement holding ``marker`` is sent, on a connection
        that has sent ``after`` before it: ``before`` the server has it, or ``after`` the server has run
        it and before its answer comes back (a COMMIT: the client cannot tell it committed)."""
        self._armed = (marker, moment, outage, after)

    def _go_down(self, outage: float) -> None:
        self.cut()
        self._replies_lost = False
        threading.Timer(outage, self.up).start()

    def _pipe(self, source: Any, sink: Any, toward_server: bool) -> None:
        import socket

        sent = b""  # (what this connection sent that the armed statement must come after)
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not toward_server:
                    if not self._replies_lost:
                        sink.sendall(data)
                    continue
                armed = self._armed
                if armed is not None and armed[3] and armed[3] in data:
                    sent = armed[3]
                if armed is not None and armed[0] in data and sent == armed[3]:
                    self._armed = None
                    _, moment, outage, _ = armed
                    if moment == "after":
                        self._replies_lost = True
                        sink.sendall(data)
                        time.sleep(0.3)  # (the server commits; its answer is dropped)
                    self._go_down(outage)
                    return
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def _serve(self) -> None:
        import socket

        while not self._done.is_set():
            if not self._up.wait(0.05):
                continue
            with socket.create_server(("127.0.0.1", self.port)) as listener:
                listener.settimeout(0.05)
                self._listening.set()
                while self._up.is_set() and not self._done.is_set():
                    try:
                        client = listener.accept()[0]
                    except TimeoutError:
                        continue
                    upstream = socket.create_connection(self.target)
                    with self._lock:
                        self._open.update((client, upstream))
                    for one, other, toward_server in ((client, upstream, True), (upstream, client, False)):
                        threading.Thread(
                            target=self._pipe, args=(one, other, toward_server), daemon=True
                        ).start()
            self._listening.clear()


def _forward_later(
    port: int, target: tuple[str, int], after: float, stop: threading.Event
) -> threading.Thread:
    """A forwarder to ``target`` that starts listening on ``port`` only ``after`` seconds, until ``stop``:
    a database server restarting while a sync starts."""

    def serve() -> None:
        forwarder = _Forwarder(port, target)
        time.sleep(after)
        forwarder.up()
        stop.wait()
        forwarder.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.postgres
def test_a_database_down_when_the_sync_starts_is_waited_for_within_the_budget(
    cli: Any, emulator_factory: Any, postgres_url: str
) -> None:
    """A PostgreSQL restart at the minute cron starts a sync made it exit 1 at once, "cannot open the
    database", an exit the deploy guide did not list: found by a newcomer helper."""
    from sqlalchemy.engine import make_url

    server = emulator_factory(conversations=300, seed=23)
    real = make_url(postgres_url)
    port = _free_port()
    stop = threading.Event()
    forwarder = _forward_later(port, (real.host or "127.0.0.1", real.port or 5432), 1.5, stop)
    through = real.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    began = datetime.now(UTC)
    try:
        result = cli("sync", "--json", "--retry-budget", "30s", env=chatbase_env(server, through))
    finally:
        stop.set()
        forwarder.join()
    assert result.exit_code == ExitCode.OK, result.output
    line = json.loads(result.stdout)
    assert line["inserted"] == 300
    # the run started when the command did, not once the database was back 1.5 s later
    assert datetime.fromisoformat(line["started_at"].replace("Z", "+00:00")) - began < timedelta(seconds=1)
    assert "the database is unreachable" in result.stderr and "up to 30 s" in result.stderr
    assert_exact(postgres_url, server.emulator)


@pytest.mark.postgres
def test_a_database_that_stays_down_ends_the_sync_with_exit_3_when_the_budget_ends(
    cli: Any, emulator_factory: Any, postgres_url: str
) -> None:
    from sqlalchemy.engine import make_url

    server = emulator_factory(conversations=50, seed=24)
    closed = make_url(postgres_url).set(port=_free_port()).render_as_string(hide_password=False)
    started = time.monotonic()
    result = cli("sync", "--json", "--retry-budget", "2s", env=chatbase_env(server, closed))
    took = time.monotonic() - started
    assert result.exit_code == ExitCode.PARTIAL and 2.0 <= took < 6
    line = json.loads(result.stdout)
    assert line["status"] == "partial" and line["error"].startswith("the database stayed unreachable for 2 s")
    assert line["synced"] == []
    said = result.stderr.strip().splitlines()
    assert len(said) == 2 and "unreachable" in said[0] and said[1].startswith("error: the database stayed")


def _through_forwarder(postgres_url: str) -> tuple[_Forwarder, str]:
    """A forwarder (up) in front of the test database, and the database's URL through it."""
    from sqlalchemy.engine import make_url

    real = make_url(postgres_url)
    forwarder = _Forwarder(_free_port(), (real.host or "127.0.0.1", real.port or 5432))
    forwarder.up()
    return forwarder, real.set(host="127.0.0.1", port=forwarder.port).render_as_string(hide_password=False)


@pytest.mark.postgres
@pytest.mark.parametrize(("moment", "outage"), [("before", 0.0), ("after", 0.0), ("before", 2.5)])
def test_a_database_that_goes_away_mid_run_and_comes_back_is_ridden_out(
    emulator_factory: Any, postgres_url: str, moment: str, outage: float, caplog: pytest.LogCaptureFixture
) -> None:
    """A PostgreSQL restart (or failover) in the middle of a sync from cron ended the run with exit 3 at
    once. Now the writer tries its page again within the retry budget: the run ends ok, every
    conversation stored once, the report's rollups as a rebuild from the conversations makes them.
    The connections drop as a page's transaction commits: ``before`` the server has the commit, or
    ``after`` it has committed it but before the answer comes back (the page is found stored when it is
    tried again); then the server takes new connections at once (``outage`` 0) or refuses them for
    2.5 s. The run's summary counts each conversation inserted, as a run without the outage does."""
    from chatsync.store import rollups

    server = emulator_factory(conversations=3000, seed=27, latency_ms=40)
    forwarder, through = _through_forwarder(postgres_url)
    engine = open_engine(through)
    ensure_schema(engine)
    cut = threading.Event()

    def progress(status: Any) -> None:
        if status.conversations >= 600 and not cut.is_set():
            cut.set()
            forwarder.go_down_at(b"COMMIT\x00", outage, moment, after=b"conversations (")

    try:
        with (
            caplog.at_level("INFO", logger="chatsync"),
            _client(server, retry_budget=timedelta(seconds=60)) as client,
        ):
            summary = Syncer(engine, client, WhatsAppRule(), concurrency=4, progress=progress).run(
                SyncRequest(("demo-bot",))
            )
    finally:
        engine.dispose()
        forwarder.close()
    assert cut.is_set() and summary.status == "ok"
    # Counted as written, whether or not the lost try had committed (it had counted them unchanged).
    assert (summary.inserted, summary.updated, summary.unchanged) == (
        3000 - len(server.emulator.bad_indexes("demo-bot")),
        0,
        0,
    )
    told = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("the database went away mid-run" in m and "up to 60 s" in m for m in told), told
    assert any("the database is back, " in r.getMessage() for r in caplog.records)
    assert_exact(postgres_url, server.emulator)
    engine = open_engine(postgres_url)
    try:
        kept = rollup_snapshot(engine)
        with engine.begin() as connection:
            rollups.rebuild(connection)
        assert rollup_snapshot(engine) == kept
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("marker", "moment", "after"),
    [
        (b"INSERT INTO sync_leases", "before", b""),
        (b"COMMIT\x00", "before", b"INSERT INTO sync_leases"),
        (b"COMMIT\x00", "after", b"INSERT INTO sync_leases"),
        (b"INSERT INTO sync_runs", "before", b""),
        (b"COMMIT\x00", "after", b"INSERT INTO sync_runs"),
        (b"FROM sync_days", "before", b""),
        (b"SET last_synced_at", "before", b""),
        (b"UPDATE sync_runs", "before", b""),
        (b"COMMIT\x00", "after", b"UPDATE sync_runs"),
    ],
    ids=[
        "taking the lock",
        "taking the lock, its commit lost",
        "taking the lock, the commit's answer lost",
        "recording the run",
        "recording the run, the commit's answer lost",
        "planning",
        "noting the chatbot synced",
        "recording how it ended",
        "recording how it ended, the commit's answer lost",
    ],
)
def test_a_database_lost_at_any_step_of_a_run_is_ridden_out(
    emulator_factory: Any, postgres_url: str, marker: bytes, moment: str, after: bytes
) -> None:
    """Not only the page writes: a restart as the lock is taken, the run recorded, planned, noted complete
    or recorded as ended once gave exit 1 ("unexpected OperationalError"), exit 3 at once, or (a commit's
    answer lost) a duplicate key or the run's end told twice: found by breaking helpers."""
    from sqlalchemy import select

    from chatsync.store.tables import changes, chatbots, sync_runs

    server = emulator_factory(conversations=400, seed=30)
    forwarder, through = _through_forwarder(postgres_url)
    engine = open_engine(through)
    try:
        ensure_schema(engine)
        forwarder.go_down_at(marker, 1.0, moment, after)
        with _client(server, retry_budget=timedelta(seconds=30)) as client:
            summary = Syncer(engine, client, WhatsAppRule(), concurrency=4).run(SyncRequest(("demo-bot",)))
    finally:
        engine.dispose()
        forwarder.close()
    assert summary.status == "ok"
    assert_exact(postgres_url, server.emulator)
    engine = open_engine(postgres_url)
    with engine.connect() as connection:
        assert [r.status for r in connection.execute(select(sync_runs.c.status))] == ["ok"]
        assert connection.execute(select(chatbots.c.last_synced_at)).scalar_one() is not None
        told = connection.execute(select(changes).where(changes.c.kind == "sync.finished")).all()
        assert len(told) == 1
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("moment", ["before", "after"])
def test_a_database_lost_as_a_first_run_makes_its_schema_is_ridden_out(
    postgres_url: str, moment: str
) -> None:
    """A connection lost at the COMMIT of the schema a first run makes (before the server has it, or
    after, its answer lost) ended the run with exit 1, "unexpected OperationalError", where a database
    down at the start is waited for. Found by helper-45."""
    from chatsync.store.engine import HEAD_REVISION, current_revision, ensure_schema_riding_out

    forwarder, through = _through_forwarder(postgres_url)
    engine = open_engine(through)
    try:
        forwarder.go_down_at(b"COMMIT\x00", 1.0, moment, after=b"CREATE TABLE")
        ensure_schema_riding_out(engine, 30)
        assert current_revision(engine) == HEAD_REVISION
    finally:
        engine.dispose()
        forwarder.close()


@pytest.mark.postgres
def test_a_statement_the_database_cancels_is_not_taken_for_an_outage(postgres_url: str) -> None:
    """A statement timeout (SQLSTATE 57014, class 57 like a shutdown) came back on every try: a sync
    waited out its whole budget and then called it an outage. A terminated connection is one."""
    from sqlalchemy.exc import OperationalError

    from chatsync.store.engine import is_down

    engine = open_engine(postgres_url)
    try:
        with pytest.raises(OperationalError) as cancelled, engine.connect() as connection:
            connection.exec_driver_sql("SET statement_timeout = '10ms'")
            connection.exec_driver_sql("SELECT pg_sleep(1)")
        assert not is_down(cancelled.value)
        with pytest.raises(OperationalError) as terminated, engine.connect() as connection:
            connection.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")
        assert is_down(terminated.value)
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("table", ["report_values", "conversations"])
def test_a_statement_timeout_mid_run_ends_the_sync_at_once_with_exit_1(
    emulator_factory: Any, postgres_url: str, tmp_path: Path, table: str
) -> None:
    """A statement the database cancels (its statement_timeout) is not an outage: no wait, and exit 1
    saying what failed, as it fails the same way on every run until someone changes the database. It had
    ended with exit 3, "the database went away mid-run", which a cron wrapper takes for a passing fault.
    Slowed down: the rollups' upsert (a page's ~400 rollup rows take 8 s), or the bulk load of the
    conversations themselves (COPY: 100 rows take 2 s, one 20 ms), whose timeout had been taken for
    rows the database refused: the page was written again one row at a time, and a row slower than the
    timeout would have been quarantined."""
    from sqlalchemy.engine import make_url

    server = emulator_factory(conversations=3000, seed=31, days=30)
    name = make_url(postgres_url).database
    engine = _schema_with_trigger_function(postgres_url, "slow", "PERFORM pg_sleep(0.02); RETURN NEW;")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            f"CREATE TRIGGER slow_one BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION slow()"
        )
        connection.exec_driver_sql(f'ALTER DATABASE "{name}" SET statement_timeout = 500')
    engine.dispose()
    env = {**os.environ, **chatbase_env(server, postgres_url), "CHATSYNC_RATE_LIMIT": "1000000/1s"}
    command = [sys.executable, "-m", "chatsync", "sync", "--json"]
    started = time.monotonic()
    failed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 30  # (not the 5-minute retry budget)
    assert failed.returncode == ExitCode.ERROR, failed.stderr
    line = json.loads(failed.stdout)
    assert line["status"] == "failed"
    assert line["error"].startswith("the database failed a statement mid-run (canceling statement due to")
    assert "trying again" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1

    engine = open_engine(postgres_url)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"DROP TRIGGER slow_one ON {table}")
        connection.exec_driver_sql(f'ALTER DATABASE "{name}" RESET statement_timeout')
    engine.dispose()
    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert_exact(postgres_url, server.emulator)


@contextlib.contextmanager
def _a_sync_losing_its_database(
    server: Any, postgres_url: str, tmp_path: Path, budget: str
) -> Iterator[tuple[subprocess.Popen[str], _Forwarder, list[str], dict[str, str]]]:
    """``chatsync sync --json --retry-budget budget`` through a forwarder to the test database, which
    goes away (until ``forwarder.up()``) once 300 conversations are stored; with the command and its
    environment, for the next run."""
    forwarder, through = _through_forwarder(postgres_url)
    env = {**os.environ, **chatbase_env(server, through), "CHATSYNC_RATE_LIMIT": "1000000/1s"}
    command = [sys.executable, "-m", "chatsync", "sync", "--json", "--retry-budget", budget]
    try:
        process = subprocess.Popen(
            command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        _wait_for_conversations_in(postgres_url, 300, process)
        forwarder.cut()
        yield process, forwarder, command, env
    finally:
        forwarder.close()


@pytest.mark.postgres
def test_a_database_that_goes_away_mid_run_for_longer_than_the_budget_ends_it_with_exit_3(
    emulator_factory: Any, postgres_url: str, tmp_path: Path
) -> None:
    """Gone for good: exit 3 once the retry budget is spent, saying for how long; what was committed is
    kept, and the next run, with the database back, completes exactly."""
    server = emulator_factory(conversations=3000, seed=28, latency_ms=40)
    with _a_sync_losing_its_database(server, postgres_url, tmp_path, "3s") as lost:
        process, forwarder, command, env = lost
        cut_at = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == ExitCode.PARTIAL, stderr
        assert time.monotonic() - cut_at < 15
        line = json.loads(stdout)
        assert line["status"] == "partial"
        assert "the database went away mid-run" in line["error"] and "stayed away for 3 s" in line["error"]
        said = stderr.strip().splitlines()
        assert "trying again for up to 3 s" in said[0]
        assert said[-1].startswith("error: the database went away")
        assert 300 <= len(stored_conversations(postgres_url)) < 3000
        forwarder.up()
        again = subprocess.run(
            command[:-2], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert again.returncode == 0, again.stderr
    assert_exact(postgres_url, server.emulator)


@pytest.mark.postgres
def test_a_stop_while_the_database_is_ridden_out_ends_the_run_at_once(
    emulator_factory: Any, postgres_url: str, tmp_path: Path
) -> None:
    """SIGTERM (systemd's timeout) during the wait for a lost database: exit 143 at once, not at the end
    of the budget, and the next run completes."""
    server = emulator_factory(conversations=3000, seed=29, latency_ms=40)
    with _a_sync_losing_its_database(server, postgres_url, tmp_path, "120s") as lost:
        process, forwarder, command, env = lost
        assert process.stderr is not None
        warned = process.stderr.readline()  # (the first line a sync writes at the default level)
        assert "went away mid-run" in warned and "trying again for up to 120 s" in warned, warned
        process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 143, stderr
        assert time.monotonic() - stopped_at < 15  # (recording how the run ended may wait for a connection)
        assert json.loads(stdout)["exit_code"] == 143
        forwarder.up()
        again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
    assert_exact(postgres_url, server.emulator)


def _wait_for_conversations_in(database_url: str, count: int, process: subprocess.Popen[str]) -> None:
    """Until a sync has committed at least ``count`` conversations."""
    from sqlalchemy.exc import ProgrammingError

    engine = open_engine(database_url)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and process.poll() is None:
            with engine.connect() as connection, contextlib.suppress(ProgrammingError):  # (no table yet)
                if connection.exec_driver_sql("SELECT count(*) FROM conversations").scalar_one() >= count:
                    return
            time.sleep(0.05)
    finally:
        engine.dispose()
    raise AssertionError(f"the sync never stored {count} conversations")


@pytest.mark.postgres
def test_a_database_that_refuses_chatsync_is_not_waited_for(
    cli: Any, emulator_factory: Any, postgres_url: str
) -> None:
    from sqlalchemy.engine import make_url

    server = emulator_factory(conversations=50, seed=25)
    missing = make_url(postgres_url).set(database="chatsync_no_such_database").render_as_string(False)
    started = time.monotonic()
    result = cli("sync", "--json", "--retry-budget", "30s", env=chatbase_env(server, missing))
    assert time.monotonic() - started < 10
    assert result.exit_code == 1 and "does not exist" in json.loads(result.stdout)["error"]
    assert "unreachable" not in result.stderr


def _postgres_that_says(code: str, message: str) -> tuple[int, threading.Event]:
    """A server that speaks just enough of PostgreSQL's protocol to turn each connection away with a FATAL
    ``code`` and ``message``, as a real server does while it starts up or when a password is wrong."""
    import socket
    import struct

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def refuse(connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            while True:
                size = struct.unpack("!I", connection.recv(4, socket.MSG_WAITALL))[0]
                packet = connection.recv(size - 4, socket.MSG_WAITALL)
                if struct.unpack("!I", packet[:4])[0] in (80877103, 80877104):  # SSL or GSS asked: no
                    connection.sendall(b"N")
                    continue
                fields = b"".join(
                    kind + value.encode() + b"\0"
                    for kind, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", code), (b"M", message))
                )
                connection.sendall(b"E" + struct.pack("!I", len(fields) + 5) + fields + b"\0")
                return

    def serve() -> None:
        with listener:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    threading.Thread(target=refuse, args=(listener.accept()[0],), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], stop


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("code", "message", "down"),
    [
        ("57P03", "the database system is starting up", True),
        ("53300", "sorry, too many clients already", True),
        ("28P01", 'password authentication failed for user "postgres"', False),
        ("3D000", 'database "shop" does not exist', False),
        ("3D000", 'database "the database system is starting up" does not exist', False),
        ("57P03", "das Datenbanksystem startet", False),  # (another language: refused, fails at once)
    ],
)
def test_a_server_turning_connections_away_for_now_is_told_from_one_refusing_chatsync(
    code: str, message: str, down: bool
) -> None:
    from chatsync.errors import DatabaseUnreachable

    port, stop = _postgres_that_says(code, message)
    engine = open_engine(f"postgresql://postgres@127.0.0.1:{port}/shop?sslmode=disable")
    try:
        with pytest.raises(DatabaseUnreachable) as raised:
            ensure_schema(engine)
    finally:
        stop.set()
        engine.dispose()
    assert message in str(raised.value) and raised.value.down is down


@pytest.mark.postgres
def test_a_database_server_that_never_answers_is_given_up_on_within_its_connect_timeout(
    cli: Any, emulator_factory: Any, postgres_url: str
) -> None:
    """libpq waited 130 s (the TCP timeout) for a server that accepts and never answers: a 10 s budget ran
    131 s, with no warning."""
    import socket

    from sqlalchemy.engine import make_url

    server = emulator_factory(conversations=20, seed=26)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # (the kernel accepts; nobody answers)
        hung = make_url(postgres_url).set(port=silent.getsockname()[1]).render_as_string(False)
        started = time.monotonic()
        result = cli("sync", "--json", "--retry-budget", "3s", env=chatbase_env(server, hung))
        took = time.monotonic() - started
    assert result.exit_code == ExitCode.PARTIAL and took < 25, (took, result.output)
    assert "error: the database stayed unreachable for 10 s" in result.stderr
    assert "last: connection timeout expired)" in result.stderr  # (libpq's words, without the class name)
