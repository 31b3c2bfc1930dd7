"""One bad record never stops a sync: it is quarantined with its reason, or repaired, and the rest is stored.

The property test feeds the sync engine pages of arbitrary JSON-shaped records through an httpx
transport (Chatbase is outside this machine); the other tests go through the CLI over loopback.
"""

from __future__ import annotations

import itertools
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from chatsync.chatbase import ChatbaseClient
from chatsync.config import Secret, WhatsAppRule
from chatsync.jsonbody import decode_body
from chatsync.store.engine import ensure_schema, open_engine
from chatsync.store.tables import conversations, metadata, quarantine
from chatsync.sync import Syncer, SyncRequest
from tests.conftest import UNDER_CI
from tests.helpers import as_stored

DAY = date(2024, 5, 1)
PROMPT = "Hi! Before we start, may I have your WhatsApp number?"


@contextmanager
def serving(page_body: Callable[[int], bytes]) -> Iterator[str]:
    """A Chatbase stand-in over loopback answering ``get-conversations`` page N with ``page_body(N)``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            body = page_body(int(query.get("page", ["1"])[0]))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/v1"
    finally:
        server.shutdown()
        server.server_close()


def _page(*record_texts: str) -> Callable[[int], bytes]:
    first = ('{"data": [' + ", ".join(record_texts) + "]}").encode()
    return lambda page: first if page == 1 else b'{"data": []}'


def _conversation(conversation_id: str, reply: str, minute: int = 0) -> dict[str, Any]:
    return {
        "id": conversation_id,
        "created_at": f"2024-05-01T08:{minute:02d}:00Z",
        "source": "WhatsApp",
        "messages": [{"role": "assistant", "content": PROMPT}, {"role": "user", "content": reply}],
    }


def _env(base_url: str, database_url: str) -> dict[str, str]:
    return {
        "CHATBASE_API_KEY": "k",
        "CHATBASE_CHATBOT_ID": "bot",
        "CHATBASE_BASE_URL": base_url,
        "CHATSYNC_DATABASE_URL": database_url,
    }


def _stored(database_url: str) -> dict[str, Any]:
    engine = open_engine(database_url)
    with engine.connect() as connection:
        rows = {r.id: r for r in connection.execute(select(conversations))}
    engine.dispose()
    return rows


def _quarantined(database_url: str) -> list[Any]:
    engine = open_engine(database_url)
    with engine.connect() as connection:
        rows = list(connection.execute(select(quarantine).order_by(quarantine.c.record_key)))
    engine.dispose()
    return rows


# ----------------------------------------------------------------------------- the reported case, via the CLI
def test_half_an_emoji_from_javascript_is_repaired_and_the_whole_page_is_stored(
    cli: Any, database_url: str
) -> None:
    """JSON ``"6123 4567 thanks \\ud83d"`` (an emoji cut in half) once made every run exit 1 storing nothing."""
    good = json.dumps(_conversation("c-good", "9123 4567", 1))
    cut = json.dumps(
        _conversation("c-cut", "6123 4567 thanks \ud83d", 2)
    )  # ensure_ascii: \ud83d as JS writes it
    assert "\\ud83d" in cut
    with serving(_page(good, cut)) as base_url:
        env = _env(base_url, database_url)
        args = ("sync", "--json", "--since", "2024-05-01", "--until", "2024-05-01")
        first = cli(*args, env=env)
        again = cli(*args, "--full", env=env)
    assert first.exit_code == 0, first.stderr
    summary = json.loads(first.stdout)
    assert (summary["status"], summary["inserted"], summary["quarantined"], summary["repaired"]) == (
        "ok",
        2,
        0,
        1,
    )
    rows = _stored(database_url)
    assert rows["c-cut"].messages[1]["content"] == "6123 4567 thanks \ufffd"
    assert rows["c-cut"].whatsapp_number == "+85261234567"  # the number in the damaged reply still counts
    assert rows["c-good"].whatsapp_number == "+85291234567"
    assert again.exit_code == 0, again.stderr
    rerun = json.loads(again.stdout)
    assert (rerun["unchanged"], rerun["updated"], rerun["repaired"]) == (2, 0, 0)  # same hash every time


def test_conversations_with_nul_or_lone_surrogates_are_stored_repaired_by_a_full_sync(
    cli: Any, emulator_factory: Any, database_url: str
) -> None:
    from tests.conftest import chatbase_env
    from tests.helpers import assert_exact

    server = emulator_factory(conversations=400, seed=31, damaged_records=6, bad_records=2)
    first = cli("sync", "--json", env=chatbase_env(server, database_url))
    assert first.exit_code == 0, first.stderr
    summary = json.loads(first.stdout)
    damaged = len(server.emulator.damaged_indexes("demo-bot"))
    assert damaged >= 4
    assert (summary["inserted"], summary["quarantined"], summary["repaired"]) == (398, 2, damaged)
    assert_exact(database_url, server.emulator)  # every message as sent, but for U+FFFD where it had to be
    second = json.loads(cli("sync", "--json", "--full", env=chatbase_env(server, database_url)).stdout)
    assert (second["unchanged"], second["updated"], second["quarantined"]) == (398, 0, 2)


def test_a_number_that_becomes_an_integer_beyond_64_bits_is_a_change(cli: Any, database_url: str) -> None:
    """2**64 as a float, then as the integer: a fast decoder reads both as the same float, and the
    conversation must not be taken for unchanged (found by a helper breaking the v2 content hash)."""
    before = json.dumps({**_conversation("c-n", "9123 4567"), "n": 1.8446744073709552e19})
    after = json.dumps({**_conversation("c-n", "9123 4567"), "n": 2**64})
    args = ("sync", "--json", "--since", "2024-05-01", "--until", "2024-05-01", "--full")
    with serving(_page(before)) as base_url:
        first = cli(*args, env=_env(base_url, database_url))
    assert json.loads(first.stdout)["inserted"] == 1, first.stderr
    with serving(_page(after)) as base_url:
        second = cli(*args, env=_env(base_url, database_url))
    summary = json.loads(second.stdout)
    assert (summary["updated"], summary["unchanged"]) == (1, 0), second.stderr
    assert _stored(database_url)["c-n"].raw["n"] == 2**64


def test_records_python_cannot_decode_are_quarantined_and_the_rest_of_the_page_stored(
    cli: Any, database_url: str
) -> None:
    deep = '{"id": "c-deep", "created_at": "2024-05-01T08:00:00Z", "x": ' + "[" * 5000 + "]" * 5000 + "}"
    huge_int = '{"id": "c-int", "created_at": "2024-05-01T08:00:00Z", "n": ' + "7" * 5000 + "}"
    overflow = '{"id": "c-float", "created_at": "2024-05-01T08:00:00Z", "n": 1e400}'
    nan = '{"id": "c-nan", "created_at": "2024-05-01T08:00:00Z", "n": NaN}'
    good = json.dumps(_conversation("c-good", "9123 4567"))
    with serving(_page(deep, huge_int, good, overflow, nan)) as base_url:
        result = cli(
            "sync",
            "--json",
            "--since",
            "2024-05-01",
            "--until",
            "2024-05-01",
            env=_env(base_url, database_url),
        )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["status"], summary["inserted"], summary["quarantined"]) == ("ok", 1, 4)
    assert set(_stored(database_url)) == {"c-good"}
    reasons = {row.record_key: row.reason for row in _quarantined(database_url)}
    assert set(reasons) == {"c-deep", "c-int", "c-float", "c-nan"}
    assert "nested too deeply" in reasons["c-deep"]
    assert "over 4,300 digits" in reasons["c-int"]
    assert "not finite" in reasons["c-float"] and "not finite" in reasons["c-nan"]
    kept = {row.record_key: row.raw for row in _quarantined(database_url)}
    assert kept["c-deep"].startswith('{"id": "c-deep"')  # the raw text is kept for a later retry
    assert "7" * 5000 in kept["c-int"]


def test_decoding_a_body_keeps_bytes_and_structure_it_can_read() -> None:
    assert decode_body(b'\xef\xbb\xbf{"data": []}') == {"data": []}  # a UTF-8 byte order mark
    assert decode_body(b'{"data": ["caf\xe9"]}') == {"data": ["caf\ufffd"]}  # Latin-1 byte, not UTF-8
    with pytest.raises(ValueError):
        decode_body(b'{"data": [{"id": "c1"}, {"id"')  # truncated: worth retrying, not quarantining
    tricky = '{"pagination": {"data": [1]}, "data": [{"s": "],{\\"["}, ' + "[" * 3000 + "]" * 3000 + ", 5]}"
    decoded = decode_body(tricky.encode())
    assert decoded["pagination"] == {"data": [1]}
    assert decoded["data"][0] == {"s": '],{"['}
    assert decoded["data"][2] == 5
    assert type(decoded["data"][1]).__name__ == "UndecodableRecord"


# ------------------------------------------------------------------------------------------ property test
_TEXT = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["", " ", "\x00", "\ud83d", "a\ude00b", "9123 4567", "+852 6123\u200b4567", "👍🏽", "null"]
)
_NUMBERS = (
    st.integers(min_value=-(10**40), max_value=10**40)
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, -0.0, 1e308, 5e-324, 2**63, -(2**64) - 1])
)
_JSON = st.recursive(
    st.none() | st.booleans() | _NUMBERS | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=12,
)
_ROLES = st.sampled_from(["user", "assistant", "bot", "system", "Human", "", None, 7])


@st.composite
def _message(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(_JSON)  # not an object at all
    message: dict[str, Any] = {"role": draw(_ROLES), "content": draw(_TEXT | _JSON)}
    if draw(st.booleans()):
        message[draw(st.sampled_from(["createdAt", "created_at"]))] = draw(
            st.sampled_from(["2024-05-01T08:00:05Z", "2024-05-01T08:01:00.250Z", 1714550460, "soon", None])
        )
    return message


@st.composite
def _record(draw: st.DrawFn, ids: Iterator[str]) -> Any:
    """A conversation, often valid, often with a field of the wrong type, sometimes not a record at all."""
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return draw(_JSON)
    record: dict[str, Any] = {
        "id": next(ids),
        "created_at": (datetime(2024, 5, 1, tzinfo=UTC) + timedelta(seconds=draw(st.integers(0, 86399))))
        .isoformat()
        .replace("+00:00", "Z"),
        "messages": draw(st.lists(_message(), max_size=4)),
    }
    record.update(draw(st.dictionaries(_TEXT, _JSON, max_size=3)))  # odd keys, maybe overriding ours
    if shape == 1:
        record[draw(st.sampled_from(["id", "created_at", "messages", "source", "country", "customer",
                                     "min_score", "chatbot_id", "last_message_at", "form_submission"]))] = draw(_JSON)  # fmt: skip
    if shape == 2:
        record["id"] = draw(st.integers(min_value=1, max_value=10**30))
    if shape == 3:
        record["source"] = draw(
            st.sampled_from(["WhatsApp", "whatsapp", "API", "S" * 70, "Widget or Iframe"])
        )
        record["form_submission"] = {
            "phone": draw(st.sampled_from(["85291234567", "+65 8123 4567", 12345678]))
        }
    return record


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers compare by value (PostgreSQL's JSONB gives 1e308 back as digits)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return Decimal(repr(a)) == Decimal(repr(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _stored_id(record: Any) -> str | None:
    """The key a record can be stored under: none for an id holding NUL or a lone surrogate (replaced,
    two such ids could become one, so those records are quarantined)."""
    if not isinstance(record, dict):
        return None
    value = record.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or as_stored(value) != value:
        return None
    return value


def _identity(record: Any) -> str:
    """What tells one record without a storable id from another in the quarantine: its raw id, if any."""
    value = record.get("id") if isinstance(record, dict) else None
    if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
        return json.dumps(value)
    return json.dumps(record, sort_keys=True)


def _created_elsewhere(record: dict[str, Any]) -> bool:
    """A record whose created_at is readable but on another day than the one asked for: not this sync's."""
    value = record.get("created_at")
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            moment = datetime.fromtimestamp(value / 1000 if value > 10**12 else value, UTC)
        elif isinstance(value, str):
            moment = datetime.fromisoformat(value.strip().replace("z", "Z"))
            moment = moment.replace(tzinfo=moment.tzinfo or UTC).astimezone(UTC)
        else:
            return False
    except (ValueError, OverflowError, OSError):
        return False
    return moment.date() != DAY


