"""db, demo, extract-test, reextract, help texts: the rest of the command line."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import select, text

from chatsync.cli import app
from chatsync.errors import ExitCode
from chatsync.store.engine import head_revision, open_engine
from chatsync.store.tables import conversations, sync_days
from tests.conftest import chatbase_env


def _commands(group: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = []
    for info in group.registered_commands:
        found.append(((*prefix, info.name or info.callback.__name__), info.callback))
    for sub in group.registered_groups:
        found.extend(_commands(sub.typer_instance, (*prefix, sub.name)))
    return found


def test_every_command_has_help_text(cli: Any) -> None:
    commands = _commands(app)
    assert len(commands) >= 11
    for path, callback in commands:
        assert callback.__doc__ and callback.__doc__.strip(), f"chatsync {' '.join(path)} has no help"
        result = cli(*path, "--help")
        assert result.exit_code == 0 and "Usage" in result.stdout


def test_db_upgrade_and_info_mask_the_password(cli: Any, database_url: str) -> None:
    assert cli("--database-url", database_url, "db", "upgrade").exit_code == 0
    info = cli("--database-url", database_url, "db", "info")
    assert info.exit_code == 0
    assert head_revision() in info.stdout and "conversations" in info.stdout
    as_json = json.loads(cli("--database-url", database_url, "db", "info", "--json").stdout)
    assert as_json["schema"] == as_json["schema_head"] == head_revision()
    assert as_json["rows"]["conversations"] == 0 and as_json["url"].split("@")[-1] in database_url


def test_a_schema_newer_than_the_code_is_refused(cli: Any, database_url: str) -> None:
    assert cli("--database-url", database_url, "db", "upgrade").exit_code == 0
    engine = open_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    result = cli("--database-url", database_url, "list")
    assert result.exit_code == ExitCode.ERROR
    assert "is not one this chatsync knows" in result.stderr


def test_another_applications_tables_are_left_alone_with_one_line(cli: Any, database_url: str) -> None:
    """A database whose conversations table another tool made: 'unexpected OperationalError: table
    conversations already exists' before (found by a breaking helper); now one line, nothing touched."""
    statements = (
        "CREATE TABLE conversations (id TEXT PRIMARY KEY, body TEXT)",
        "INSERT INTO conversations VALUES ('theirs', 'keep me')",
    )
    if database_url.startswith("sqlite"):  # as the other application made it: not through chatsync
        import sqlite3

        path = Path(database_url.removeprefix("sqlite:///"))
        with sqlite3.connect(path) as connection:
            for statement in statements:
                connection.execute(statement)
        before = path.read_bytes()
    else:
        engine = open_engine(database_url)
        with engine.begin() as connection:
            for statement in statements:
                connection.execute(text(statement))
        engine.dispose()
    for command in (("db", "upgrade"), ("list",), ("status",)):
        result = cli("--database-url", database_url, *command)
        assert result.exit_code == ExitCode.CONFIG and result.stderr.count("\n") == 1
        assert "already holds tables chatsync would make (conversations)" in result.stderr
    doctor = cli(
        "--database-url", database_url, "doctor", env={"CHATBASE_API_KEY": "", "CHATBASE_CHATBOT_ID": ""}
    )
    assert doctor.exit_code == ExitCode.CONFIG  # it once said "schema empty: the next command upgrades it"
    assert "already holds tables chatsync would make" in doctor.stdout + doctor.stderr
    if database_url.startswith("sqlite"):
        assert path.read_bytes() == before  # not even its journal mode (it was once left in WAL)
    else:
        engine = open_engine(database_url)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT body FROM conversations")).scalar_one() == "keep me"
        engine.dispose()


def test_a_sqlite_path_that_cannot_be_made_is_one_line(cli: Any, tmp_path: Path) -> None:
    """A file where the database's folder should be: one line naming it, not 'unexpected FileExistsError'."""
    (tmp_path / "taken").write_text("not a folder")
    result = cli("list", env={"CHATSYNC_DATABASE_URL": f"sqlite:///{tmp_path / 'taken' / 'chatsync.db'}"})
    assert result.exit_code == ExitCode.ERROR
    assert result.stderr.startswith("error: cannot open the database:") and "taken" in result.stderr
    assert result.stderr.count("\n") == 1


