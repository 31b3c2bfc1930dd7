"""The emulator's request handling, and the two ways to reach it: an httpx transport and an HTTP server."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from chatsync.emulator.data import BAD_RECORD_KINDS, DAMAGED_TEXT_KINDS, Dataset, Planted, damage, spoil


@dataclass
class Faults:
    """Fault injection: each request independently fails with these probabilities."""

    fail_rate: float = 0.0  # 429 with Retry-After, or 500/502/503
    slow_rate: float = 0.0  # answer after ``slow_seconds`` (a client timeout)
    malformed_rate: float = 0.0  # 200 with a truncated JSON body
    slow_seconds: float = 5.0
    retry_after: int = 1


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def _encode(payload: Any) -> bytes:
    """UTF-8 JSON; text with lone surrogates is written with ``\\u`` escapes, as JavaScript writes it."""
    try:
        return json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(payload, ensure_ascii=True).encode()


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, _encode(payload), {"content-type": "application/json", **(headers or {})})


class Emulator:
    """Answers Chatbase v1 requests from deterministic datasets, under a sliding-window rate limit."""

    def __init__(
        self,
        conversations: int = 1000,
        seed: int = 1,
        chatbot_ids: Iterable[str] = ("demo-bot",),
        api_key: str | None = "demo-key",
        end: datetime | None = None,
        days: float = 60,
        latency_ms: float = 0,
        rate_limit: tuple[int, float] | None = (100, 10.0),
        faults: Faults | None = None,
        bad_records: int = 0,
        damaged_records: int = 0,
    ) -> None:
        end = end or datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        self.datasets = {bot: Dataset(bot, conversations, seed, end, days) for bot in chatbot_ids}
        self.api_key = api_key
        self.latency = latency_ms / 1000
        self.rate_limit = rate_limit
        self.faults = faults or Faults()
        self.bad_records = bad_records
        self.damaged_records = damaged_records
        self._appended: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._recent: deque[float] = deque()
        self._rng = random.Random(seed)
        self.requests = 0
        self.throttled = 0
        self.faulted = 0

    # --------------------------------------------------------------------------------------- the data
    def conversation(self, chatbot_id: str, index: int) -> dict[str, Any]:
        dataset = self.datasets[chatbot_id]
        raw, _ = dataset.conversation(index)
        extra = self._appended.get(raw["id"])
        if extra:
            raw["messages"] = [*raw["messages"], *extra]
            last = extra[-1].get("createdAt") or extra[-1].get("created_at")
            if last:
                raw["last_message_at" if "last_message_at" in raw else "updated_at"] = last
        bad = self.bad_indexes(chatbot_id)
        if index in bad:
            raw = spoil(raw, BAD_RECORD_KINDS[bad.index(index) % len(BAD_RECORD_KINDS)])
        damaged = self.damaged_indexes(chatbot_id)
        if index in damaged:
            raw = damage(raw, DAMAGED_TEXT_KINDS[damaged.index(index) % len(DAMAGED_TEXT_KINDS)])
        return raw

    def bad_indexes(self, chatbot_id: str) -> list[int]:
        """Which conversations are sent broken: spread evenly, the same for the same seed."""
        return _spread(self.datasets[chatbot_id].count, self.bad_records, 0)

    def damaged_indexes(self, chatbot_id: str) -> list[int]:
        """Which good conversations carry text no database can hold (never one of the broken ones)."""
        bad = set(self.bad_indexes(chatbot_id))
        return [i for i in _spread(self.datasets[chatbot_id].count, self.damaged_records, 1) if i not in bad]

    def planted(self, chatbot_id: str) -> dict[str, Planted]:
        """Ground truth per good conversation id: the number chatsync should store and its source."""
        dataset = self.datasets[chatbot_id]
        bad = set(self.bad_indexes(chatbot_id))
        return {
            dataset.conversation_id(i): dataset.conversation(i)[1]
            for i in range(dataset.count)
            if i not in bad
        }

    def all_conversations(self, chatbot_id: str) -> list[dict[str, Any]]:
        """Every conversation as the API would send it now (for tests that compare)."""
        return [self.conversation(chatbot_id, i) for i in range(self.datasets[chatbot_id].count)]

    def append_messages(self, conversation_id: str, messages: list[dict[str, Any]]) -> None:
        """Let a conversation grow, as a real one does after it starts."""
        with self._lock:
            self._appended.setdefault(conversation_id, []).extend(messages)

    # ---------------------------------------------------------------------------------- HTTP handling
    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> Reply:
        """Answer one request; ``headers`` keys are lower case."""
        url = urlsplit(target)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        path = url.path.rstrip("/")
        if path == "/_emulator/append" and method == "POST":
            payload = json.loads(body or b"{}")
            self.append_messages(payload["conversation_id"], payload["messages"])
            return _json(200, {"ok": True})
        if path == "/_emulator/stats":
            return _json(
                200, {"requests": self.requests, "throttled": self.throttled, "faulted": self.faulted}
            )

        with self._lock:
            self.requests += 1
        throttled = self._throttle()
        if self.latency:
            time.sleep(self.latency)
        if throttled:
            return throttled
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token or (self.api_key is not None and token != self.api_key):
            return _json(401, {"message": "Unauthorized"})
        fault = self._fault()
        if fault:
            return fault
        if path.endswith("/get-conversations") and method == "GET":
            return self._get_conversations(params)
        if path.endswith("/get-chatbots") and method == "GET":
            return _json(200, {"chatbots": [{"id": bot, "name": bot} for bot in self.datasets]})
        return _json(404, {"message": "Not found"})

    def _throttle(self) -> Reply | None:
        if not self.rate_limit:
            return None
        limit, window = self.rate_limit
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0] <= now - window:
                self._recent.popleft()
            if len(self._recent) >= limit:
                self.throttled += 1
                wait = max(1, math.ceil(self._recent[0] + window - now))
                reset_ms = int((time.time() + wait) * 1000)
                return _json(
                    429,
                    {"error": {"code": "RATE_LIMIT_TOO_MANY_REQUESTS", "message": "Too many requests"}},
                    {
                        "retry-after": str(wait),
                        "x-ratelimit-limit": str(limit),
                        "x-ratelimit-remaining": "0",
                        "x-ratelimit-reset": str(reset_ms),
                    },
                )
            self._recent.append(now)
        return None

    def _fault(self) -> Reply | None:
        f = self.faults
        with self._lock:
            roll = self._rng.random()
            kind = self._rng.random()
        if roll < f.fail_rate:
            with self._lock:
                self.faulted += 1
            if kind < 0.4:
                return _json(
                    429,
                    {"error": {"code": "RATE_LIMIT_TOO_MANY_REQUESTS", "message": "Too many requests"}},
                    {"retry-after": str(f.retry_after)},
                )
            if kind < 0.7:
                return _json(500, {"message": "Internal server error"})
            if kind < 0.85:
                return _json(
                    503, {"error": {"code": "SERVICE_UNDER_MAINTENANCE", "message": "Under maintenance"}}
                )
            return Reply(502, b"<html>Bad gateway</html>", {"content-type": "text/html"})
        if roll < f.fail_rate + f.slow_rate:
            with self._lock:
                self.faulted += 1
            time.sleep(f.slow_seconds)
        return None

    def _get_conversations(self, params: dict[str, str]) -> Reply:
        bot = params.get("chatbotId")
        if not bot:
            return _json(400, {"message": "chatbotId is required"})
        if bot not in self.datasets:
            return _json(404, {"message": "Chatbot not found"})
        try:
            page = int(params.get("page", "1"))
            size = int(params.get("size", "10"))
        except ValueError:
            return _json(400, {"message": "page and size must be integers"})
        if page < 1 or not 1 <= size <= 100:
            return _json(400, {"message": "page must be >= 1 and size between 1 and 100"})
        dataset = self.datasets[bot]
        try:
            start = _day(params.get("startDate"))
            end = _day(params.get("endDate"))
        except ValueError:
            return _json(400, {"message": "Invalid date format, expected YYYY-MM-DD"})
        lo = dataset.first_index_at_or_after(_ts(start)) if start else 0
        hi = dataset.first_index_at_or_after(_ts(end + timedelta(days=1))) if end else dataset.count
        sources = params.get("filteredSources")
        wanted = set(sources.split(",")) if sources else None

        # Newest first. Without a source filter, a page is an index slice; with one, walk and filter.
        data: list[dict[str, Any]] = []
        skip = (page - 1) * size
        if wanted is None:
            top = hi - skip
            for index in range(top - 1, max(top - size, lo) - 1, -1):
                data.append(self.conversation(bot, index))
        else:
            for index in range(hi - 1, lo - 1, -1):
                raw = self.conversation(bot, index)
                if (raw.get("source") or "Unspecified") not in wanted:
                    continue
                if skip:
                    skip -= 1
                    continue
                data.append(raw)
                if len(data) == size:
                    break
        body = _encode({"data": data})
        with self._lock:
            truncate = self._rng.random() < self.faults.malformed_rate
        if truncate:
            with self._lock:
                self.faulted += 1
            body = body[: max(1, len(body) // 2)]
        return Reply(200, body, {"content-type": "application/json"})


def _spread(count: int, wanted: int, offset: int) -> list[int]:
    """``wanted`` indexes spread evenly over ``count``, the same every time."""
    if not wanted or not count:
        return []
    step = max(count // wanted, 1)
    return list(range(step // 2 + offset, count, step))[:wanted]


def _day(text: str | None) -> date | None:
    if not text:
        return None
    if len(text) != 10:
        raise ValueError(text)
    return date.fromisoformat(text)


def _ts(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


# ------------------------------------------------------------------------------------------- httpx transport
class EmulatorTransport(httpx.BaseTransport):
    """Serve httpx requests from an emulator in-process: the test seam for the Chatbase client."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        target = request.url.raw_path.decode()
        reply = self.emulator.handle(
            request.method, target, {k.lower(): v for k, v in request.headers.items()}, request.read()
        )
        return httpx.Response(reply.status, headers=reply.headers, content=reply.body, request=request)


# ---------------------------------------------------------------------------------------------- HTTP server
class _Handler(BaseHTTPRequestHandler):
    emulator: Emulator
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = self.emulator.handle(self.command, self.path, headers, body)
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the emulator serves tests and benchmarks, not people reading access logs."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer (a timeout, a sync that gave up) is normal here: stay quiet."""
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


@dataclass
class RunningEmulator:
    emulator: Emulator
    server: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        host, port = str(self.server.server_address[0]), int(self.server.server_address[1])
        return f"http://{host}:{port}/api/v1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> RunningEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_server(emulator: Emulator, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    handler = type("EmulatorHandler", (_Handler,), {"emulator": emulator})
    return _Server((host, port), handler)


def serve_in_thread(emulator: Emulator, host: str = "127.0.0.1", port: int = 0) -> RunningEmulator:
    """Serve the emulator over loopback from a background thread (port 0: any free port)."""
    server = make_server(emulator, host, port)
    thread = threading.Thread(target=server.serve_forever, name="chatsync-emulator", daemon=True)
    thread.start()
    return RunningEmulator(emulator, server, thread)
