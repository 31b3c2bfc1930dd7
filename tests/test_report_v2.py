"""The report on API v2 data: answers rated up and down, takeovers, statuses and response times from the
messages' own times equal a recomputation from the emulator's ground truth (``Emulator.export_truth``);
on API v1 data those figures are null, and a range holding both counts only the v2 conversations.

The records are stored without the sync engine, the way a sync saves a page: each raw export record is
mapped by ``record_from_export``, normalised, and written by ``upsert_conversations`` a page at a time.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

import pytest
from sqlalchemy import select

from chatsync.analytics import report
from chatsync.chatbase_records import record_from_export
from chatsync.config import WhatsAppRule
from chatsync.emulator import Emulator, ExportTruth
from chatsync.normalize import normalize_conversation
from chatsync.store.queries import ConversationFilter
from chatsync.store.tables import conversations
from chatsync.store.writes import UpsertCounts, upsert_conversations
from tests.helpers import rollup_snapshot

PAGE = 20  # what one export page holds at most
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def store(engine: Any, records: Iterable[dict[str, Any]], chatbot_id: str, *, v2: bool) -> UpsertCounts:
    """Save records page by page, as a sync does: a v2 export record is mapped to v1's shape first."""
    rows = [
        normalize_conversation(record_from_export(r) if v2 else r, chatbot_id, WhatsAppRule())
        for r in records
    ]
    total = UpsertCounts()
    for start in range(0, len(rows), PAGE):
        with engine.begin() as connection:
            total.add(upsert_conversations(connection, rows[start : start + PAGE], datetime.now(UTC)))
    return total


def _rate(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def expected_figures(truths: Iterable[ExportTruth]) -> dict[str, Any]:
    """The v2 figures of docs/metrics.md, the slow obvious way, from what the emulator says it sent.

    The emulator sends ``feedback`` on every assistant message (null when not rated) and no message that
    holds tool calls only, so every assistant message is an answer whose feedback is known.
    """
    answers = up = down = rated_conversations = 0
    statuses: Counter[str] = Counter()
    by_day: dict[str, list[int]] = {}
    pairs: list[float] = []
    with_steps = with_pairs = conversations_seen = 0
    for truth in truths:
        conversations_seen += 1
        statuses[truth.status] += 1
        ratings = [f for role, f in zip(truth.roles, truth.feedback, strict=True) if role == "assistant"]
        day = by_day.setdefault(datetime.fromtimestamp(truth.created_at, UTC).date().isoformat(), [0, 0, 0])
        if ratings:
            rated_conversations += 1
            day[0] += len(ratings)
            day[1] += ratings.count("positive")
            day[2] += ratings.count("negative")
        answers += len(ratings)
        up += ratings.count("positive")
        down += ratings.count("negative")
        steps = [
            (a, b)
            for a, b in itertools.pairwise(range(len(truth.roles)))
            if truth.roles[a] == "user" and truth.roles[b] == "assistant"
        ]
        times = truth.message_times
        timed = [
            round(times[b] - times[a], 3)  # type: ignore[operator]
            for a, b in steps
            if times[a] is not None and times[b] is not None
        ]
        with_steps += bool(steps)
        with_pairs += bool(timed)
        pairs += timed

    def quantile(values: list[float], p: float) -> float | None:
        ordered = sorted(values)
        rank = p * (len(ordered) - 1)
        lo, hi = math.floor(rank), math.ceil(rank)
        return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo), 2)

    return {
        "feedback": {
            "answers": answers,
            "rated_up": up,
            "rated_down": down,
            "rated_up_share": _rate(up, answers),
            "rated_down_share": _rate(down, answers),
            "coverage": _rate(rated_conversations, conversations_seen),
        },
        "rated_conversations": rated_conversations,
        "takeover_rate": _rate(statuses["taken_over"], conversations_seen),
        "by_status": {s: statuses[s] for s in ("ongoing", "ended", "taken_over", "paused")},
        "daily_shares": {d: (_rate(u, n), _rate(w, n)) for d, (n, u, w) in sorted(by_day.items()) if n},
        "pairs": len(pairs),
        "pair_mean": statistics.fmean(pairs),
        "pair_median": quantile(pairs, 0.5),
        "pair_p90": quantile(pairs, 0.9),
        "pair_coverage": _rate(with_pairs, with_steps),
    }


