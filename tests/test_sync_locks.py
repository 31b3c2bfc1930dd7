"""One sync per chatbot, behind a transaction pooler (a real PgBouncer) and across hosts.

The CLI runs as real processes against the emulator, through PgBouncer in transaction mode with two
server connections handed out in turn; the tests watch the database directly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from sqlalchemy import text

from chatsync.errors import ExitCode, LockHeld, LockLost
from chatsync.store.engine import ensure_schema, open_engine
from chatsync.store.locks import chatbot_lock, sync_held
from tests.conftest import chatbase_env
from tests.helpers import assert_exact

pytestmark = pytest.mark.postgres

BUSY = "error: another sync of chatbot 'botA' is running; nothing was done"


def _sync_command() -> list[str]:
    return [sys.executable, "-m", "chatsync", "sync", "--json", "--chatbot-id", "botA"]


def _env(server: Any, database_url: str) -> dict[str, str]:
    return {**os.environ, **chatbase_env(server, database_url), "CHATSYNC_CONCURRENCY": "2"}


def _query(database_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        cursor = connection.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def _stored(database_url: str) -> int:
    return int(_query(database_url, "SELECT count(*) FROM conversations")[0][0])


def _wait_until(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting until {what}"
        time.sleep(0.1)


def _schema(database_url: str) -> None:
    engine = open_engine(database_url)
    ensure_schema(engine)
    engine.dispose()


def _table_exists(database_url: str, name: str) -> bool:
    return bool(_query(database_url, "SELECT to_regclass(%s) IS NOT NULL", name)[0][0])


def _lease_row(database_url: str) -> tuple[Any, ...] | None:
    rows = _query(
        database_url,
        "SELECT holder, host, pid, pid_namespace, process_start, expires_at > now() "
        "FROM sync_leases WHERE chatbot_id = 'botA'",
    )
    return rows[0] if rows else None


# ------------------------------------------------------------------------------- syncs through PgBouncer
@pytest.fixture
def busy_pooler(pooled_url: str) -> Iterator[str]:
    """The pooled URL, while another client's transactions come and go through the same pooler (as another
    application's do on a shared Supabase pooler), so that which server connection serves a transaction
    of chatsync's is not foreseeable."""
    stop = threading.Event()

    def other_client() -> None:
        with psycopg.connect(pooled_url.split("?")[0], autocommit=True, prepare_threshold=None) as connection:
            while not stop.is_set():
                connection.execute("SELECT 1")
                time.sleep(random.random() / 100)

    thread = threading.Thread(target=other_client, name="other-pooler-client")
    thread.start()
    try:
        yield pooled_url
    finally:
        stop.set()
        thread.join()