def test_demo_syncs_and_reports_with_no_account(cli: Any, tmp_path: Path) -> None:
    result = cli("demo", "--conversations", "400", "--path", str(tmp_path / "demo.db"))
    assert result.exit_code == 0, result.stderr
    assert "sync ok" in result.stdout and "WhatsApp numbers" in result.stdout
    # piped into a file or a mail from cron, the titles end where their words end
    assert "sync ok\n" in result.stdout
    listed = cli("--database-url", f"sqlite:///{tmp_path / 'demo.db'}", "list", "--all", "--format", "json")
    assert len(json.loads(listed.stdout)) == 400
    # the command it suggests runs as printed (chatsync need not be on PATH: the README never activates)
    hint = next(line for line in result.stderr.splitlines() if line.startswith("explore it: "))
    command = [*shlex.split(hint.removeprefix("explore it: ")), "--format", "json"]
    explored = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert explored.returncode == 0, explored.stderr
    assert json.loads(explored.stdout) and all(r["whatsapp_number"] for r in json.loads(explored.stdout))


def test_extract_test_explains_each_candidate(cli: Any) -> None:
    result = cli("extract-test", "HK$91234567 or 9123 4567", "--json")
    verdict = json.loads(result.stdout)
    assert verdict["outcome"] == "captured" and verdict["number"] == "+85291234567"
    assert [c["rejected"] for c in verdict["candidates"]] == ["looks like money", None]
    table = cli("extract-test", "2024-01-05")
    assert "rejected: 8 digits grouped as 4-2-2" in table.stdout
    assert json.loads(cli("extract-test", "--prompt", "What's your Whatsapp no.?", "--json").stdout)[
        "is_prompt"
    ]


def test_extract_test_shows_the_original_text_of_each_candidate(cli: Any) -> None:
    reply = "\u2066+65\ufe0d 9123\u200b4567\u2069 or +44 / 6123 4567"
    verdict = json.loads(cli("extract-test", reply, "--json").stdout)
    assert verdict["number"] == "+6591234567"
    spans = [(c["text"], c["start"], c["end"], c["rejected"]) for c in verdict["candidates"]]
    assert spans == [
        ("+65\ufe0d 9123\u200b4567", 1, 15, None),
        ("+44", 20, 23, "foreign country code"),
        ("6123 4567", 26, 35, "belongs to the country code +44 before it"),
    ]
    assert all(reply[start:end] == text for text, start, end, _ in spans)
    table = cli("extract-test", reply).stdout
    assert "+65\ufe0d 9123\u200b4567" in table and "belongs to the country code +44 before it" in table


