"""Comparing what chatsync stored with what the emulator serves."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import create_engine, select

from chatsync.emulator import Emulator
from chatsync.store.engine import open_engine
from chatsync.store.tables import conversations, report_hours, report_users, report_values
from chatsync.timeutil import as_utc, parse_timestamp


def stored_conversations(database_url: str) -> dict[str, dict[str, Any]]:
    engine = open_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(conversations)).mappings().all()
        return {r["id"]: dict(r) for r in rows}
    finally:
        engine.dispose()


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def as_stored(value: Any) -> Any:
    """What chatsync promises to store for a value Chatbase sent: the same, with NUL and lone UTF-16
    surrogates replaced by U+FFFD (written here independently of chatsync's own repair)."""
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, list):
        return [as_stored(v) for v in value]
    if isinstance(value, dict):
        return {as_stored(k): as_stored(v) for k, v in value.items()}
    return value


def assert_exact(
    database_url: str, emulator: Emulator, chatbot_id: str | None = None
) -> dict[str, dict[str, Any]]:
    """Every good conversation the emulator serves is stored once, with its timestamps and messages."""
    stored = stored_conversations(database_url)
    if chatbot_id is not None:  # one chatbot of several: the others' conversations are not this one's
        stored = {k: v for k, v in stored.items() if v["chatbot_id"] == chatbot_id}
    chatbot_id = chatbot_id or next(iter(emulator.datasets))
    bad = set(emulator.bad_indexes(chatbot_id))
    expected = {
        raw["id"]: raw for i, raw in enumerate(emulator.all_conversations(chatbot_id)) if i not in bad
    }
    assert set(stored) == set(expected), (
        f"missing {len(set(expected) - set(stored))}, unexpected {len(set(stored) - set(expected))}"
    )
    for conversation_id, raw in expected.items():
        row = stored[conversation_id]
        assert as_utc(row["created_at"]) == parse_timestamp(raw["created_at"])
        assert row["messages"] == as_stored(raw["messages"])
        last = raw.get("last_message_at") or raw.get("updated_at")
        assert as_utc(row["last_message_at"]) == parse_timestamp(last)
    return stored


def assert_exact_v2(
    database_url: str, emulator: Emulator, chatbot_id: str | None = None
) -> dict[str, dict[str, Any]]:
    """Every good conversation the emulator's v2 export serves is stored once: its creation time, the
    messages with their parts, per-message ``createdAt`` and ``feedback`` and the text as ``content``,
    the status and title; compared with the generator's written-down facts, not with chatsync's mapping."""
    stored = stored_conversations(database_url)
    chatbot_id = chatbot_id or next(iter(emulator.datasets))
    stored = {k: v for k, v in stored.items() if v["chatbot_id"] == chatbot_id}
    truth = emulator.export_truth(chatbot_id)
    sent = {r["id"]: r for r in emulator.all_export_records(chatbot_id) if "id" in r}
    assert set(stored) == set(truth), (
        f"missing {len(set(truth) - set(stored))}, unexpected {len(set(stored) - set(truth))}"
    )
    for conversation_id, facts in truth.items():
        row, record = stored[conversation_id], sent[conversation_id]
        assert as_utc(row["created_at"]) == datetime.fromtimestamp(facts.created_at, UTC)
        messages = row["messages"]
        assert [m["role"] for m in messages] == list(facts.roles)
        assert [m["content"] for m in messages] == as_stored(list(facts.texts))
        assert [m.get("createdAt") for m in messages] == list(facts.message_times)
        assert [m.get("feedback") for m in messages] == list(facts.feedback)
        assert [m["parts"] for m in messages] == as_stored([m["parts"] for m in record["messages"]])
        assert sum(any(p["type"] == "tool-call" for p in m["parts"]) for m in messages) == facts.tool_calls
        times = [t for t in facts.message_times if t is not None]
        last = max(times) if times else facts.updated_at
        assert as_utc(row["last_message_at"]) == datetime.fromtimestamp(last, UTC)
        assert row["raw"]["status"] == row["status"] == facts.status
        assert row["raw"]["title"] == row["title"] == as_stored(record["title"])
        assert row["raw"]["userId"] == row["chatbase_user_id"] == facts.user_id
        rated = (facts.positive, facts.negative) if "assistant" in facts.roles else (None, None)
        assert (row["answers_rated_up"], row["answers_rated_down"]) == rated  # no answer: cannot say
    return stored


__all__ = ["assert_exact", "assert_exact_v2", "create_engine", "stored_conversations"]


@contextmanager
def fake_sentry() -> Iterator[tuple[str, list[bytes]]]:
    """A Sentry endpoint on loopback that keeps every envelope it receives, decompressed: the DSN, and
    the list of bodies (what would have left the machine)."""
    import gzip
    import zlib
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            encoding = (self.headers.get("content-encoding") or "").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding == "br":
                import brotli  # type: ignore[import-not-found]

                body = brotli.decompress(body)
            received.append(body)
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://publickey@127.0.0.1:{server.server_address[1]}/42", received
    finally:
        server.shutdown()
        server.server_close()


KILL_DELAYS = (1.2, 1.9, 2.6, 3.3, 4.0)  # seconds after start: early, while paging, near the end


def sync_killed_then_rerun(
    env: dict[str, str], cwd: Any, final_timeout: float
) -> tuple[list[int], subprocess.CompletedProcess[str]]:
    """Start ``chatsync sync --json`` and SIGKILL it at each of KILL_DELAYS (unless it ended first), then
    run it once to the end: the killed runs' exit codes, and the last run."""
    command = [sys.executable, "-m", "chatsync", "sync", "--json"]
    outcomes = []
    for delay in KILL_DELAYS:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        outcomes.append(process.returncode)
    final = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=final_timeout)
    return outcomes, final


def rollup_snapshot(engine: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the report's three rollups, sorted, by table name."""
    with engine.connect() as connection:
        return {
            table.name: sorted(tuple(row) for row in connection.execute(select(table)).all())
            for table in (report_hours, report_values, report_users)
        }
