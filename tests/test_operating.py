"""Running chatsync from cron and watching it: versions, help, logs, one JSON line a run, heartbeats, plans."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import pytest

from chatsync.errors import ExitCode
from tests.conftest import chatbase_env, chatbase_v2_env
from tests.test_cli_misc import _commands


@contextmanager
def monitor(status: int = 200) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """A healthchecks-style monitor on loopback recording every (path, body) it receives."""
    received: list[tuple[str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            received.append((self.path, body))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ping/0f1e2d3c-token", received
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------- conventions
def test_version_and_short_help(cli: Any) -> None:
    from chatsync import __version__

    for flag in ("--version", "-V"):
        result = cli(flag)
        assert result.exit_code == 0 and result.stdout.strip() == f"chatsync {__version__}"
    short = cli("sync", "-h")
    assert short.exit_code == 0 and "--dry-run" in short.stdout


def test_help_shows_readable_placeholders_never_python_types(cli: Any) -> None:
    for path, _ in _commands(__import__("chatsync.cli", fromlist=["app"]).app):
        text = cli(*path, "--help").stdout
        options = [line for line in text.splitlines() if line.strip().startswith("-")]
        for line in options:
            assert not re.search(r"<[a-z\[\]]+>", line), f"chatsync {' '.join(path)}: {line.strip()}"
    sync_help = cli("sync", "--help").stdout
    for placeholder in ("--since DATE", "--lookback DURATION", "--chatbot-id ID", "--concurrency N"):
        assert placeholder in sync_help


def test_the_command_list_is_not_cut_short_at_80_columns(cli: Any) -> None:
    """Click cuts a command's first sentence with "..." to fit: a newcomer read half-sentences."""
    text = cli("--help", env={"COLUMNS": "80"}).stdout
    commands = text[text.index("Commands:") :].splitlines()[1:]
    assert len(commands) >= 15 and not [line for line in commands if line.rstrip().endswith("...")], commands


def test_shell_completion_script_is_available(tmp_path: Path) -> None:
    # As a user types it in bash: the shell is found among the command's parent processes, so the test
    # runs it from a bash that stays its parent (`; true` keeps bash from exec-ing it)
    command = f"{shlex.quote(sys.executable)} -m chatsync --show-completion; true"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert "_chatsync_completion" in result.stdout and "complete" in result.stdout, result.stderr


# ------------------------------------------------------------------------------------ one line a run
def test_sync_json_is_one_compact_line_on_success(cli: Any, emulator_factory: Any, sqlite_url: str) -> None:
    server = emulator_factory(conversations=150, seed=41)
    result = cli("sync", "--json", env=chatbase_env(server, sqlite_url))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("\n") == 1
    line = json.loads(result.stdout)
    assert line["status"] == "ok" and line["inserted"] == 150
    assert "error" not in line and "exit_code" not in line


@pytest.mark.parametrize(
    ("args", "env_extra", "code", "status"),
    [
        (("--since", "2024-02-30"), {}, ExitCode.USAGE, "failed"),
        ((), {"CHATBASE_API_KEY": "wrong-key"}, ExitCode.CONFIG, "failed"),
        ((), {"CHATBASE_API_KEY": ""}, ExitCode.CONFIG, "failed"),
        (("--retry-budget", "1s"), {"__outage__": "1"}, ExitCode.PARTIAL, "partial"),
    ],
    ids=["bad-date", "rejected-key", "no-key", "outage"],
)
def test_sync_json_prints_one_line_with_the_error_and_exit_code_when_it_fails(
    cli: Any,
    emulator_factory: Any,
    sqlite_url: str,
    args: tuple[str, ...],
    env_extra: dict[str, str],
    code: int,
    status: str,
) -> None:
    from chatsync.emulator import Faults

    outage = env_extra.pop("__outage__", None)
    server = emulator_factory(conversations=50, seed=42, faults=Faults(fail_rate=1.0) if outage else None)
    env = {**chatbase_env(server, sqlite_url), **env_extra}
    result = cli("sync", "--json", *args, env=env)
    assert result.exit_code == code
    assert result.stdout.count("\n") == 1, result.stdout
    line = json.loads(result.stdout)
    assert (line["status"], line["exit_code"]) == (status, code)
    assert line["synced"] == []  # (a run that did not end ok says what it synced: here, before any chatbot)
    assert line["error"] and line["error"] in result.stderr  # the same one line the operator sees
    assert "wrong-key" not in result.stdout + result.stderr