def test_reextract_applies_a_new_region_and_keeps_manual_numbers(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    server = emulator_factory(conversations=300, seed=41)
    env = chatbase_env(server, database_url)
    assert cli("sync", "--json", env=env).exit_code == 0
    planted = server.emulator.planted("demo-bot")
    local = [
        cid
        for cid, t in planted.items()
        if t.source == "extracted" and t.number and t.number.startswith("+852")
    ]
    manual = local[0]
    assert cli("set-whatsapp", manual, "6123 4567", env=env).exit_code == 0

    result = cli("reextract", "--region", "SG", env=env)
    assert result.exit_code == 0 and "stored numbers changed" in result.stderr
    engine = open_engine(database_url)
    with engine.connect() as connection:
        rows = dict(connection.execute(select(conversations.c.id, conversations.c.whatsapp_number)).all())
    assert rows[manual] == "+85261234567"
    # every other stored number is now what the rule finds with Singapore as the default region
    from chatsync.config import WhatsAppRule
    from chatsync.normalize import find_whatsapp

    singapore = WhatsAppRule(default_region="SG")
    changed = 0
    for raw in server.emulator.all_conversations("demo-bot"):
        if raw["id"] == manual:
            continue
        expected = find_whatsapp(raw["messages"], raw, singapore).number
        assert rows[raw["id"]] == expected
        changed += expected != planted[raw["id"]].number
    assert changed > 10
    assert cli("reextract", env=env).exit_code == 0  # back to HK: the planted numbers again
    with engine.connect() as connection:
        rows = dict(connection.execute(select(conversations.c.id, conversations.c.whatsapp_number)).all())
    engine.dispose()
    assert all(rows[cid] == t.number for cid, t in planted.items() if cid != manual)


def test_today_is_never_recorded_as_fetched(cli: Any, emulator_factory: Any, sqlite_url: str) -> None:
    server = emulator_factory(conversations=200, seed=42, days=3)
    assert cli("sync", "--json", env=chatbase_env(server, sqlite_url)).exit_code == 0
    engine = open_engine(sqlite_url)
    with engine.connect() as connection:
        days = set(connection.execute(select(sync_days.c.day)).scalars())
    engine.dispose()
    today = datetime.now(UTC).date()
    assert days and today not in days and max(days) < today


@pytest.mark.parametrize("fmt", ["json", "ndjson", "csv"])
def test_machine_formats_print_nothing_else_on_an_empty_database(cli: Any, sqlite_url: str, fmt: str) -> None:
    assert cli("--database-url", sqlite_url, "db", "upgrade").exit_code == 0
    result = cli("--database-url", sqlite_url, "list", "--format", fmt)
    assert result.exit_code == 0
    assert result.stdout in (
        "[]\n",
        "",
        "id,chatbot_id,created_at,last_message_at,source,customer,country,message_count,whatsapp_number,whatsapp_source\n",
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("list", "--until", "9999-12-31"), "out of range"),
        (("report", "--tz", "America"), "unknown time zone"),
        (("report", "--since", "1990-01-01", "--until", "2024-01-01"), "longer than 20 years"),
    ],
)
def test_out_of_range_input_exits_2_with_one_line(
    cli: Any, sqlite_url: str, args: tuple[str, ...], fragment: str
) -> None:
    assert cli("--database-url", sqlite_url, "db", "upgrade").exit_code == 0
    result = cli("--database-url", sqlite_url, *args)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_reader_that_stops_early_gets_no_error_message(cli: Any, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    assert cli("demo", "--conversations", "300", "--path", str(tmp_path / "demo.db")).exit_code == 0
    env = {**os.environ, "CHATSYNC_DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "chatsync", "list", "--all", "--format", "ndjson"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    assert json.loads(process.stdout.readline())["id"]
    process.stdout.close()  # like `| head -1`
    process.wait(timeout=30)
    assert process.stderr.read() == b""
    assert process.returncode == 141  # ~90 kB is more than the pipe holds: the pipe really broke


@pytest.mark.parametrize(
    "args",
    [
        ("report", "--format", "table"),
        ("status",),
        ("status", "--max-age", "2h"),
        ("list", "--limit", "5"),
        ("--help",),
        ("sync", "--help"),
    ],
    ids=["report-table", "status", "status-max-age", "list-table", "help", "sync-help"],
)
def test_tables_to_a_reader_that_stopped_reading_end_with_141_not_1(
    cli: Any, tmp_path: Path, args: tuple[str, ...]
) -> None:
    """rich ended the process with 1 on a closed pipe, which `status --max-age … | head -1` under
    pipefail reads as "stale" (a helper saw it 5 times in 6). Here the pipe is closed before the first
    write, so it breaks every time."""
    import os
    import subprocess
    import sys

    database = tmp_path / "demo.db"
    assert cli("demo", "--conversations", "100", "--path", str(database)).exit_code == 0
    env = {**os.environ, "CHATSYNC_DATABASE_URL": f"sqlite:///{database}", "CHATBASE_CHATBOT_ID": "demo-bot"}
    read, write = os.pipe()
    os.close(read)  # the reader is gone before chatsync writes anything
    try:
        process = subprocess.run(
            [sys.executable, "-m", "chatsync", *args, *(["--format", "table"] if args[0] == "list" else [])],
            stdout=write, stderr=subprocess.PIPE, env=env, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write)
    assert process.stderr == b""
    assert process.returncode == 141


def test_demo_never_deletes_files_beside_the_one_it_creates(cli: Any, tmp_path: Path) -> None:
    """``--path ./c`` once removed every file starting with "c": chatsync.db, contracts.pdf, …"""
    keep = ["chatsync.db", "chatsync.db-wal", "config.yaml", "contracts.pdf", "c.txt"]
    for name in keep:
        (tmp_path / name).write_text("precious")
    result = cli("demo", "--conversations", "20", "--path", str(tmp_path / "c"))
    assert result.exit_code == 0, result.stderr
    assert all((tmp_path / name).read_text() == "precious" for name in keep)
    again = cli("demo", "--conversations", "20", "--path", str(tmp_path / "chatsync.db"))
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert (tmp_path / "chatsync.db").read_text() == "precious"


def test_demo_where_no_folder_can_be_made_says_it_cannot_open_the_database(cli: Any, tmp_path: Path) -> None:
    """A newcomer's typo in --path (a file where the folder should be) once read as an "unexpected"
    FileExistsError; it is the same one line every other command gives."""
    (tmp_path / "a-file").write_text("not a folder")
    result = cli("demo", "--conversations", "20", "--path", str(tmp_path / "a-file" / "demo.db"))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot open the database:"), result.stderr
    assert "unexpected" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ("sync", "--json", "--chatbot-id", "b" * 129),
        ("access", "grant", "b" * 129, "--user", "user_1"),
        ("access", "grant", "bot", "--user", "u" * 65),
        ("sync", "--json", "--chatbot-id", "bot\x1b[31m"),
    ],
    ids=["long-chatbot", "grant-long-chatbot", "grant-long-user", "control-chars"],
)
def test_ids_too_long_for_their_columns_are_refused_the_same_on_every_database(
    cli: Any, database_url: str, args: tuple[str, ...]
) -> None:
    env = {
        "CHATSYNC_DATABASE_URL": database_url,
        "CHATBASE_API_KEY": "k",
        "CHATBASE_BASE_URL": "http://127.0.0.1:9",
    }
    result = cli(*args, env=env)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "expected up to" in result.stderr