def test_overlapping_syncs_of_one_chatbot_behind_a_transaction_pooler_one_exits_75(
    emulator_factory: Any, postgres_url: str, busy_pooler: str, tmp_path: Path
) -> None:
    """While one sync runs, each later one (three, started together) exits 75 and does nothing."""
    server = emulator_factory(conversations=3000, seed=31, chatbot_ids=("botA",), latency_ms=500)
    env = _env(server, busy_pooler)
    started = [
        subprocess.Popen(
            _sync_command(), env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    ]
    try:
        _wait_until(
            lambda: (
                _table_exists(postgres_url, "sync_runs")
                and _query(postgres_url, "SELECT count(*) FROM sync_runs")[0][0] == 1
            ),
            "the first sync has started",
        )
        for _ in range(3):
            started.append(
                subprocess.Popen(
                    _sync_command(),
                    env=env,
                    cwd=tmp_path,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        later = [process.communicate(timeout=180) for process in started[1:]]
        overlapped = started[0].poll() is None
        out, err = started[0].communicate(timeout=180)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [
        (p.returncode, _exit_code_of(o), e.strip()) for p, (o, e) in zip(started[1:], later, strict=True)
    ] == [(ExitCode.LOCKED, ExitCode.LOCKED, "")] * 3  # with --json the summary line says it all
    assert overlapped, "the first sync ended before the later ones tried"
    assert started[0].returncode == 0, err
    assert json.loads(out)["status"] == "ok"
    assert _query(postgres_url, "SELECT count(*) FROM sync_runs")[0][0] == 1
    assert_exact(postgres_url, server.emulator)


def test_back_to_back_syncs_behind_a_transaction_pooler_all_exit_0(
    cli: Any, emulator_factory: Any, postgres_url: str, busy_pooler: str
) -> None:
    """A finished sync leaves no lock behind on a pooled server connection."""
    server = emulator_factory(conversations=300, seed=32, chatbot_ids=("botA",))
    env = chatbase_env(server, busy_pooler)
    codes = []
    for _ in range(8):
        result = cli("sync", "--json", "--chatbot-id", "botA", env=env)
        codes.append((result.exit_code, result.stderr.strip()))
    assert codes == [(0, "")] * 8
    assert _query(postgres_url, "SELECT count(*) FROM sync_leases")[0][0] == 0
    assert_exact(postgres_url, server.emulator)


def test_a_sigkilled_sync_behind_a_pooler_does_not_block_an_immediate_rerun_on_the_same_host(
    emulator_factory: Any, postgres_url: str, busy_pooler: str, tmp_path: Path
) -> None:
    server = emulator_factory(conversations=1500, seed=33, chatbot_ids=("botA",), latency_ms=300)
    env = _env(server, busy_pooler)
    killed = subprocess.Popen(
        _sync_command(), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_until(
            lambda: _table_exists(postgres_url, "conversations") and _stored(postgres_url) >= 100,
            "the sync has saved something",
        )
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    left = _lease_row(postgres_url)
    assert left is not None and left[2] == killed.pid and left[5], (
        left
    )  # the dead sync's lease is still fresh

    rerun = subprocess.run(
        _sync_command(), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["status"] == "ok"
    assert _lease_row(postgres_url) is None
    assert_exact(postgres_url, server.emulator)


def test_a_lease_held_on_another_host_blocks_with_75_until_it_expires_then_is_taken_over(
    cli: Any, emulator_factory: Any, postgres_url: str, busy_pooler: str
) -> None:
    """This host cannot see another host's processes: its lease stands until it expires (about a minute
    for a real one; a few seconds here)."""
    server = emulator_factory(conversations=200, seed=34, chatbot_ids=("botA",))
    env = chatbase_env(server, busy_pooler)
    _schema(postgres_url)
    _query(
        postgres_url,
        "INSERT INTO sync_leases VALUES ('botA', 'held-on-cron-2', 'cron-2.example.com', %s, "
        "'another-boot pid:[4026531836]', 1, now(), now() + interval '3 seconds')",
        os.getpid(),  # a pid that lives here too, which must not matter: it is another host's
    )
    blocked = cli("sync", "--json", "--chatbot-id", "botA", env=env)
    assert blocked.exit_code == ExitCode.LOCKED
    assert _exit_code_of(blocked.stdout) == ExitCode.LOCKED and blocked.stderr == ""
    assert _stored(postgres_url) == 0

    _wait_until(lambda: not _lease_row(postgres_url)[5], "the other host's lease has expired")  # type: ignore[index]
    taken = cli("sync", "--json", "--chatbot-id", "botA", env=env)
    assert taken.exit_code == 0, taken.stderr
    assert _lease_row(postgres_url) is None
    assert_exact(postgres_url, server.emulator)


def test_a_sync_whose_lease_is_taken_over_stops_with_exit_3_and_leaves_the_new_lease_alone(
    emulator_factory: Any, postgres_url: str, busy_pooler: str, tmp_path: Path
) -> None:
    """E.g. after a stall longer than the lease: the old holder must not run alongside the new one."""
    server = emulator_factory(conversations=3000, seed=35, chatbot_ids=("botA",), latency_ms=1000)
    env = _env(server, busy_pooler)
    process = subprocess.Popen(
        _sync_command(), env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_until(
            lambda: _table_exists(postgres_url, "sync_leases") and _lease_row(postgres_url) is not None,
            "the sync holds its lease",
        )
        _query(
            postgres_url,
            "UPDATE sync_leases SET holder = 'thief', host = 'cron-2.example.com', "
            "pid_namespace = 'another-boot pid:[1]', expires_at = now() + interval '1 minute' "
            "WHERE chatbot_id = 'botA'",
        )
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == ExitCode.PARTIAL, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: lost the sync lock of chatbot 'botA' (another sync took it over)"
    ), lines
    assert json.loads(out)["status"] == "partial"
    assert _stored(postgres_url) < 3000  # it stopped instead of running to the end
    assert _query(postgres_url, "SELECT status FROM sync_runs") == [("partial",)]
    assert _lease_row(postgres_url)[0] == "thief"  # type: ignore[index]

    _query(postgres_url, "DELETE FROM sync_leases")
    server.emulator.latency = 0
    again = subprocess.run(
        _sync_command(), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert again.returncode == 0, again.stderr
    assert_exact(postgres_url, server.emulator)


# ------------------------------------------------------------------------------------ the lease itself
@pytest.fixture
def pooled_engine(pooled_url: str) -> Any:
    engine = open_engine(pooled_url)
    ensure_schema(engine)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("via", ["direct", "pooler"])
def test_racing_takers_get_a_free_or_expired_lease_exactly_once(
    via: str, postgres_url: str, pooled_url: str
) -> None:
    engine = open_engine(postgres_url if via == "direct" else pooled_url)
    ensure_schema(engine)
    takers = 8
    for round_ in range(4):
        if round_ % 2:  # half the rounds race for an expired lease rather than a free one
            _query(
                postgres_url,
                "INSERT INTO sync_leases VALUES ('botA', 'expired', 'cron-2.example.com', 1, NULL, NULL, "
                "now() - interval '2 minutes', now() - interval '1 minute')",
            )
        start, done = threading.Barrier(takers), threading.Barrier(takers)
        outcomes: list[str] = []

        def take(
            start: threading.Barrier = start, done: threading.Barrier = done, outcomes: list[str] = outcomes
        ) -> None:
            start.wait()
            try:
                with chatbot_lock(engine, "botA"):
                    outcomes.append("held")
                    done.wait()
            except LockHeld:
                outcomes.append("busy")
                done.wait()

        threads = [threading.Thread(target=take) for _ in range(takers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(outcomes) == ["busy"] * (takers - 1) + ["held"], outcomes
        assert _query(postgres_url, "SELECT count(*) FROM sync_leases")[0][0] == 0
    engine.dispose()


def test_a_held_lease_is_renewed_past_its_length(pooled_engine: Any, postgres_url: str) -> None:
    with chatbot_lock(pooled_engine, "botA", lease=timedelta(seconds=1.2)):
        time.sleep(3)
        assert _lease_row(postgres_url)[5]  # type: ignore[index]  # its expiry is still ahead
        with pytest.raises(LockHeld), chatbot_lock(pooled_engine, "botA"):
            pass  # this process still lives: no takeover either
    assert _lease_row(postgres_url) is None


def _hold_in_another_process(database_url: str, tmp_path: Path) -> subprocess.Popen[str]:
    """A process of this host that takes botA's lease and keeps it until killed."""
    script = (
        "import sys, time\n"
        "from chatsync.store.engine import open_engine\n"
        "from chatsync.store.locks import chatbot_lock\n"
        f"with chatbot_lock(open_engine({database_url!r}), 'botA'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def test_a_lease_of_a_process_of_this_host_is_taken_at_once_when_it_died_or_its_pid_was_reused(
    pooled_engine: Any, pooled_url: str, postgres_url: str, tmp_path: Path
) -> None:
    holder = _hold_in_another_process(pooled_url, tmp_path)
    try:
        with pytest.raises(LockHeld), chatbot_lock(pooled_engine, "botA"):
            pass  # alive: it keeps its lease
        # Its pid now names a process that started at another time: the lease's holder is not it.
        _query(postgres_url, "UPDATE sync_leases SET process_start = process_start - 1")
        with chatbot_lock(pooled_engine, "botA"):
            assert _lease_row(postgres_url)[2] == os.getpid()  # type: ignore[index]
    finally:
        holder.kill()
        holder.wait()

    holder = _hold_in_another_process(pooled_url, tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert _lease_row(postgres_url)[5]  # type: ignore[index]  # fresh, yet its holder is gone
    with chatbot_lock(pooled_engine, "botA"):
        assert _lease_row(postgres_url)[2] == os.getpid()  # type: ignore[index]


def test_a_lease_of_a_dead_process_in_another_pid_namespace_is_not_taken_before_it_expires(
    pooled_engine: Any, postgres_url: str, tmp_path: Path
) -> None:
    """Another container on this machine (same hostname, same boot) has its own pids: they prove nothing."""
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    gone = int(finished.stdout)
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    _query(
        postgres_url,
        "INSERT INTO sync_leases VALUES ('botA', 'in-a-container', %s, %s, %s, 1, now(), now() + interval '1 minute')",
        os.uname().nodename,
        gone,
        f"{boot} pid:[1]",
    )
    with pytest.raises(LockHeld), chatbot_lock(pooled_engine, "botA"):
        pass


def test_a_holder_whose_lease_is_taken_over_is_told_and_leaves_the_new_lease_alone(
    pooled_engine: Any, postgres_url: str
) -> None:
    told: list[LockLost] = []
    lost = threading.Event()

    def on_lost(exc: LockLost) -> None:
        told.append(exc)
        lost.set()

    with chatbot_lock(pooled_engine, "botA", on_lost=on_lost, lease=timedelta(seconds=2)):
        _query(
            postgres_url, "UPDATE sync_leases SET holder = 'thief', expires_at = now() + interval '1 minute'"
        )
        assert lost.wait(timeout=10)
    assert [str(e) for e in told] == [
        "lost the sync lock of chatbot 'botA' (another sync took it over); stopped, what was committed "
        "is kept and the next run continues"
    ]
    assert told[0].exit_code == ExitCode.PARTIAL
    assert _lease_row(postgres_url)[0] == "thief"  # type: ignore[index]


def test_a_holder_that_cannot_renew_gives_up_before_its_lease_expires(
    pooled_engine: Any, postgres_url: str
) -> None:
    lost = threading.Event()
    told: list[LockLost] = []

    def on_lost(exc: LockLost) -> None:
        told.append(exc)
        lost.set()

    with (
        psycopg.connect(postgres_url) as blocker,
        chatbot_lock(pooled_engine, "botA", on_lost=on_lost, lease=timedelta(seconds=6)),
    ):
        # Renewals wait behind this row lock, as they would on a database that stopped answering.
        blocker.execute("SELECT 1 FROM sync_leases WHERE chatbot_id = 'botA' FOR UPDATE")
        try:
            gave_up = lost.wait(timeout=15)
            expiry_still_ahead = _query(postgres_url, "SELECT expires_at > now() FROM sync_leases")[0][0]
        finally:
            blocker.rollback()  # the renewal it waits for goes through, then the release
    assert gave_up
    assert expiry_still_ahead  # it gave up while the lease was still its own: nobody could have taken it yet
    assert "could not be renewed for 5 s" in str(told[0])
    assert _lease_row(postgres_url) is None


def test_a_lease_this_process_could_not_release_is_taken_again_at_once(
    pooled_engine: Any, postgres_url: str, pgbouncer: Any
) -> None:
    """The database was away when the sync ended (its release failed): the next sync in the same
    long-running process, e.g. `serve`, need not wait for the lease to lapse."""
    from sqlalchemy.engine import make_url

    database = make_url(postgres_url).database
    with psycopg.connect(pgbouncer.admin, autocommit=True, prepare_threshold=None) as console:
        try:
            with chatbot_lock(pooled_engine, "botA"):
                console.execute(f"DISABLE {database}")  # new connections are refused: the release fails
        finally:
            console.execute(f"ENABLE {database}")
    assert _lease_row(postgres_url)[5]  # type: ignore[index]  # left behind, and fresh
    with chatbot_lock(pooled_engine, "botA"):
        assert _lease_row(postgres_url)[2] == os.getpid()  # type: ignore[index]
    assert _lease_row(postgres_url) is None


def _exit_code_of(summary_line: str) -> int:
    """The exit code a `sync --json` that found its chatbot busy wrote in its one summary line."""
    summary = json.loads(summary_line)
    assert summary["status"] == "skipped" and summary["fetched"] == 0
    assert "error: " + summary["error"] == BUSY
    return int(summary["exit_code"])


@pytest.mark.parametrize(
    "naming",
    [
        "sqlite:///{link}",
        "sqlite:///file:{link}?uri=true",
        "sqlite:///file:{quoted}?uri=true&cache=private",
        "sqlite:///file://localhost{quoted}?uri=yes",  # (SQLAlchemy takes yes, on, 1 as true)
    ],
)
def test_a_sqlite_file_named_through_a_symlink_shares_its_lock(tmp_path: Path, naming: str) -> None:
    """Two syncs of one chatbot into one SQLite file, one naming it through a symlink or a ``file:`` URI:
    the second is refused, as it is for the same path (each once took a lock of its own, the URI one a
    lock in its process only, and both ran)."""
    real = tmp_path / "data" / "chatsync.db"
    real.parent.mkdir()
    link = tmp_path / "the link.db"
    engine = open_engine(f"sqlite:///{real}")
    ensure_schema(engine)
    link.symlink_to(real)
    other = open_engine(naming.format(link=link, quoted=quote(str(link))))
    with other.connect() as connection:  # (the URL reaches the very file: its schema is there)
        assert connection.execute(text("select count(*) from conversations")).scalar() == 0
    assert sync_held(other, "botA") is False
    try:
        with chatbot_lock(engine, "botA"):
            assert sync_held(other, "botA") is True
            with pytest.raises(LockHeld), chatbot_lock(other, "botA"):
                pass
            with chatbot_lock(other, "botB"):
                pass
        with chatbot_lock(other, "botA"):
            pass
    finally:
        engine.dispose()
        other.dispose()


def test_a_sqlite_path_through_a_symlink_then_dotdot_locks_the_file_sqlite_opens(tmp_path: Path) -> None:
    """``link/../data/c.db``: SQLAlchemy makes the path absolute as text (``../`` cancels ``link``) and
    SQLite opens ``data/c.db`` beside the link, not beside the link's target; the lock follows SQLite."""
    real = tmp_path / "data" / "chatsync.db"
    real.parent.mkdir()
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere" / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "sub")
    engine = open_engine(f"sqlite:///{real}")
    ensure_schema(engine)
    other = open_engine(f"sqlite:///{tmp_path}/link/../data/chatsync.db")
    try:
        with chatbot_lock(engine, "botA"), pytest.raises(LockHeld), chatbot_lock(other, "botA"):
            pass
    finally:
        engine.dispose()
        other.dispose()
    assert not list((tmp_path / "elsewhere" / "data").iterdir())


def test_a_sqlite_database_in_memory_named_by_a_uri_takes_a_lock_of_its_process() -> None:
    """``file::memory:`` is no file: nothing beside it to lock, nothing for status to probe (another
    process cannot reach it)."""
    engine = open_engine("sqlite:///file::memory:?uri=true")
    try:
        assert sync_held(engine, "botA") is None
        with chatbot_lock(engine, "botA"), pytest.raises(LockHeld), chatbot_lock(engine, "botA"):
            pass
    finally:
        engine.dispose()


def test_status_tells_a_run_still_syncing_another_chatbot_from_one_that_was_killed(database_url: str) -> None:
    """`sync --all-chatbots` holds the lock of the chatbot it is on, and has let go of those it is done
    with: status once called such a run "interrupted" for the chatbots it had finished, while it ran
    (found by a helper breaking it). The run lives while the lock of the chatbot it lists last is held."""
    from chatsync.operations import chatbot_statuses
    from chatsync.store import writes
    from chatsync.timeutil import utcnow

    engine = open_engine(database_url)
    ensure_schema(engine)
    try:
        with engine.begin() as connection:
            writes.start_run(connection, "run-1", ["bot-a", "bot-b"], utcnow())

        def statuses() -> dict[str, str]:
            with engine.connect() as connection:
                found = chatbot_statuses(connection, ["bot-a", "bot-b"], utcnow())
            return {s.chatbot_id: s.last_run["status"] for s in found if s.last_run}

        with chatbot_lock(engine, "bot-b"):
            assert statuses() == {"bot-a": "running", "bot-b": "running"}
        assert statuses() == {"bot-a": "interrupted", "bot-b": "interrupted"}
    finally:
        engine.dispose()
