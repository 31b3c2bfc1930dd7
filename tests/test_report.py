"""The report: every key on hand-built data, and the same figures recomputed independently in Python."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from chatsync.analytics import offset_segments, percentile_from_distribution, report
from chatsync.chatbase import ChatbaseClient
from chatsync.config import Secret, WhatsAppRule
from chatsync.emulator import Emulator, EmulatorTransport
from chatsync.normalize import normalize_conversation
from chatsync.store import writes
from chatsync.store.queries import ConversationFilter
from chatsync.sync import Syncer, SyncRequest

PROMPT = "May I have your WhatsApp number?"


def _seed(engine: Any, raws: list[dict[str, Any]]) -> None:
    rows = [normalize_conversation(raw, "bot", WhatsAppRule()) for raw in raws]
    with engine.begin() as connection:
        writes.upsert_conversations(connection, rows, datetime.now(UTC))


def _msg(role: str, content: str, at: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"role": role, "content": content}
    if at:
        out["createdAt"] = at
    return out


HAND_BUILT = [
    {  # A: two timed replies, a customer string, no prompt
        "id": "A",
        "created_at": "2024-05-01T23:30:00Z",
        "source": "WhatsApp",
        "country": "HK",
        "customer": "cust_1",
        "messages": [
            _msg("user", "hi", "2024-05-01T23:30:00Z"),
            _msg("assistant", "hello", "2024-05-01T23:30:02Z"),
            _msg("user", "price", "2024-05-01T23:31:00Z"),
            _msg("assistant", "HK$680.", "2024-05-01T23:31:03Z"),
        ],
    },
    {  # B: no timestamps at all, captured number, left with a question
        "id": "B",
        "created_at": "2024-05-02T00:10:00Z",
        "source": None,
        "messages": [
            _msg("assistant", PROMPT),
            _msg("user", "9123 4567"),
            _msg("assistant", "Thanks! Anything else?"),
        ],
    },
    {  # C: one message, customer object
        "id": "C",
        "created_at": "2024-05-04T12:00:00Z",
        "source": "Widget or Iframe",
        "country": "SG",
        "customer": {"email": "x@example.com"},
        "messages": [_msg("user", "hi")],
    },
    {  # D: prompted, no number in the reply, a form phone
        "id": "D",
        "created_at": "2024-05-04T13:00:00Z",
        "source": "whatsapp",
        "form_submission": {"phone": "6591234567"},
        "messages": [_msg("assistant", PROMPT), _msg("user", "no")],
    },
]


def _grid(*cells: tuple[int, int]) -> list[list[int]]:
    grid = [[0] * 24 for _ in range(7)]
    for weekday, hour in cells:
        grid[weekday][hour] += 1
    return grid


def test_every_key_on_a_hand_built_set(engine: Any) -> None:
    _seed(engine, HAND_BUILT)
    with engine.connect() as connection:
        data = report(connection, ConversationFilter())
    assert data == {
        "window": {"since": None, "until": None, "timezone": "UTC"},
        "conversations": 4,
        "messages": 10,
        "user_messages": 5,
        "assistant_messages": 5,
        "users": 4,
        "users_coverage": 1.0,
        "engagement_rate": 0.25,
        "messages_per_conversation": {"mean": 2.5, "median": 2.5},
        "length_histogram": {"1": 1, "2": 1, "3-5": 2, "6-10": 0, "11-20": 0, "21+": 0},
        "response_time_seconds": {"mean": 2.5, "median": 2.5, "p90": 2.9, "pairs": 2, "coverage": 0.5},
        "first_response_time_seconds": {"mean": 2.0, "median": 2.0, "p90": 2.0, "coverage": 0.5},
        "unanswered_rate": 0.25,
        # API v1 records carry no feedback and no status: the figures are unknown, not 0
        "feedback": {
            "answers": None,
            "rated_up": None,
            "rated_down": None,
            "rated_up_share": None,
            "rated_down_share": None,
            "coverage": 0.0,
        },
        "takeover_rate": None,
        "status_coverage": 0.0,
        "by_status": None,
        "by_source": {"WhatsApp": 2, "Unspecified": 1, "Widget or Iframe": 1},
        "by_country": {"Unknown": 2, "HK": 1, "SG": 1},
        "by_phone_region": {"HK": 1, "SG": 1},
        "by_day": [
            {"date": d, "conversations": n, "messages": m, "rated_up_share": None, "rated_down_share": None}
            for d, n, m in [
                ("2024-05-01", 1, 4),
                ("2024-05-02", 1, 3),
                ("2024-05-03", 0, 0),
                ("2024-05-04", 2, 3),
            ]
        ],
        "by_weekday_hour": _grid((2, 23), (3, 0), (5, 12), (5, 13)),
        "whatsapp": {
            "prompted": 2,
            "replied": 2,
            "captured": 1,
            "capture_rate": 0.5,
            "manual": 0,
            "from_form": 1,
            "from_channel": 0,
            "from_lead": 0,
            "with_number": 2,
            "missed": {"no_reply": 0, "not_found": 1, "ambiguous": 0},
            "leads": 0,
        },
    }


def test_time_zone_moves_conversations_across_midnight(engine: Any) -> None:
    _seed(engine, HAND_BUILT)
    with engine.connect() as connection:
        utc = report(connection, ConversationFilter(), date(2024, 5, 2), date(2024, 5, 2))
        hk = report(connection, ConversationFilter(), date(2024, 5, 2), date(2024, 5, 2), "Asia/Hong_Kong")
        hk_all = report(connection, ConversationFilter(), tz="Asia/Hong_Kong")
    assert utc["conversations"] == 1  # only B starts on 2 May in UTC
    assert hk["conversations"] == 2  # A (07:30 local) and B (08:10 local)
    assert [d["conversations"] for d in hk_all["by_day"]] == [2, 0, 2]
    assert hk_all["by_day"][0]["date"] == "2024-05-02"
    assert hk_all["by_weekday_hour"] == _grid((3, 7), (3, 8), (5, 20), (5, 21))


def test_days_follow_daylight_saving_changes(engine: Any) -> None:
    _seed(
        engine,
        [
            {"id": "gmt", "created_at": "2024-03-31T00:30:00Z", "messages": [_msg("user", "a")]},
            {"id": "bst", "created_at": "2024-03-31T23:30:00Z", "messages": [_msg("user", "b")]},
        ],
    )
    with engine.connect() as connection:
        london = report(connection, ConversationFilter(), tz="Europe/London")
        utc = report(connection, ConversationFilter())
    assert [(d["date"], d["conversations"]) for d in london["by_day"]] == [
        ("2024-03-31", 1),
        ("2024-04-01", 1),
    ]
    assert [(d["date"], d["conversations"]) for d in utc["by_day"]] == [("2024-03-31", 2)]
    assert london["by_weekday_hour"] == _grid((6, 0), (0, 0))


def test_an_empty_window_is_zeros_and_nulls_with_every_day_listed(engine: Any) -> None:
    _seed(engine, HAND_BUILT)
    with engine.connect() as connection:
        data = report(connection, ConversationFilter(), date(2023, 1, 1), date(2023, 1, 3))
    assert data["conversations"] == 0 and data["messages"] == 0 and data["users"] == 0
    for key in ("users_coverage", "engagement_rate", "unanswered_rate"):
        assert data[key] is None
    assert data["messages_per_conversation"] == {"mean": None, "median": None}
    assert data["response_time_seconds"] == {
        "mean": None,
        "median": None,
        "p90": None,
        "pairs": 0,
        "coverage": None,
    }
    assert data["whatsapp"]["capture_rate"] is None
    assert [d["date"] for d in data["by_day"]] == ["2023-01-01", "2023-01-02", "2023-01-03"]
    assert all(d["conversations"] == 0 for d in data["by_day"])


def test_no_timestamps_means_null_timing_not_a_guess(engine: Any) -> None:
    _seed(engine, [HAND_BUILT[1]])
    with engine.connect() as connection:
        data = report(connection, ConversationFilter())
    assert data["response_time_seconds"] == {
        "mean": None,
        "median": None,
        "p90": None,
        "pairs": 0,
        "coverage": 0.0,
    }
    assert data["first_response_time_seconds"]["median"] is None


def test_filters_by_source_and_chatbot(engine: Any) -> None:
    _seed(engine, HAND_BUILT)
    with engine.connect() as connection:
        whatsapp = report(connection, ConversationFilter(sources=("WhatsApp",)))
        unspecified = report(connection, ConversationFilter(sources=("Unspecified",)))
        other_bot = report(connection, ConversationFilter(chatbot_ids=("other",)))
    assert whatsapp["conversations"] == 2
    assert unspecified["conversations"] == 1
    assert other_bot["conversations"] == 0


def test_percentiles_interpolate_like_percentile_cont() -> None:
    assert percentile_from_distribution([(1, 1), (2, 1), (3, 1), (4, 1)], 0.5) == 2.5
    assert percentile_from_distribution([(5, 3)], 0.9) == 5
    assert percentile_from_distribution([], 0.5) is None


def test_offset_segments_split_at_the_change() -> None:
    start = datetime(2024, 3, 30, tzinfo=UTC)
    segments = offset_segments("Europe/London", start, start + timedelta(days=3))
    assert segments == [(start, 0), (datetime(2024, 3, 31, 1, 0, tzinfo=UTC), 60)]


# ------------------------------------------------------------------------- independent recomputation
def _expected(
    raws: list[dict[str, Any]], planted: dict[str, Any], since: date | None, until: date | None, tz: str
):
    """The figures of analytics.md computed the slow, obvious way from what Chatbase sent."""
    zone = ZoneInfo(tz)

    def local(ts: str) -> datetime:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(zone)

    chosen = [
        r
        for r in raws
        if (since is None or local(r["created_at"]).date() >= since)
        and (until is None or local(r["created_at"]).date() <= until)
    ]
    counts = [len(r["messages"]) for r in chosen]
    users, keyed = set(), 0
    pairs: list[float] = []
    with_steps = with_pairs = unanswered = engaged = 0
    for r in chosen:
        customer = r.get("customer")
        label = (customer.get("email") or customer.get("name")) if isinstance(customer, dict) else customer
        key = planted[r["id"]].number or label
        if key:
            users.add(key)
            keyed += 1
        msgs = r["messages"]
        engaged += sum(m["role"] == "user" for m in msgs) >= 2
        unanswered += (
            bool(msgs)
            and msgs[-1]["role"] == "assistant"
            and msgs[-1]["content"].rstrip().endswith(("?", "？"))
        )
        steps = [
            (a, b) for a, b in itertools.pairwise(msgs) if a["role"] == "user" and b["role"] == "assistant"
        ]
        timed = []
        for a, b in steps:
            ta, tb = a.get("createdAt") or a.get("created_at"), b.get("createdAt") or b.get("created_at")
            if ta and tb:
                timed.append(
                    round(
                        (datetime.fromisoformat(tb[:-1]) - datetime.fromisoformat(ta[:-1])).total_seconds(), 3
                    )
                )
        with_steps += bool(steps)
        with_pairs += bool(timed)
        pairs += timed
    n = len(chosen)
    days = Counter(local(r["created_at"]).date().isoformat() for r in chosen)
    grid = [[0] * 24 for _ in range(7)]
    for r in chosen:
        moment = local(r["created_at"])
        grid[moment.weekday()][moment.hour] += 1

    def quantile(values: list[float], p: float) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        rank = p * (len(ordered) - 1)
        lo, hi = math.floor(rank), math.ceil(rank)
        return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo), 2)

    return {
        "conversations": n,
        "messages": sum(counts),
        "users": len(users),
        "users_coverage": round(keyed / n, 4) if n else None,
        "engagement_rate": round(engaged / n, 4) if n else None,
        "unanswered_rate": round(unanswered / n, 4) if n else None,
        "mean": round(statistics.fmean(counts), 2) if counts else None,
        "median": round(statistics.median(counts), 2) if counts else None,
        "pairs": len(pairs),
        "pair_median": quantile(pairs, 0.5),
        "pair_p90": quantile(pairs, 0.9),
        "pair_coverage": round(with_pairs / with_steps, 4) if with_steps else None,
        "by_source": Counter(r.get("source") or "Unspecified" for r in chosen),
        "by_country": Counter(r.get("country") or "Unknown" for r in chosen),
        "days": {d: c for d, c in days.items()},
        "grid": grid,
        "with_number": sum(1 for r in chosen if planted[r["id"]].number),
        "captured": sum(1 for r in chosen if planted[r["id"]].source == "extracted"),
        "from_form": sum(1 for r in chosen if planted[r["id"]].source == "form"),
    }


@pytest.fixture
def synced(engine: Any) -> tuple[Any, Emulator]:
    emulator = Emulator(conversations=1500, seed=31, days=40, rate_limit=None)
    with ChatbaseClient(
        Secret("demo-key"), "http://emulator/api/v1", transport=EmulatorTransport(emulator)
    ) as client:
        Syncer(engine, client, WhatsAppRule()).run(SyncRequest(("demo-bot",)))
    return engine, emulator


@pytest.mark.parametrize("tz", ["UTC", "Asia/Hong_Kong", "America/New_York", "Asia/Kolkata"])
@pytest.mark.parametrize("span", ["all", "ten-days", "one-day"])
def test_report_matches_an_independent_recomputation(
    synced: tuple[Any, Emulator], tz: str, span: str
) -> None:
    engine, emulator = synced
    raws = emulator.all_conversations("demo-bot")
    planted = emulator.planted("demo-bot")
    end = emulator.datasets["demo-bot"].end.date()
    since, until = {
        "all": (None, None),
        "ten-days": (end - timedelta(days=15), end - timedelta(days=6)),
        "one-day": (end - timedelta(days=3), end - timedelta(days=3)),
    }[span]
    with engine.connect() as connection:
        data = report(connection, ConversationFilter(), since, until, tz)
    want = _expected(raws, planted, since, until, tz)
    assert data["conversations"] == want["conversations"] > 0
    assert data["messages"] == want["messages"]
    assert data["users"] == want["users"]
    assert data["users_coverage"] == want["users_coverage"]
    assert data["engagement_rate"] == want["engagement_rate"]
    assert data["unanswered_rate"] == want["unanswered_rate"]
    assert data["messages_per_conversation"] == {"mean": want["mean"], "median": want["median"]}
    assert data["response_time_seconds"]["pairs"] == want["pairs"]
    assert data["response_time_seconds"]["median"] == want["pair_median"]
    assert data["response_time_seconds"]["p90"] == want["pair_p90"]
    assert data["response_time_seconds"]["coverage"] == want["pair_coverage"]
    assert data["by_source"] == dict(want["by_source"])
    assert data["by_country"] == dict(want["by_country"])
    assert {d["date"]: d["conversations"] for d in data["by_day"] if d["conversations"]} == want["days"]
    assert data["by_weekday_hour"] == want["grid"]
    assert data["whatsapp"]["with_number"] == want["with_number"]
    assert data["whatsapp"]["captured"] == want["captured"]
    assert data["whatsapp"]["from_form"] == want["from_form"]


def test_report_json_on_the_command_line_is_the_same_object(cli: Any, synced: tuple[Any, Emulator]) -> None:
    engine, _ = synced
    url = engine.url.render_as_string(hide_password=False)
    result = cli("--database-url", url, "report", "--format", "json", "--tz", "Asia/Hong_Kong")
    assert result.exit_code == 0, result.stderr
    with engine.connect() as connection:
        assert json.loads(result.stdout) == report(connection, ConversationFilter(), tz="Asia/Hong_Kong")
    table = cli("--database-url", url, "report", "--format", "table")
    assert table.exit_code == 0 and "WhatsApp numbers" in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    # the bars say what they count, and the grid's shades what they are a share of (newcomer helper)
    with engine.connect() as connection:
        data = report(connection, ConversationFilter())
    per = "week" if len(data["by_day"]) > 31 else "day"
    assert f"conversations started per {per}" in table.stdout
    busiest = max(v for row in data["by_weekday_hour"] for v in row)
    assert f"share of the busiest hour ({busiest:,} starts)" in table.stdout