def assert_v2_figures(data: dict[str, Any], want: dict[str, Any]) -> None:
    assert data["feedback"] == want["feedback"]
    assert data["takeover_rate"] == want["takeover_rate"]
    assert data["by_status"] == want["by_status"]
    shares = {d["date"]: (d["rated_up_share"], d["rated_down_share"]) for d in data["by_day"]}
    assert {d: s for d, s in shares.items() if s != (None, None)} == want["daily_shares"]
    timing = data["response_time_seconds"]
    assert timing["pairs"] == want["pairs"]
    assert timing["mean"] == pytest.approx(want["pair_mean"], abs=0.006)
    assert (timing["median"], timing["p90"]) == (want["pair_median"], want["pair_p90"])
    assert timing["coverage"] == want["pair_coverage"]


def test_v2_figures_equal_a_recomputation_from_the_emulators_truth(engine: Any) -> None:
    """5,000 conversations, on SQLite and PostgreSQL; from the rollups and from the conversations."""
    count = 5000
    emulator = Emulator(conversations=count, seed=23, days=30, rate_limit=None)
    records = emulator.all_export_records("demo-bot")
    assert store(engine, records, "demo-bot", v2=True).inserted == count
    truth = emulator.export_truth("demo-bot")
    want = expected_figures(truth.values())
    with engine.connect() as connection:
        via_rollups = report(connection, ConversationFilter())
        via_rows = report(connection, ConversationFilter(created_from=EPOCH))
    for data in (via_rollups, via_rows):
        assert data["conversations"] == count
        assert_v2_figures(data, want)
        assert data["status_coverage"] == 1.0
        assert data["response_time_seconds"]["coverage"] >= 0.95  # timed by the messages' own createdAt
    assert 0 < want["feedback"]["rated_down"] < want["feedback"]["rated_up"] < want["feedback"]["answers"]
    assert 0 < want["by_status"]["taken_over"] < count

    # Storing the same records again changes nothing: not a row, not a rollup.
    before = rollup_snapshot(engine)
    again = store(engine, records, "demo-bot", v2=True)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, count)
    assert rollup_snapshot(engine) == before


def test_v2_status_title_user_id_and_feedback_are_stored_and_v1_leaves_them_null(engine: Any) -> None:
    emulator = Emulator(conversations=300, seed=29, days=5, chatbot_ids=("v1-bot", "v2-bot"), rate_limit=None)
    store(engine, emulator.all_conversations("v1-bot"), "v1-bot", v2=False)
    store(engine, emulator.all_export_records("v2-bot"), "v2-bot", v2=True)
    columns = ("status", "title", "chatbase_user_id", "answers_feedback_known")
    with engine.connect() as connection:
        rows = {
            row.id: row
            for row in connection.execute(
                select(
                    conversations.c.id, conversations.c.chatbot_id, *[conversations.c[k] for k in columns]
                ).add_columns(conversations.c.answers_rated_up, conversations.c.answers_rated_down)
            )
        }
    v1 = [row for row in rows.values() if row.chatbot_id == "v1-bot"]
    assert len(v1) == 300
    assert all(getattr(row, k) is None for row in v1 for k in (*columns, "answers_rated_up"))
    records = {r["id"]: r for r in emulator.all_export_records("v2-bot")}
    for conversation_id, truth in emulator.export_truth("v2-bot").items():
        row = rows[conversation_id]
        ratings = [f for role, f in zip(truth.roles, truth.feedback, strict=True) if role == "assistant"]
        assert row.status == truth.status
        assert row.title == records[conversation_id]["title"]
        assert row.chatbase_user_id == truth.user_id
        assert (row.answers_feedback_known, row.answers_rated_up, row.answers_rated_down) == (
            (len(ratings), ratings.count("positive"), ratings.count("negative")) if ratings else (None,) * 3
        )