@pytest.mark.parametrize(
    "command",
    [("list",), ("report",), ("quarantine", "list"), ("reextract",), ("status",), ("sync", "--json")],
)
def test_an_empty_chatbot_id_is_refused_not_a_filter_matching_nothing(
    cli: Any, sqlite_url: str, command: tuple[str, ...]
) -> None:
    assert cli("--database-url", sqlite_url, "db", "upgrade").exit_code == 0
    result = cli("--database-url", sqlite_url, *command, "--chatbot-id", "bot-a", "--chatbot-id", " ")
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "--chatbot-id': an empty id" in result.stderr  # (main() prints it as one line)


@pytest.mark.parametrize("big", ["9999999999", "99999999999999999999"])  # past PostgreSQL's integer, SQLite's
def test_a_quarantine_id_out_of_range_is_not_found(cli: Any, database_url: str, big: str) -> None:
    env = {"CHATSYNC_DATABASE_URL": database_url}
    assert cli("db", "upgrade", env=env).exit_code == 0
    for command in ("show", "retry"):
        result = cli("quarantine", command, big, env=env)
        assert result.exit_code == ExitCode.ERROR and "not found" in result.stderr, result.stderr
        assert "unexpected" not in result.stderr


def test_a_signal_another_thread_takes_waits_for_the_held_block() -> None:
    """Python runs every handler in the main thread, even for a signal another thread took from the
    system: holding it in the main thread alone once let SIGTERM end a sync in the middle of starting a
    worker, which then printed a traceback as it found the sync gone. A deferrable handler waits."""
    import os
    import signal
    import threading
    import time

    from chatsync.signals import deferrable, held

    seen: list[bool] = []
    inside = [False]
    previous = signal.signal(signal.SIGUSR1, deferrable(lambda signum, frame: seen.append(inside[0])))
    try:
        go = threading.Event()
        # started before the block, so the system may hand the signal to it (one started inside holds it)
        sender = threading.Thread(target=lambda: go.wait() and os.kill(os.getpid(), signal.SIGUSR1))
        sender.start()
        with held(signal.SIGUSR1):
            inside[0] = True
            go.set()
            sender.join()
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:  # bytecodes, where a handler would run
                pass
            inside[0] = False
        deadline = time.monotonic() + 2
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen == [False]


@pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads the fork server's signal mask in /proc"
)
def test_the_worker_pool_starts_its_fork_server_holding_ctrl_c() -> None:
    """A terminal sends Ctrl-C to the whole process group: the fork server (and the workers it forks)
    must be started holding it, or an early Ctrl-C prints the server's KeyboardInterrupt traceback above
    the sync's one line. Starting multiprocessing's resource tracker inside the held block turned the
    signals back on (Python 3.11), so the server started taking Ctrl-C."""
    code = """
import signal
from multiprocessing import forkserver
from chatsync.config import WhatsAppRule
from chatsync.workers import PageTask, ReaderPool
with ReaderPool(1) as pool:
    pool.submit(PageTask(b'{"data": []}', {}, "bot", WhatsAppRule())).result()
    pid = forkserver._forkserver._forkserver_pid
    status = open(f"/proc/{pid}/status").read().splitlines()
    blocked = int(next(line for line in status if line.startswith("SigBlk")).split()[1], 16)
    print(bool(blocked & (1 << (signal.SIGINT - 1))))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


@pytest.mark.parametrize(
    ("args", "wants_line"),
    [
        (("sync", "--json", "--bogus"), True),
        (("sync", "--json", "--lookback"), True),  # no value
        (("sync", "--bogus"), False),  # no --json: the usage error alone
        (("status", "--json", "sync"), False),  # another command's line refused: no sync line
        (("sync", "--concurrency", "many", "--json"), True),  # refused by chatsync itself: one line, not two
    ],
)
def test_sync_json_prints_its_line_when_the_command_line_itself_is_refused(
    tmp_path: Path, args: tuple[str, ...], wants_line: bool
) -> None:
    """A cron line with a typo: Typer refuses it before the command begins, and the log still gets the run's
    one JSON line (status failed, exit code 2) beside the usage error on stderr."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CHATSYNC_DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}",
    }
    done = subprocess.run(
        [sys.executable, "-m", "chatsync", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == ExitCode.USAGE, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == (1 if wants_line else 0), done.stdout
    if wants_line:
        line = json.loads(lines[0])
        assert line["status"] == "failed" and line["exit_code"] == 2 and line["fetched"] == 0
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
    if wants_line:  # the same words (docs/cli.md): it had "bad usage: " before them
        assert done.stderr.strip() == f"error: {line['error']}"
    assert not (tmp_path / "c.db").exists()  # refused: nothing was done


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("sync", "--json", "--database-url", "sqlite:///x.db"), "chatsync --database-url URL sync …"),
        (("list", "-q"), "chatsync -q list …"),
        (("db", "info", "--debug"), "chatsync --debug db info …"),
        (("list", "--bogus"), "No such option: --bogus (see 'chatsync list --help')"),
        (("show",), "Missing argument 'ID'. (see 'chatsync show --help')"),
    ],
)
def test_a_refused_command_line_is_one_line_saying_what_to_do(
    tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    """Typer printed four lines (usage, hint, blank, error), and for chatsync's own options given after the
    command suggested a look-alike (`--database-url` → "Possible options: --base-url")."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "chatsync", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == ExitCode.USAGE
    assert done.stderr.splitlines() == [f"error: {done.stderr[7:].strip()}"] and said in done.stderr, (
        done.stderr
    )


def _in_a_terminal(
    args: list[str], env: dict[str, str], cwd: Path, columns: int = 60
) -> tuple[int, list[str]]:
    """Run chatsync in a real terminal (a pty) ``columns`` wide: its exit code and what the terminal showed,
    as lines without colour codes (a carriage return starts a line too)."""
    import os
    import re

    primary, secondary = os.openpty()
    env = {**os.environ, **env, "COLUMNS": str(columns), "LINES": "40", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "chatsync", *args],
        stdin=secondary, stdout=secondary, stderr=secondary, env=env, cwd=cwd,
    )  # fmt: skip
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    code = process.wait(timeout=60)
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode()).replace("\r", "\n").splitlines()


def test_the_demo_command_to_copy_stays_one_line_on_a_narrow_terminal(tmp_path: Path) -> None:
    """At 80 columns rich broke "explore it: … --database-url sqlite:///… list" into two lines, each of which
    a newcomer pasted as a command. In a real terminal (a pty) 60 columns wide it is one line now."""
    code, lines = _in_a_terminal(
        ["demo", "--conversations", "40", "--path", str(tmp_path / "d.db")], {}, tmp_path
    )
    assert code == 0
    explore = [line for line in lines if line.startswith("explore it: ")]
    assert len(explore) == 1, lines[-5:]
    assert explore[0].endswith(f"--database-url sqlite:///{tmp_path / 'd.db'} list --has-whatsapp"), explore


def test_log_lines_print_whole_above_the_progress_bar(
    tmp_path: Path, emulator_factory: Any, database_url: str
) -> None:
    """The log handler kept the stderr of start-up, so on a terminal a line written while the progress bar
    ran was glued to the bar and its end erased by the next redraw (a breaking helper saw a warning cut)."""
    import re

    server = emulator_factory(conversations=3000, seed=5, latency_ms=40, rate_limit=None)
    env = chatbase_env(server, database_url, CHATSYNC_CONCURRENCY="2")
    code, lines = _in_a_terminal(["-v", "sync"], env, tmp_path, columns=300)
    assert code == 0, lines[-10:]
    logged = [line for line in lines if " INFO chatsync.sync: " in line]
    windows = [line for line in logged if " done (window " in line]
    assert len(windows) >= 2, lines[-20:]
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO chatsync\.sync: ")
    for line in logged:
        assert stamp.match(line), line  # starts its own line, not after a bar
    for line in windows:
        assert re.search(r"done \(window \d+ of \d+\)$", line), line  # and ends whole


def test_debug_logs_never_show_the_key_a_server_echoes_in_a_header(tmp_path: Path) -> None:
    """``--debug`` shows httpcore's response headers: a server echoing the key in X-Request-Id put it on
    33 lines of stderr (a breaking helper's finding)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Echoing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.send_header("X-Request-Id", self.headers.get("Authorization", ""))
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"message": "down"}')

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echoing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = "sk-echoed-in-a-header-7f3a"
    env = {
        **os.environ,
        "CHATBASE_API_KEY": key,
        "CHATBASE_CHATBOT_ID": "bot",
        "CHATBASE_BASE_URL": f"http://127.0.0.1:{server.server_port}/api/v1",
        "CHATSYNC_DATABASE_URL": f"sqlite:///{tmp_path / 'debug.db'}",
    }
    try:
        ran = subprocess.run(
            [sys.executable, "-m", "chatsync", "--debug", "sync", "--retry-budget", "1s"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.shutdown()
    assert ran.returncode == ExitCode.PARTIAL
    assert "x-request-id" in ran.stderr.lower() and "***" in ran.stderr  # httpcore's header lines are there
    assert key not in ran.stderr + ran.stdout and "7f3a" not in ran.stderr + ran.stdout


@pytest.mark.parametrize("kind", ["unreadable", "not UTF-8"])
def test_a_dotenv_chatsync_cannot_read_is_a_one_line_error(tmp_path: Path, kind: str) -> None:
    """A ``.env`` the user running chatsync cannot read (deploy.md has it ``chmod 600``; a service user
    that is not its owner) crashed every command with a traceback, and ``sync --json`` printed no line.
    Now exit 4 and one line naming the file, on stderr and in the JSON."""
    dotenv = tmp_path / ".env"
    if kind == "not UTF-8":
        dotenv.write_bytes(b"CHATBASE_API_KEY=\xff\xfe\n")
    elif os.geteuid() != 0:
        dotenv.write_text("CHATBASE_API_KEY=x\n")
        dotenv.chmod(0)
    else:  # (root reads any file: this one fails every read, EIO)
        dotenv.symlink_to("/proc/self/mem")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATSYNC_", "CHATBASE_"))}
    command = [sys.executable, "-m", "chatsync"]
    synced = subprocess.run(
        [*command, "sync", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert synced.returncode == ExitCode.CONFIG, synced.stderr
    line = json.loads(synced.stdout)
    assert line["error"].startswith(f"cannot read {dotenv}: "), line
    assert synced.stderr.strip() == f"error: {line['error']}"
    shown = subprocess.run([*command, "status"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (shown.returncode, shown.stderr.strip()) == (ExitCode.CONFIG, f"error: {line['error']}")


def test_a_command_run_from_a_folder_that_was_deleted_says_so(tmp_path: Path) -> None:
    """Its ./.env cannot be looked for: a FileNotFoundError traceback from Path.cwd() (helper-46)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATSYNC_", "CHATBASE_"))}
    script = f"cd {shlex.quote(str(gone))} && rmdir ../gone && exec {shlex.quote(sys.executable)} -m chatsync status"
    shown = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert (shown.returncode, shown.stderr.strip()) == (
        ExitCode.CONFIG,
        "error: cannot read ./.env: the current folder is gone (No such file or directory)",
    )