def test_a_key_with_a_line_ending_syncs_and_one_no_header_carries_is_refused_unseen(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    server = emulator_factory(conversations=30, seed=44)
    crlf = cli("sync", "--json", env=chatbase_env(server, sqlite_url, CHATBASE_API_KEY="demo-key\r\n"))
    assert crlf.exit_code == 0 and json.loads(crlf.stdout)["inserted"] == 30, crlf.stderr
    requests = server.emulator.requests
    broken = cli("sync", "--json", env=chatbase_env(server, sqlite_url, CHATBASE_API_KEY="demo\x01key"))
    assert broken.exit_code == ExitCode.USAGE and server.emulator.requests == requests
    assert "demo" not in broken.stdout + broken.stderr and broken.stderr.count("\n") == 1
    assert "CHATBASE_API_KEY: the Chatbase key holds a control character" in broken.stderr
    ftp = cli("sync", "--json", "--base-url", "ftp://127.0.0.1/api/v1", env=chatbase_env(server, sqlite_url))
    assert ftp.exit_code == ExitCode.USAGE and "--base-url: invalid Chatbase API root" in ftp.stderr


def test_a_sync_since_a_day_after_today_is_refused(cli: Any, emulator_factory: Any, sqlite_url: str) -> None:
    server = emulator_factory(conversations=10, seed=45)
    for extra in ((), ("--dry-run",)):
        result = cli("sync", "--since", "2999-12-31", *extra, env=chatbase_env(server, sqlite_url))
        assert result.exit_code == ExitCode.USAGE and "--since 2999-12-31 is after today" in result.stderr
    assert server.emulator.requests == 0


# ---------------------------------------------------------------------------------------------- logs
def test_verbose_sync_logs_its_plan_windows_and_summary(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    server = emulator_factory(conversations=300, seed=43, bad_records=1)
    result = cli("-v", "sync", "--json", env=chatbase_env(server, sqlite_url))
    assert result.exit_code == 0, result.stderr
    log = result.stderr
    assert re.search(r"INFO chatsync.sync: chatbot demo-bot: \d+ day\(s\) to fetch, ", log)
    assert re.search(r"chatbot demo-bot: \d{4}-\d\d-\d\d\.\.\d{4}-\d\d-\d\d done \(window 1 of \d+\)", log)
    assert "quarantined 1 record(s) of chatbot demo-bot" in log
    assert re.search(r"sync [0-9a-f-]{36}: ok; \d+ requests", log)
    assert json.loads(result.stdout)["status"] == "ok"  # stdout still holds only the summary line

    quiet = cli("sync", "--json", env=chatbase_env(server, sqlite_url))
    assert quiet.stderr == ""  # nothing on stderr by default when all is well


def test_a_text_log_line_shows_control_characters_and_stays_one_line() -> None:
    """A conversation id or a Chatbase error text can hold ESC sequences and newlines: the log shows them."""
    import io
    import logging

    from chatsync.logs import log_handler

    stream = io.StringIO()
    logger = logging.getLogger("chatsync.test-log-line")
    logger.addHandler(log_handler("text", stream))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("repaired %s", "ev2-\x1b[2J\u202e[red]y\nINFO chatsync.sync: forged")
    finally:
        logger.handlers.clear()
    written = stream.getvalue()
    assert written.count("\n") == 1 and "\x1b" not in written and "\u202e" not in written
    assert "repaired ev2-␛[2J\ufffd[red]y␊INFO chatsync.sync: forged" in written


def test_the_emulator_prints_settings_that_paste_into_a_shell_or_a_dotenv_file(
    cli: Any, tmp_path: Path
) -> None:
    """One setting a line: pasted into .env (without 'export'), two on one line once became one value."""
    process = subprocess.Popen(
        [sys.executable, "-m", "chatsync", "emulator", "--port", "0", "--conversations", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        process.communicate(timeout=2)  # it prints the settings, then serves until stopped
    except subprocess.TimeoutExpired:
        process.terminate()
    out, err = process.communicate(timeout=10)
    lines = out.splitlines()
    assert process.returncode == 0  # a stop asked for is no failure
    assert all(line.startswith("export ") for line in lines) and "Ctrl-C to stop" in err, (out, err)
    settings = [line.removeprefix("export ") for line in lines]  # stdout: `> emulator.env` keeps just these
    assert len(settings) == 4, lines
    (tmp_path / ".env").write_text("\n".join(settings) + "\n")
    shown = cli("config", "show", "--json", env={"CHATBASE_CHATBOT_ID": "", "CHATBASE_BASE_URL": ""})
    assert shown.exit_code == 0, shown.stderr
    rows = {r["variables"][0]: r for r in json.loads(shown.stdout)["settings"]}
    assert rows["CHATBASE_CHATBOT_ID"]["value"] == "demo-bot"
    assert rows["CHATBASE_BASE_URL"]["value"].endswith("/api/v1")
    assert rows["CHATBASE_API_URL"]["value"].endswith("/api/v2")


def test_the_emulator_settings_source_in_a_shell_whatever_the_key_holds(tmp_path: Path) -> None:
    """`. ./emulator.env` broke on a key with `"` or `\\` in it: the values were printed unquoted."""
    key = 'sk-Odd+Key/with=x"y\\z $HOME `id` q'
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatsync",
            "emulator",
            "--port",
            "0",
            "--conversations",
            "10",
            "--api-key",
            key,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        process.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        process.terminate()
    out, _ = process.communicate(timeout=10)
    (tmp_path / "emulator.env").write_text(out)
    shown = subprocess.run(
        ["bash", "-c", '. ./emulator.env && printf %s "$CHATBASE_API_KEY"'],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=10,
    )
    assert shown.returncode == 0 and shown.stdout == key, (out, shown.stderr)


def test_an_emulator_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    """A newcomer's second emulator on 8765 ended with "unexpected OSError" (exit 1), like a crash."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "chatsync", "emulator", "--port", str(port), "--conversations", "10"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use; another emulator may be running "
        "there: stop it, or give another --port"
    ]


def test_json_log_format_writes_one_object_a_line(cli: Any, emulator_factory: Any, sqlite_url: str) -> None:
    server = emulator_factory(conversations=100, seed=44)
    env = {**chatbase_env(server, sqlite_url), "CHATSYNC_LOG_FORMAT": "json"}
    result = cli("-v", "sync", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records and all({"time", "level", "name", "message"} <= set(r) for r in records)
    assert records[-1]["level"] == "INFO" and records[-1]["time"].endswith("Z")


def test_retries_and_rate_limit_waits_are_logged(cli: Any, emulator_factory: Any, sqlite_url: str) -> None:
    from chatsync.emulator import Faults

    server = emulator_factory(conversations=200, seed=45, faults=Faults(fail_rate=0.3, retry_after=1))
    result = cli("-v", "sync", "--json", env=chatbase_env(server, sqlite_url))
    assert result.exit_code == 0, result.stderr
    assert re.search(r"Chatbase: HTTP (429|5\d\d)[^;]*; retry \d+ in \d+\.\d s", result.stderr)


# ---------------------------------------------------------------------------------------------- heartbeat
def test_heartbeat_is_pinged_with_the_summary_on_success_and_fail_on_failure(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    from chatsync.emulator import Faults

    server = emulator_factory(conversations=80, seed=46)
    with monitor() as (url, received):
        env = {**chatbase_env(server, sqlite_url), "CHATSYNC_HEARTBEAT_URL": url}
        assert cli("sync", "--json", env=env).exit_code == 0
        server.emulator.faults = Faults(fail_rate=1.0)
        assert cli("sync", "--json", "--full", "--retry-budget", "1s", env=env).exit_code == ExitCode.PARTIAL
    assert [path for path, _ in received] == ["/ping/0f1e2d3c-token", "/ping/0f1e2d3c-token/fail"]
    assert json.loads(received[0][1])["status"] == "ok"
    assert json.loads(received[1][1])["status"] == "partial"


def test_a_monitor_that_is_down_never_changes_how_the_run_ends(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    server = emulator_factory(conversations=40, seed=47)
    with monitor(status=503) as (url, received):
        env = {**chatbase_env(server, sqlite_url), "CHATSYNC_HEARTBEAT_URL": url}
        result = cli("sync", "--json", env=env)
    assert result.exit_code == 0 and len(received) == 1
    assert "heartbeat not delivered" in result.stderr and "0f1e2d3c-token" not in result.stderr
    gone = cli("sync", "--json", env={**env, "CHATSYNC_HEARTBEAT_URL": "http://127.0.0.1:9/nobody"})
    assert gone.exit_code == 0


# ------------------------------------------------------------------------------------------------ dry run
def test_dry_run_plans_with_no_request_beyond_the_plan_and_stores_nothing(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    from tests.helpers import stored_conversations

    server = emulator_factory(conversations=400, seed=48, days=20)
    env = chatbase_env(server, sqlite_url)
    first = cli("sync", "--dry-run", "--json", env=env)
    assert first.exit_code == 0, first.stderr
    plan = json.loads(first.stdout)
    asked = server.emulator.requests
    assert plan["planning_requests"] == asked and asked <= 14  # only the first-day search
    (bot,) = plan["chatbots"]
    assert bot["days"] >= 20 and bot["windows"] and bot["stored_conversations"] == 0
    assert stored_conversations(sqlite_url) == {}

    assert cli("sync", "--json", env=env).exit_code == 0
    before = server.emulator.requests
    again = json.loads(cli("sync", "--dry-run", "--json", env=env).stdout)
    assert server.emulator.requests == before  # the first day is known now: nothing asked at all
    (bot,) = again["chatbots"]
    assert bot["days"] <= 4 and bot["estimated_requests"] >= len(bot["windows"])
    table = cli("sync", "--dry-run", env=env)
    assert table.exit_code == 0 and "sync plan" in table.stdout


# ------------------------------------------------------------------------------------------------- status
def test_status_shows_each_chatbot_and_exits_1_when_the_last_good_sync_is_too_old(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    from chatsync.emulator import Faults

    server = emulator_factory(conversations=120, seed=51, chatbot_ids=("bot-a", "bot-b"), bad_records=2)
    env = chatbase_env(server, sqlite_url)
    assert cli("sync", "--json", "--chatbot-id", "bot-a", env=env).exit_code == 0

    fresh = cli("status", "--json", "--max-age", "2h", "--chatbot-id", "bot-a", env=env)
    assert fresh.exit_code == 0, fresh.stderr
    (a,) = json.loads(fresh.stdout)["chatbots"]
    assert a["last_run"]["status"] == "ok" and a["last_run"]["summary"]["inserted"] == 118
    assert a["conversations"] == 118 and a["quarantined"] == 2 and a["stale"] is False
    assert 0 <= a["last_good_sync_age_seconds"] < 600 and a["newest_conversation_at"].endswith("Z")

    # bot-b was never synced: stale under any --max-age
    never = cli(
        "status", "--json", "--max-age", "2h", "--chatbot-id", "bot-a", "--chatbot-id", "bot-b", env=env
    )
    assert never.exit_code == ExitCode.ERROR
    assert [c["stale"] for c in json.loads(never.stdout)["chatbots"]] == [False, True]
    assert "bot-b" in never.stderr and "bot-a" not in never.stderr

    # a failed last run shows with its error; the last good sync is still the earlier one, and ages
    server.emulator.faults = Faults(fail_rate=1.0)
    assert (
        cli("sync", "--json", "--chatbot-id", "bot-a", "--full", "--retry-budget", "1s", env=env).exit_code
        == 3
    )
    failed = json.loads(cli("status", "--json", "--chatbot-id", "bot-a", env=env).stdout)["chatbots"][0]
    assert failed["last_run"]["status"] == "partial" and "kept failing" in failed["last_run"]["error"]
    assert failed["last_good_sync_at"] == a["last_good_sync_at"]
    stale = cli("status", "--json", "--max-age", "0s", "--chatbot-id", "bot-a", env=env)
    assert stale.exit_code == ExitCode.ERROR and json.loads(stale.stdout)["chatbots"][0]["stale"] is True

    table = cli("status", env=env)  # every chatbot chatsync knows, as a table
    assert table.exit_code == 0 and "bot-a" in table.stdout and "partial" in table.stdout


def test_a_narrow_sync_does_not_count_as_a_complete_one_for_status(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    server = emulator_factory(conversations=60, seed=57)
    env = chatbase_env(server, sqlite_url)
    narrow = cli(
        "sync", "--json", "--source", "Slack", "--since", "2026-10-01", "--until", "2026-10-01", env=env
    )
    assert narrow.exit_code == 0, narrow.stderr
    stale = cli("status", "--json", "--max-age", "2h", env=env)
    assert (
        stale.exit_code == ExitCode.ERROR
        and json.loads(stale.stdout)["chatbots"][0]["last_good_sync_at"] is None
    )
    assert cli("sync", "--json", env=env).exit_code == 0
    assert cli("status", "--json", "--max-age", "2h", env=env).exit_code == 0


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_a_mistyped_chatbot_id_fails_once_and_does_not_stay_in_status(
    cli: Any, emulator_factory: Any, database_url: str, api: str
) -> None:
    server = emulator_factory(conversations=40, seed=58, chatbot_ids=("bot-a", "bot-b"))
    env = (chatbase_env if api == "v1" else chatbase_v2_env)(server, database_url, CHATBASE_CHATBOT_ID="")
    assert cli("sync", "--json", "--chatbot-id", "bot-a", "--chatbot-id", "bot-b", env=env).exit_code == 0

    typo = cli("sync", "--json", "--chatbot-id", "bot-c", env=env)
    assert typo.exit_code == ExitCode.CONFIG and "'bot-c' was not found" in typo.stderr
    listed = cli("status", "--json", "--max-age", "2h", env=env)
    assert listed.exit_code == 0, listed.stdout + listed.stderr
    assert [c["chatbot_id"] for c in json.loads(listed.stdout)["chatbots"]] == ["bot-a", "bot-b"]

    # a chatbot chatsync holds conversations of stays, whatever Chatbase says of it now
    del server.emulator.datasets["bot-b"]
    gone = cli("sync", "--json", "--chatbot-id", "bot-b", env=env)
    assert gone.exit_code == ExitCode.CONFIG
    kept = json.loads(cli("status", "--json", env=env).stdout)["chatbots"]
    assert [(c["chatbot_id"], c["conversations"]) for c in kept] == [("bot-a", 40), ("bot-b", 40)]
    assert kept[1]["last_run"]["status"] == "failed"


def test_a_mistyped_chatbot_id_among_several_does_not_stop_the_others(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    """A typo first in the list once ended the run before the good chatbot was asked for anything."""
    server = emulator_factory(conversations=40, seed=59, chatbot_ids=("bot-a", "bot-b"))
    env = chatbase_env(server, database_url, CHATBASE_CHATBOT_ID="")
    ran = cli("sync", "--json", "--chatbot-id", "bot-typo", "--chatbot-id", "bot-a", env=env)
    assert ran.exit_code == ExitCode.CONFIG
    line = json.loads(ran.stdout)
    assert line["status"] == "failed" and line["refused"] == ["bot-typo"] and line["inserted"] == 40
    assert "'bot-typo' was not found" in line["error"]
    assert ran.stderr.count("'bot-typo' was not found") == 1  # the error line alone
    told = cli("sync", "--chatbot-id", "bot-a", "--chatbot-id", "bot-typo", env=env)  # without --json
    assert told.exit_code == ExitCode.CONFIG and "sync failed" in told.stdout and "fetched" in told.stdout
    assert re.search(r"refused\s+│\s+bot-typo", told.stdout), told.stdout
    assert re.search(r"synced to the end\s+│\s+bot-a", told.stdout), told.stdout  # (as --json says)
    fresh = cli("status", "--json", "--max-age", "2h", "--chatbot-id", "bot-a", env=env)
    assert fresh.exit_code == 0, fresh.stdout + fresh.stderr  # bot-a's sync was a complete one
    # ... and its last run is told as its own: synced, not failed on another chatbot's typo
    (a,) = json.loads(fresh.stdout)["chatbots"]
    assert (a["last_run"]["status"], a["last_run"]["error"]) == ("ok", None)
    assert "bot-a:" not in cli("status", "--chatbot-id", "bot-a", env=env).stderr

    # a refused key is every chatbot's problem: the run ends with bot-a's first answers (its page asked
    # ahead and its first plan request), bot-b is never asked for
    wrong = cli(
        "sync", "--json", "--chatbot-id", "bot-a", "--chatbot-id", "bot-b", env={**env, "CHATBASE_API_KEY": "nope"}
    )  # fmt: skip
    assert wrong.exit_code == ExitCode.CONFIG and "refused" not in json.loads(wrong.stdout)
    assert json.loads(wrong.stdout)["requests"] <= 2 < line["requests"]


def test_a_dry_run_plans_the_chatbots_chatbase_knows_and_names_the_typo(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    """A dry run once stopped at the typo with no plan for the others, and with --json printed no object."""
    from tests.helpers import stored_conversations

    server = emulator_factory(conversations=30, seed=61, chatbot_ids=("bot-a", "bot-b"))
    env = chatbase_env(server, sqlite_url, CHATBASE_CHATBOT_ID="")
    ids = ("--chatbot-id", "bot-a", "--chatbot-id", "bot-typo", "--chatbot-id", "bot-b")
    planned = cli("sync", "--dry-run", "--json", *ids, env=env)
    assert planned.exit_code == ExitCode.CONFIG
    line = json.loads(planned.stdout)
    assert [p["chatbot_id"] for p in line["chatbots"]] == ["bot-a", "bot-b"] and line["refused"] == [
        "bot-typo"
    ]
    assert (line["status"], line["exit_code"]) == ("failed", 4) and "'bot-typo' was not found" in line[
        "error"
    ]
    shown = cli("sync", "--dry-run", *ids, env=env)
    assert shown.exit_code == ExitCode.CONFIG and "bot-a" in shown.stdout and "bot-b" in shown.stdout
    assert "'bot-typo' was not found" in shown.stderr and "refused by Chatbase: bot-typo" in shown.stderr
    alone = cli("sync", "--dry-run", "--chatbot-id", "bot-typo", env=env)
    assert alone.exit_code == ExitCode.CONFIG and alone.stdout == ""  # no empty plan
    assert stored_conversations(sqlite_url) == {}  # a dry run stores nothing, whatever it met

    # a dry run that fails before any plan still prints its one JSON object
    refused = cli("sync", "--dry-run", "--json", *ids, env={**env, "CHATBASE_API_KEY": "nope"})
    assert refused.exit_code == ExitCode.CONFIG
    assert json.loads(refused.stdout) | {"error": ""} == {
        "dry_run": True,
        "status": "failed",
        "error": "",
        "exit_code": 4,
    }


def test_a_v2_plan_without_api_access_ends_a_sync_of_several_chatbots_at_once(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    """API v2's 403 is the plan's, so every chatbot's: it was once taken as each chatbot's own refusal,
    asked for every one, and printed once per chatbot (found by a breaking helper)."""
    server = emulator_factory(conversations=20, seed=60, chatbot_ids=("p1", "p2", "p3"), v2_plan=False)
    env = chatbase_v2_env(server, sqlite_url, CHATBASE_CHATBOT_ID="")
    ran = cli("sync", "--json", "--chatbot-id", "p1", "--chatbot-id", "p2", "--chatbot-id", "p3", env=env)
    assert ran.exit_code == ExitCode.CONFIG and "refused" not in json.loads(ran.stdout)
    assert ran.stderr.count("API v2 needs a Chatbase plan") == 1


def test_status_tells_each_chatbot_of_a_run_that_ended_badly_what_it_did(database_url: str) -> None:
    """A run of two chatbots stopped (SIGTERM, an outage) after the first was synced to the end: status once
    showed both as failed, and only a run with a refused chatbot told them apart (found by a helper)."""
    from datetime import UTC, datetime

    from chatsync.operations import chatbot_statuses
    from chatsync.store import writes
    from chatsync.store.engine import ensure_schema, open_engine

    engine = open_engine(database_url)
    ensure_schema(engine)
    now = datetime.now(UTC)
    summary = {"status": "failed", "chatbots": ["bot-a", "bot-b"], "synced": ["bot-a"]}
    with engine.begin() as connection:
        writes.start_run(connection, "run-1", ["bot-a", "bot-b"], now)
        writes.finish_run(connection, "run-1", "failed", summary, "terminated (SIGTERM)", now)
    with engine.connect() as connection:
        runs = {s.chatbot_id: s.last_run for s in chatbot_statuses(connection, ["bot-a", "bot-b"], now)}
    engine.dispose()
    assert runs["bot-a"] is not None and (runs["bot-a"]["status"], runs["bot-a"]["error"]) == ("ok", None)
    assert runs["bot-b"] is not None and (runs["bot-b"]["status"], runs["bot-b"]["error"]) == (
        "failed",
        "terminated (SIGTERM)",
    )


def test_status_refuses_a_bad_max_age_with_one_line(cli: Any, sqlite_url: str) -> None:
    result = cli("status", "--max-age", "soon", env={"CHATSYNC_DATABASE_URL": sqlite_url})
    assert result.exit_code == ExitCode.USAGE and "invalid duration" in result.stderr


# --------------------------------------------------------------------------------------------- quarantine
def test_quarantine_list_show_and_retry_after_the_cause_is_fixed(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    from sqlalchemy import update

    from chatsync.store.engine import open_engine
    from chatsync.store.tables import quarantine

    server = emulator_factory(conversations=200, seed=52, bad_records=5)
    env = chatbase_env(server, database_url)
    assert json.loads(cli("sync", "--json", env=env).stdout)["quarantined"] == 5

    listed = json.loads(cli("quarantine", "list", "--format", "json", env=env).stdout)
    assert len(listed) == 5 and all(r["reason"] and r["chatbot_id"] == "demo-bot" for r in listed)
    assert "no id" in " ".join(r["reason"] for r in listed)
    shown = json.loads(cli("quarantine", "show", str(listed[0]["id"]), "--format", "json", env=env).stdout)
    assert json.loads(shown["raw"])  # the record as received
    assert cli("quarantine", "show", "999999", env=env).exit_code == ExitCode.ERROR

    # "after an upgrade fixed the cause": stand in for it by repairing one kept record in place
    fixable = next(r for r in listed if "unparsable created_at" in r["reason"])
    raw = json.loads(cli("quarantine", "show", str(fixable["id"]), "--format", "json", env=env).stdout)["raw"]
    record = json.loads(raw)
    record["created_at"] = "2024-05-01T08:00:00Z"
    engine = open_engine(database_url)
    with engine.begin() as connection:
        connection.execute(
            update(quarantine).where(quarantine.c.id == fixable["id"]).values(raw=json.dumps(record))
        )
    engine.dispose()

    retried = cli("quarantine", "retry", env=env)
    assert retried.exit_code == 0, retried.stderr
    assert "5 quarantined record(s): 1 stored, 4 still refused" in retried.stdout
    assert len(json.loads(cli("quarantine", "list", "--format", "json", env=env).stdout)) == 4
    shown = json.loads(cli("show", record["id"], "--format", "json", env=env).stdout)
    assert shown["created_at"] == "2024-05-01T08:00:00Z"
    csv_out = cli("quarantine", "list", "--format", "csv", env=env).stdout.splitlines()
    assert csv_out[0].startswith("id,chatbot_id,conversation_id,reason") and len(csv_out) == 5


def test_quarantine_retry_waits_for_a_running_sync(cli: Any, emulator_factory: Any, sqlite_url: str) -> None:
    from chatsync.store.engine import open_engine
    from chatsync.store.locks import chatbot_lock

    server = emulator_factory(conversations=100, seed=53, bad_records=1)
    env = chatbase_env(server, sqlite_url)
    assert cli("sync", "--json", env=env).exit_code == 0
    engine = open_engine(sqlite_url)
    with chatbot_lock(engine, "demo-bot"):
        busy = cli("quarantine", "retry", env=env)
    engine.dispose()
    assert busy.exit_code == ExitCode.LOCKED and "demo-bot" in busy.stderr
    assert cli("quarantine", "retry", env=env).exit_code == 0


# ------------------------------------------------------------------------------------------------- doctor
def _doctor(cli: Any, env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    result = cli("doctor", "--json", *args, env=env)
    report = json.loads(result.stdout)
    return result.exit_code, {c["name"]: c for c in report["checks"]}


def test_doctor_passes_a_good_setup_and_names_each_failure(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    from chatsync.emulator import Faults
    from chatsync.store.engine import open_engine
    from chatsync.store.locks import chatbot_lock

    server = emulator_factory(conversations=30, seed=54, chatbot_ids=("bot-a", "bot-b"))
    env = {**chatbase_env(server, database_url), "CHATBASE_CHATBOT_ID": "bot-a,bot-b"}
    assert cli("db", "upgrade", env=env).exit_code == 0
    code, checks = _doctor(cli, env)
    assert code == 0, checks
    assert set(checks) == {"database", "key", "chatbot bot-a", "chatbot bot-b", "lock bot-a", "lock bot-b"}
    assert all(c["ok"] and not c["warning"] for c in checks.values())
    assert server.emulator.requests == 2  # one size=1 request per chatbot

    code, checks = _doctor(cli, {**env, "CHATBASE_API_KEY": "sk-wrong-key-12345"})
    assert (
        code == ExitCode.CONFIG and not checks["key"]["ok"] and "CHATBASE_API_KEY" in checks["key"]["detail"]
    )
    assert "sk-wrong-key-12345" not in json.dumps(checks)

    code, checks = _doctor(cli, {**env, "CHATBASE_CHATBOT_ID": "bot-a,ghost"})
    assert code == ExitCode.CONFIG and checks["chatbot bot-a"]["ok"] and not checks["chatbot ghost"]["ok"]
    assert "ghost" in checks["chatbot ghost"]["detail"]

    code, checks = _doctor(cli, {**env, "CHATBASE_API_KEY": ""})
    assert code == ExitCode.CONFIG and "CHATBASE_API_KEY is not set" in checks["key"]["detail"]

    server.emulator.faults = Faults(fail_rate=1.0)
    code, checks = _doctor(cli, {**env, "CHATSYNC_RETRY_BUDGET": "1s"})
    assert code == ExitCode.ERROR and "did not answer" in checks["chatbot bot-a"]["detail"]
    server.emulator.faults = Faults()

    engine = open_engine(database_url)
    with chatbot_lock(engine, "bot-b"):
        code, checks = _doctor(cli, env)
    engine.dispose()
    assert code == 0 and checks["lock bot-b"]["warning"] and "running" in checks["lock bot-b"]["detail"]


def test_doctor_names_a_database_it_cannot_reach_and_one_it_must_not_touch(
    cli: Any, emulator_factory: Any, sqlite_url: str
) -> None:
    from sqlalchemy import text

    from chatsync.store.engine import open_engine

    server = emulator_factory(conversations=10, seed=55)
    env = chatbase_env(server, "postgresql://nobody:secret-pw@127.0.0.1:9/none")
    code, checks = _doctor(cli, env)
    assert (
        code == ExitCode.CONFIG
        and not checks["database"]["ok"]
        and "secret-pw" not in checks["database"]["detail"]
    )

    env = chatbase_env(server, sqlite_url)
    assert cli("db", "upgrade", env=env).exit_code == 0
    engine = open_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    code, checks = _doctor(cli, env)
    assert code != 0 and "is not one this chatsync knows" in checks["database"]["detail"]
    table = cli("doctor", env=env)
    assert "FAIL  database" in table.stdout


# -------------------------------------------------------------------------------------------- config show
def test_config_show_names_each_source_and_masks_secrets(cli: Any, tmp_path: Any) -> None:
    (tmp_path / ".env").write_text(
        "CHATBASE_API_KEY=sk-live-from-dotenv-123\nCHATSYNC_LOOKBACK=5d\n"
        "CHATSYNC_HEARTBEAT_URL=https://hc-ping.com/secret-uuid\nCHATSYNC_DATABASE_URL=postgresql://u:pw-in-dotenv@db/x\n"
    )
    env = {"CHATBASE_CHATBOT_ID": "bot-a,bot-b", "CHATSYNC_DATABASE_URL": ""}
    result = cli("--database-url", "postgresql://u:pw-on-flag@db/x", "config", "show", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    rows = {r["variables"][0]: r for r in json.loads(result.stdout)["settings"]}
    assert (rows["CHATSYNC_DATABASE_URL"]["origin"], rows["CHATSYNC_DATABASE_URL"]["from"]) == (
        "flag",
        "--database-url",
    )
    assert "pw-on-flag" not in rows["CHATSYNC_DATABASE_URL"]["value"]
    assert (rows["CHATBASE_CHATBOT_ID"]["origin"], rows["CHATBASE_CHATBOT_ID"]["value"]) == (
        "env",
        "bot-a,bot-b",
    )
    assert (rows["CHATBASE_API_KEY"]["origin"], rows["CHATBASE_API_KEY"]["value"]) == (".env", "***")
    assert (rows["CHATSYNC_LOOKBACK"]["origin"], rows["CHATSYNC_LOOKBACK"]["value"]) == (".env", "5d")
    assert (rows["CHATSYNC_RETRY_BUDGET"]["origin"], rows["CHATSYNC_RETRY_BUDGET"]["value"]) == (
        "default",
        "5m",
    )
    assert rows["CHATSYNC_HEARTBEAT_URL"]["value"] == "***"
    for secret in ("sk-live-from-dotenv-123", "secret-uuid", "pw-in-dotenv", "pw-on-flag"):
        assert secret not in result.stdout + result.stderr
    table = cli("config", "show", env=env)
    assert table.exit_code == 0 and "CHATSYNC_LOOKBACK" in table.stdout and ".env" in table.stdout
    assert "sk-live-from-dotenv-123" not in table.stdout


# ------------------------------------------------------------------------------------------------- Sentry
@pytest.mark.postgres
def test_a_failed_sync_reaches_sentry_without_the_key_or_the_database_password(
    emulator_factory: Any, postgres_url: str, tmp_path: Any
) -> None:
    """Frame locals (settings, connection URLs) and the command line once took both to Sentry."""
    import os
    import subprocess
    import sys

    from sqlalchemy.engine import make_url

    from tests.helpers import fake_sentry

    server = emulator_factory(conversations=10, seed=56)
    with_password = (
        make_url(postgres_url).set(password="pw-do-not-send-931").render_as_string(hide_password=False)
    )
    with fake_sentry() as (dsn, received):
        env = {
            **os.environ,
            "CHATSYNC_DATABASE_URL": with_password,
            "CHATBASE_BASE_URL": server.base_url,
            "CHATBASE_CHATBOT_ID": "demo-bot",
            "SENTRY_DSN": dsn,
        }
        done = subprocess.run(
            [sys.executable, "-m", "chatsync", "sync", "--json", "--api-key", "sk-do-not-send-4471"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == ExitCode.CONFIG, done.stderr  # the emulator refuses that key
    sent = b"\n".join(received)
    assert b"Chatbase rejected the request" in sent  # the failure did reach Sentry
    for secret in (b"pw-do-not-send-931", b"sk-do-not-send-4471"):
        assert secret not in sent


def test_a_quarantined_copy_goes_when_a_newer_one_is_stored_and_big_numbers_stay_numbers(
    cli: Any, database_url: str
) -> None:
    """A retry once brought back an old, quarantined version over the newer one stored since."""
    from tests.test_bad_records import serving

    old = (
        '{"id": "qr1", "created_at": "2024-05-01T08:00:00Z", "n": '
        + "7" * 5000
        + ', "messages": [{"role": "user", "content": "v1"}]}'
    )
    new = json.dumps(
        {
            "id": "qr1",
            "created_at": "2024-05-01T08:00:00Z",
            "messages": [{"role": "user", "content": "v1"}, {"role": "user", "content": "v2"}],
        }
    )
    body = {"page": old}
    env_of = lambda base: {  # noqa: E731
        "CHATBASE_API_KEY": "k", "CHATBASE_CHATBOT_ID": "bot", "CHATBASE_BASE_URL": base, "CHATSYNC_DATABASE_URL": database_url,
    }  # fmt: skip
    args = ("sync", "--json", "--full", "--since", "2024-05-01", "--until", "2024-05-01")
    with serving(
        lambda page: ('{"data": [' + body["page"] + "]}").encode() if page == 1 else b'{"data": []}'
    ) as base:
        assert json.loads(cli(*args, env=env_of(base)).stdout)["quarantined"] == 1
        kept = json.loads(cli("quarantine", "list", "--format", "json", env=env_of(base)).stdout)
        raw = json.loads(
            cli("quarantine", "show", str(kept[0]["id"]), "--format", "json", env=env_of(base)).stdout
        )["raw"]
        assert '"n": ' + "7" * 5000 in raw  # the number as it arrived, not a string
        retried = json.loads(cli("quarantine", "retry", "--json", env=env_of(base)).stdout)
        assert (retried["stored"], retried["still_refused"]) == (0, 1)  # still too long to hold exactly
        body["page"] = new
        assert json.loads(cli(*args, env=env_of(base)).stdout)["inserted"] == 1
        assert json.loads(cli("quarantine", "list", "--format", "json", env=env_of(base)).stdout) == []
        assert json.loads(cli("quarantine", "retry", "--json", env=env_of(base)).stdout)["examined"] == 0
        shown = json.loads(cli("show", "qr1", "--format", "json", env=env_of(base)).stdout)
    assert [m["content"] for m in shown["messages"]] == ["v1", "v2"]


def test_config_show_doctor_and_db_info_hide_passwords_in_any_url(cli: Any, tmp_path: Any) -> None:
    env = {
        "CHATSYNC_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
        "CHATBASE_BASE_URL": "https://user:pw-base-77@chatbase.example/api/v1?token=tok-88",
        "CLERK_API_URL": "https://admin:pw-clerk-99@clerk.example/v1",
    }
    shown = cli("config", "show", "--json", env=env)
    assert shown.exit_code == 0
    for secret in ("pw-base-77", "tok-88", "pw-clerk-99"):
        assert secret not in shown.stdout
    from chatsync.config import mask_url

    masked = mask_url("postgresql://u:pw-1@db/x?sslmode=require&password=pw-2&sslpassword=pw-3")
    assert "pw-" not in masked and "sslmode=require" in masked
    assert mask_url("sqlite:////var/lib/chatsync/x.db") == "sqlite:////var/lib/chatsync/x.db"


def test_doctor_on_an_empty_database_warns_and_changes_nothing(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    """What a user runs first against a new Supabase database: it once crashed on the missing lock table."""
    from sqlalchemy import inspect

    from chatsync.store.engine import open_engine

    engine = open_engine(database_url)
    with engine.begin():
        pass  # (SQLite: the file exists and is empty)
    server = emulator_factory(conversations=5, seed=59)
    code, checks = _doctor(cli, chatbase_env(server, database_url))
    assert code == 0, checks
    assert checks["database"]["warning"] and "schema empty" in checks["database"]["detail"]
    assert not any(name.startswith("lock") for name in checks)
    assert inspect(engine).get_table_names() == []
    engine.dispose()


def test_doctor_never_creates_a_database_it_checks(cli: Any, emulator_factory: Any, tmp_path: Any) -> None:
    server = emulator_factory(conversations=5, seed=58)
    missing = tmp_path / "not" / "there" / "x.db"
    code, checks = _doctor(cli, chatbase_env(server, f"sqlite:///{missing}"))
    assert code == 0 and checks["database"]["warning"] and "no database at" in checks["database"]["detail"]
    assert not (tmp_path / "not").exists()


@pytest.mark.parametrize("late", [1, 2])
@pytest.mark.parametrize("quarantined_before", [False, True])
def test_a_conversation_unreadable_on_one_page_and_readable_on_another_is_stored_and_not_kept(
    cli: Any, database_url: str, quarantined_before: bool, late: int
) -> None:
    """Chatbase sends a conversation unreadable on one page and readable on the next, in either order of
    arrival: the run stores it and keeps no quarantined copy (which a retry could put back over it),
    whether the quarantine held another record of the chatbot when the run began or nothing."""
    from tests.test_bad_records import serving

    def record(i: str, extra: str = "") -> str:
        message = json.dumps([{"role": "user", "content": f"hello {i}"}])
        return f'{{"id": "{i}", "created_at": "2024-05-01T08:00:00Z"{extra}, "messages": {message}}}'

    unreadable = record("qr2", ', "n": ' + "7" * 5000)
    fillers = [record(f"f{i}") for i in range(99)]
    pages = {1: [unreadable, *fillers], 2: [record("qr2")]}
    env = {
        "CHATBASE_API_KEY": "k", "CHATBASE_CHATBOT_ID": "bot", "CHATSYNC_DATABASE_URL": database_url,
    }  # fmt: skip
    args = ("sync", "--json", "--full", "--since", "2024-05-01", "--until", "2024-05-01")
    if quarantined_before:
        other = '{"data": [' + record("other", ', "n": ' + "8" * 5000) + "]}"
        with serving(lambda page: other.encode() if page == 1 else b'{"data": []}') as base:
            first = cli(*args, env={**env, "CHATBASE_BASE_URL": base})
            assert json.loads(first.stdout)["quarantined"] == 1, first.stdout + first.stderr

    def page_body(page: int) -> bytes:
        if page == late:
            time.sleep(0.5)  # the pages arrive, and are saved, in this order
        return ('{"data": [' + ",".join(pages.get(page, [])) + "]}").encode()

    with serving(page_body) as base:
        env["CHATBASE_BASE_URL"] = base
        summary = json.loads(cli(*args, env=env).stdout)
        assert (summary["inserted"], summary["quarantined"]) == (100, 1 if late == 2 else 0)
        kept = json.loads(cli("quarantine", "list", "--format", "json", env=env).stdout)
        shown = json.loads(cli("show", "qr2", "--format", "json", env=env).stdout)
    assert [q["conversation_id"] for q in kept] == (["other"] if quarantined_before else [])
    assert [m["content"] for m in shown["messages"]] == ["hello qr2"]