def test_a_range_of_v1_data_gives_null_and_a_mixed_range_counts_only_v2_conversations(engine: Any) -> None:
    emulator = Emulator(
        conversations=400, seed=37, days=10, chatbot_ids=("v1-bot", "v2-bot"), rate_limit=None
    )
    store(engine, emulator.all_conversations("v1-bot"), "v1-bot", v2=False)
    store(engine, emulator.all_export_records("v2-bot"), "v2-bot", v2=True)
    want = expected_figures(emulator.export_truth("v2-bot").values())
    everything = ConversationFilter()
    only_v1 = ConversationFilter(chatbot_ids=("v1-bot",))
    with engine.connect() as connection:
        mixed = [report(connection, everything), report(connection, replace(everything, created_from=EPOCH))]
        v1 = [report(connection, only_v1), report(connection, replace(only_v1, created_from=EPOCH))]
        first, last = (date.fromisoformat(mixed[0]["by_day"][i]["date"]) for i in (0, -1))
        mixed.append(report(connection, everything, first, last))
        v1.append(report(connection, only_v1, first, last))
    for data in mixed:
        assert data["conversations"] == 800
        assert data["feedback"] == {**want["feedback"], "coverage": _rate(want["rated_conversations"], 800)}
        assert data["takeover_rate"] == want["takeover_rate"]
        assert data["by_status"] == want["by_status"]
        assert data["status_coverage"] == 0.5
        shares = {d["date"]: (d["rated_up_share"], d["rated_down_share"]) for d in data["by_day"]}
        assert {d: s for d, s in shares.items() if s != (None, None)} == want["daily_shares"]
    for data in v1:
        assert data["conversations"] == 400
        assert data["feedback"] == {
            "answers": None,
            "rated_up": None,
            "rated_down": None,
            "rated_up_share": None,
            "rated_down_share": None,
            "coverage": 0.0,
        }
        assert (data["takeover_rate"], data["by_status"], data["status_coverage"]) == (None, None, 0.0)
        assert all(d["rated_up_share"] is None and d["rated_down_share"] is None for d in data["by_day"])


def _part(kind: str, call: str = "call_1", name: str = "lookup_price") -> dict[str, Any]:
    if kind == "tool-call":
        return {"type": "tool-call", "toolCallId": call, "toolName": name}
    return {"type": "tool-result", "toolCallId": call, "toolName": name, "output": {"hkd": 680}}


TOOL_RECORD = {  # an export record in which the bot calls a tool in a message of its own before answering
    "id": "tools-1",
    "title": "Price of a cleaning",
    "createdAt": 1_714_550_400,
    "updatedAt": 1_714_550_700,
    "userId": None,
    "source": "Widget or Iframe",
    "status": "ended",
    "messages": [
        {
            "id": "m1",
            "role": "user",
            "parts": [{"type": "text", "text": "How much?"}],
            "createdAt": 1_714_550_400,
        },
        {
            "id": "m2",
            "role": "assistant",
            "parts": [_part("tool-call"), _part("tool-result")],
            "createdAt": 1_714_550_401,
            "feedback": "negative",  # a tool call is not an answer a user rates
        },
        {
            "id": "m3",
            "role": "assistant",
            "parts": [{"type": "text", "text": "HK$680."}],
            "createdAt": 1_714_550_405,
            "feedback": "positive",
        },
        {
            "id": "m4",
            "role": "user",
            "parts": [{"type": "text", "text": "And whitening?"}],
            "createdAt": 1_714_550_500,
        },
        {
            "id": "m5",
            "role": "assistant",
            "parts": [{"type": "text", "text": "Ask at the desk, please."}],
            "createdAt": 1_714_550_503.5,
            "feedback": None,
        },
        {
            "id": "m6",
            "role": "assistant",
            "parts": [_part("tool-call", "call_2", "end_chat"), _part("tool-result", "call_2", "end_chat")],
            "createdAt": 1_714_550_504,
        },
    ],
}