_settings = settings(
    max_examples=int(os.environ.get("CHATSYNC_PROPERTY_EXAMPLES", "60")),
    deadline=None,
    derandomize=UNDER_CI,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


def test_any_page_syncs_with_every_record_stored_exactly_or_quarantined(database_url: str) -> None:
    engine = open_engine(database_url)
    ensure_schema(engine)
    runs = itertools.count()

    @_settings
    @given(st.data())
    def check(data: st.DataObject) -> None:
        run = next(runs)
        with engine.begin() as connection:  # each example starts from empty tables: ids may repeat
            for table in reversed(metadata.sorted_tables):
                connection.execute(table.delete())
        ids = (f"r{run}-{n}-{uuid.uuid4().hex[:6]}" for n in itertools.count())
        records = data.draw(st.lists(_record(ids), max_size=8), label="page")
        chatbot = f"bot-{run}-{uuid.uuid4().hex[:6]}"
        body = ('{"data": [' + ", ".join(json.dumps(r) for r in records) + "]}").encode()

        def answer(request: httpx.Request) -> httpx.Response:
            page = int(request.url.params["page"])
            return httpx.Response(200, content=body if page == 1 else b'{"data": []}')

        for attempt in range(2):  # the second run sees the same page: unchanged, or quarantined again
            client = ChatbaseClient(
                Secret("k"), "http://chatbase.test/api/v1", transport=httpx.MockTransport(answer)
            )
            with client:
                summary = Syncer(engine, client, WhatsAppRule(), concurrency=2).run(
                    SyncRequest((chatbot,), since=DAY, until=DAY, full=attempt == 1)
                )
            assert summary.status == "ok"
            assert (
                summary.fetched
                == summary.inserted + summary.updated + summary.unchanged + summary.quarantined
            )
            if attempt == 1:
                assert summary.inserted == summary.updated == 0

        with engine.connect() as connection:
            stored = {
                r.id: r
                for r in connection.execute(
                    select(conversations).where(conversations.c.chatbot_id == chatbot)
                )
            }
            held = {
                r.record_key
                for r in connection.execute(select(quarantine).where(quarantine.c.chatbot_id == chatbot))
            }
        groups: dict[str | None, list[Any]] = {}
        for record in records:
            groups.setdefault(_stored_id(record), []).append(record)
        for key, group in groups.items():
            if key is None:
                continue
            if key in stored:  # the first copy the window claimed is stored exactly
                row = stored[key]
                assert any(
                    _same_json(row.messages, as_stored(r).get("messages") or [])
                    and _same_json(row.raw, {k: v for k, v in as_stored(r).items() if k != "messages"})
                    for r in group
                ), key
            else:
                for record in group:
                    assert key in held or _created_elsewhere(record), f"lost: {json.dumps(record)[:300]}"
        keyless = {_identity(r) for r in groups.get(None, [])}
        assert len(held - set(groups)) == len(keyless)  # each record without a storable id is kept once

    try:
        check()
    finally:
        engine.dispose()


def test_ids_that_repair_alike_are_quarantined_apart_and_apart_from_the_stored_conversation(
    database_url: str,
) -> None:
    """Ids no database keeps (a lone surrogate, NUL) are repaired to U+FFFD only for display: the
    quarantine must keep each such record on its own row, and not on the row a stored conversation whose
    id is the repaired text releases. Two such records once shared a row (one was lost), and a good
    conversation "x\ufffdy" reset the quarantined "x\x00y" on every run."""
    engine = open_engine(database_url)
    ensure_schema(engine)
    records = [
        _conversation("\ud800dup", "9123 4567", 1),
        _conversation("\udc00dup", "9123 4568", 2),
        _conversation("x\x00y", "9123 4569", 3),
        _conversation("x\ufffdy", "9123 4560", 4),
    ]
    body = ('{"data": [' + ", ".join(json.dumps(r) for r in records) + "]}").encode()

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body if request.url.params["page"] == "1" else b'{"data": []}')

    try:
        for _ in range(2):
            with ChatbaseClient(
                Secret("k"), "http://chatbase.test/api/v1", transport=httpx.MockTransport(answer)
            ) as client:
                summary = Syncer(engine, client, WhatsAppRule()).run(
                    SyncRequest(("bot",), since=DAY, until=DAY, full=True)
                )
            assert summary.status == "ok"
            assert summary.quarantined == 3 and summary.inserted + summary.unchanged == 1, summary
        with engine.connect() as connection:
            held = connection.execute(select(quarantine.c.record_key, quarantine.c.raw)).all()
            stored = connection.execute(select(conversations.c.id)).scalars().all()
        assert stored == ["x\ufffdy"]
        assert len(held) == 3 and len({key for key, _ in held}) == 3
        assert "x\ufffdy" not in {key for key, _ in held}
        kept = sorted(json.loads(raw)["id"] for _, raw in held)
        assert kept == sorted(["\ud800dup", "\udc00dup", "x\x00y"])  # each exactly as Chatbase sent it
    finally:
        engine.dispose()