def test_messages_of_tool_calls_only_neither_answer_nor_end_a_step(engine: Any) -> None:
    """user 400 → tool calls 401 → text 405 → user 500 → text 503.5 → tool calls 504: two steps, 5 s and
    3.5 s; two answers with feedback, one rated up; the last thing shown is a statement, not a question."""
    row = normalize_conversation(record_from_export(TOOL_RECORD), "bot", WhatsAppRule())
    assert (row["message_count"], row["assistant_messages"]) == (6, 4)  # every message still counts
    assert row["response_steps"] == 2
    assert row["response_seconds"] == [5.0, 3.5]
    assert row["first_response_seconds"] == 5.0
    assert (row["answers_feedback_known"], row["answers_rated_up"], row["answers_rated_down"]) == (2, 1, 0)
    store(engine, [TOOL_RECORD], "bot", v2=True)
    with engine.connect() as connection:
        data = report(connection, ConversationFilter())
    assert data["response_time_seconds"] == {
        "mean": 4.25,
        "median": 4.25,
        "p90": 4.85,
        "pairs": 2,
        "coverage": 1.0,
    }
    assert data["feedback"]["rated_up_share"] == 0.5 and data["feedback"]["rated_down_share"] == 0.0
    assert data["unanswered_rate"] == 0.0


def test_the_api_and_the_command_line_report_the_v2_figures(engine: Any, cli: Any) -> None:
    """GET /api/analytics carries every new figure (its response model would drop an undeclared one), and
    the table shows them: shares as percentages, and n/a where only v1 data is in range."""
    from fastapi.testclient import TestClient

    from chatsync.web.app import create_app
    from tests.api_helpers import api_settings, bearer, token

    emulator = Emulator(conversations=200, seed=41, days=4, chatbot_ids=("v1-bot", "v2-bot"), rate_limit=None)
    store(engine, emulator.all_conversations("v1-bot"), "v1-bot", v2=False)
    store(engine, emulator.all_export_records("v2-bot"), "v2-bot", v2=True)
    api = TestClient(create_app(engine, api_settings(engine)))
    response = api.get(
        "/api/analytics", headers=bearer(token(sub="user_admin")), params={"tz": "Asia/Hong_Kong"}
    )
    assert response.status_code == 200
    with engine.connect() as connection:
        direct = report(connection, ConversationFilter(), tz="Asia/Hong_Kong")
    assert response.json() == direct
    assert direct["by_status"] and direct["feedback"]["rated_up_share"]

    url = engine.url.render_as_string(hide_password=False)
    as_json = cli("--database-url", url, "report", "--format", "json", "--chatbot-id", "v1-bot")
    assert json.loads(as_json.stdout)["takeover_rate"] is None
    shares = direct["feedback"]
    v2_table = cli("--database-url", url, "report", "--format", "table", "--chatbot-id", "v2-bot").stdout
    v2_only = cli("--database-url", url, "report", "--format", "json", "--chatbot-id", "v2-bot").stdout
    takeover = json.loads(v2_only)["takeover_rate"]
    assert re.search(rf"answers rated up +{shares['rated_up_share'] * 100:.1f}%", v2_table)
    assert re.search(rf"taken over by a person +{takeover * 100:.1f}%", v2_table) and "taken_over" in v2_table
    v1_table = cli("--database-url", url, "report", "--format", "table", "--chatbot-id", "v1-bot").stdout
    for label in ("answers rated up", "answers rated down", "taken over by a person"):
        assert re.search(rf"{label} +n/a", v1_table)
    assert max(len(line) for line in v2_table.splitlines()) <= 80
