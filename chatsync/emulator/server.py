"""The emulator's request handling, and the two ways to reach it: an httpx transport and an HTTP server.

v1 (``get-conversations``, ``get-leads``, ``get-chatbots``) is answered here; v2 (``agents``,
``agents/{id}/conversations/export``) in :mod:`chatsync.emulator.v2`. Both share one rate-limit window
(Chatbase counts requests per key and IP), the fault injection and the data.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import httpx

from chatsync.emulator import v2
from chatsync.emulator.data import (
    BAD_RECORD_KINDS,
    DAMAGED_TEXT_KINDS,
    Dataset,
    ExportTruth,
    Lead,
    Planted,
    damage,
    damage_export,
    export_message,
    spoil,
    spoil_export,
)
from chatsync.emulator.replies import Reply, json_reply, v2_error

_json = json_reply
_V2 = re.compile(r"/v2(/|$)")
_EXPORT = re.compile(r"/v2/agents/(?P<agent>[^/]+)/conversations/export$")
_AGENTS = re.compile(r"/v2/agents$")


@dataclass
class Faults:
    """Fault injection: each request independently fails with these probabilities."""

    fail_rate: float = 0.0  # 429 with Retry-After, or 500/502/503
    slow_rate: float = 0.0  # answer after ``slow_seconds`` (a client timeout)
    malformed_rate: float = 0.0  # 200 with a truncated JSON body
    slow_seconds: float = 5.0
    retry_after: int = 1


class Emulator:
    """Answers Chatbase v1 and v2 requests from deterministic datasets, under a sliding-window rate limit.

    Options beyond the data: ``chatbot_names`` (id → name; default the id), ``chatbots_shape`` (how
    ``get-chatbots`` wraps its list: ``"list"`` → ``{"chatbots": [...]}``, ``"data"`` →
    ``{"chatbots": {"data": [...]}}``, both seen live), ``v2_plan`` (False: the plan has no API access and
    v2 answers 403), ``reset_unit`` (``X-RateLimit-Reset`` as epoch ``"ms"`` or ``"s"``: Chatbase documents
    both) and ``channel_customer`` (v1 ``customer`` carries the WhatsApp sender's number; off by default).
    """

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
        *,
        chatbot_names: Mapping[str, str] | None = None,
        chatbots_shape: Literal["list", "data"] = "list",
        v2_plan: bool = True,
        reset_unit: Literal["ms", "s"] = "ms",
        channel_customer: bool = False,
    ) -> None:
        end = end or datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        self.datasets = {
            bot: Dataset(bot, conversations, seed, end, days, channel_customer=channel_customer)
            for bot in chatbot_ids
        }
        self.api_key = api_key
        self.latency = latency_ms / 1000
        self.rate_limit = rate_limit
        self.faults = faults or Faults()
        self.bad_records = bad_records
        self.damaged_records = damaged_records
        self.chatbot_names = dict(chatbot_names or {})
        self.chatbots_shape = chatbots_shape
        self.v2_plan = v2_plan
        self.reset_unit = reset_unit
        self.channel_customer = channel_customer
        self._appended: dict[str, list[dict[str, Any]]] = {}
        self._scripted: deque[tuple[int, bool]] = deque()
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
        """Let a conversation grow, as a real one does after it starts (v1-shaped messages: ``role``,
        ``content``, ISO ``createdAt``; the v2 export shows them as text parts with epoch ``createdAt``)."""
        with self._lock:
            self._appended.setdefault(conversation_id, []).extend(messages)

    def chatbot_name(self, chatbot_id: str) -> str:
        return self.chatbot_names.get(chatbot_id, chatbot_id)

    # ---------------------------------------------------------------------------------- the v2 data
    def export_record(self, chatbot_id: str, index: int) -> dict[str, Any]:
        """Conversation ``index`` as the v2 export sends it now (grown and broken like the v1 one)."""
        record, _ = self.datasets[chatbot_id].export_record(index)
        extra = self._appended.get(record["id"])
        if extra:
            first = len(record["messages"])
            grown = [export_message(m, f"msg_{index:x}_{first + i}") for i, m in enumerate(extra)]
            record["messages"] = [*record["messages"], *grown]
            if "createdAt" in grown[-1]:
                record["updatedAt"] = grown[-1]["createdAt"]
        bad = self.bad_indexes(chatbot_id)
        if index in bad:
            record = spoil_export(record, BAD_RECORD_KINDS[bad.index(index) % len(BAD_RECORD_KINDS)])
        damaged = self.damaged_indexes(chatbot_id)
        if index in damaged:
            record = damage_export(record, DAMAGED_TEXT_KINDS[damaged.index(index) % len(DAMAGED_TEXT_KINDS)])
        return record

    def all_export_records(self, chatbot_id: str) -> list[dict[str, Any]]:
        """Every conversation as the v2 export would send it now, oldest first (for tests that compare)."""
        return [self.export_record(chatbot_id, i) for i in range(self.datasets[chatbot_id].count)]

    def export_truth(self, chatbot_id: str) -> dict[str, ExportTruth]:
        """Ground truth per good conversation id: status, feedback, message times, the sender's number."""
        dataset = self.datasets[chatbot_id]
        bad = set(self.bad_indexes(chatbot_id))
        return {
            dataset.conversation_id(i): dataset.export_record(i)[1]
            for i in range(dataset.count)
            if i not in bad
        }

    def channel_numbers(self, chatbot_id: str, api: Literal["v1", "v2"] = "v2") -> dict[str, str]:
        """Good conversation id → the WhatsApp sender's number (E.164) the record carries: v2 ``userId``;
        v1 ``customer`` only with ``channel_customer``."""
        if api == "v1" and not self.channel_customer:
            return {}
        return {
            conversation_id: truth.channel_number
            for conversation_id, truth in self.export_truth(chatbot_id).items()
            if truth.channel_number
        }

    def leads(self, chatbot_id: str) -> list[Lead]:
        """Every lead form of a chatbot, oldest first, with the conversation it was filled in."""
        return self.datasets[chatbot_id].leads()

    def fail_next(self, status: int, count: int = 1, *, retry_after: bool = True) -> None:
        """Answer the next ``count`` authorised API requests with ``status`` (v1 or v2 body as the path
        asks); a 429 carries ``X-RateLimit-*`` and, unless ``retry_after`` is False, ``Retry-After``."""
        with self._lock:
            self._scripted.extend([(status, retry_after)] * count)

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
        throttled, limits = self._throttle()
        if self.latency:
            time.sleep(self.latency)
        if _V2.search(path):
            reply = self._handle_v2(method, path, params, headers, throttled)
            # every v2 answer carries the window's state and a request id to quote to support
            reply.headers = {**limits, **reply.headers, "x-request-id": f"req_{uuid.uuid4().hex[:20]}"}
            return reply
        if throttled:
            return throttled
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token or (self.api_key is not None and token != self.api_key):
            return _json(401, {"message": "Unauthorized"})
        fault = self._scripted_failure(v2=False) or self._fault()
        if fault:
            return fault
        if path.endswith("/api/v1/get-conversations") and method == "GET":
            return self._get_conversations(params)
        if path.endswith("/api/v1/get-leads") and method == "GET":
            return self._get_leads(params)
        if path.endswith("/api/v1/get-chatbots") and method == "GET":
            return self._get_chatbots()
        # a path the API does not have (a mistyped CHATBASE_BASE_URL): the website's page, not an API error
        return Reply(
            404,
            b"<!DOCTYPE html><title>404: This page could not be found.</title>",
            {"content-type": "text/html"},
        )

    def _handle_v2(
        self, method: str, path: str, params: dict[str, str], headers: dict[str, str], throttled: Reply | None
    ) -> Reply:
        if throttled:
            return throttled
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return v2_error(401)
        if self.api_key is not None and token != self.api_key:
            return v2_error(401, "AUTH_INVALID_API_KEY", "Invalid API key")
        if not self.v2_plan:
            return v2_error(403)
        fault = self._scripted_failure(v2=True) or self._fault(v2=True)
        if fault:
            return fault
        export = _EXPORT.search(path)
        if export and method == "GET":
            reply = v2.export_conversations(self, unquote(export.group("agent")), params)
            return self._maybe_truncate(reply)
        if _AGENTS.search(path) and method == "GET":
            return v2.list_agents(self, params)
        return v2_error(404, "RESOURCE_NOT_FOUND", "The requested item could not be found")

    def _reset_header(self, seconds_from_now: float) -> str:
        reset = time.time() + seconds_from_now
        return str(int(reset * 1000) if self.reset_unit == "ms" else math.ceil(reset))

    def _throttle(self) -> tuple[Reply | None, dict[str, str]]:
        """The 429 when the window is full (None otherwise), and the ``X-RateLimit-*`` headers of now."""
        if not self.rate_limit:
            return None, {}
        limit, window = self.rate_limit
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0] <= now - window:
                self._recent.popleft()
            if len(self._recent) >= limit:
                self.throttled += 1
                wait = max(1, math.ceil(self._recent[0] + window - now))
                limits = {
                    "x-ratelimit-limit": str(limit),
                    "x-ratelimit-remaining": "0",
                    "x-ratelimit-reset": self._reset_header(wait),
                }
                reply = _json(
                    429,
                    {"error": {"code": "RATE_LIMIT_TOO_MANY_REQUESTS", "message": "Too many requests"}},
                    {"retry-after": str(wait), **limits},
                )
                return reply, limits
            self._recent.append(now)
            limits = {
                "x-ratelimit-limit": str(limit),
                "x-ratelimit-remaining": str(limit - len(self._recent)),
                "x-ratelimit-reset": self._reset_header(self._recent[0] + window - now),
            }
        return None, limits

    def _scripted_failure(self, *, v2: bool) -> Reply | None:
        with self._lock:
            if not self._scripted:
                return None
            status, retry_after = self._scripted.popleft()
            self.faulted += 1
        wait = self.faults.retry_after
        if status == 429:
            headers = {
                "x-ratelimit-limit": str(self.rate_limit[0] if self.rate_limit else 100),
                "x-ratelimit-remaining": "0",
                "x-ratelimit-reset": self._reset_header(wait),
            }
            if retry_after:
                headers["retry-after"] = str(wait)
            return v2_error(429, headers=headers)
        if status == 502:
            return Reply(502, b"<html>Bad gateway</html>", {"content-type": "text/html"})
        if v2 or status == 503:
            return v2_error(status)
        return _json(status, {"message": "Scripted failure"})

    def _fault(self, *, v2: bool = False) -> Reply | None:
        f = self.faults
        with self._lock:
            roll = self._rng.random()
            kind = self._rng.random()
        if roll < f.fail_rate:
            with self._lock:
                self.faulted += 1
            if kind < 0.4:
                headers = {"retry-after": str(f.retry_after)}
                if v2:
                    return v2_error(429, headers=headers)
                return _json(
                    429,
                    {"error": {"code": "RATE_LIMIT_TOO_MANY_REQUESTS", "message": "Too many requests"}},
                    headers,
                )
            if kind < 0.7:
                return v2_error(500) if v2 else _json(500, {"message": "Internal server error"})
            if kind < 0.85:
                if v2:
                    return v2_error(503)
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
        return self._maybe_truncate(_json(200, {"data": data}))

    def _maybe_truncate(self, reply: Reply) -> Reply:
        """Fault injection: now and then a page arrives cut in half (a proxy dropping the connection)."""
        if reply.status != 200:
            return reply
        with self._lock:
            truncate = self._rng.random() < self.faults.malformed_rate
        if truncate:
            with self._lock:
                self.faulted += 1
            reply.body = reply.body[: max(1, len(reply.body) // 2)]
        return reply

    def _get_chatbots(self) -> Reply:
        """``get-chatbots``: the documented fields plus an undocumented one, wrapped as ``chatbots_shape``."""
        chatbots = []
        for bot, dataset in self.datasets.items():
            start = (dataset.end - timedelta(days=dataset.days)).isoformat().replace("+00:00", "Z")
            chatbots.append(
                {
                    "id": bot,
                    "name": self.chatbot_name(bot),
                    "status": "ready",
                    "model": "gpt-4o-mini",
                    "instructions": "You are the assistant of Harbour Dental.",
                    "visibility": "private",
                    "created_at": start,
                    "updated_at": start,
                    "initial_messages": ["Hi! What can I help you with?"],
                }
            )
        return _json(200, {"chatbots": {"data": chatbots} if self.chatbots_shape == "data" else chatbots})

    def _get_leads(self, params: dict[str, str]) -> Reply:
        """``get-leads``: newest first, ``page``/``size`` (default 1 and 10, size at most 100), whole UTC days
        inclusive; ``{"collectedCustomers": [...]}`` with no paging metadata."""
        bot = params.get("chatbotId")
        if not bot:
            return _json(400, {"message": "chatbotId is required"})
        if bot not in self.datasets:
            return _json(404, {"message": "Chatbot not found"})
        try:
            page = int(params.get("page") or "1")
            size = int(params.get("size") or "10")
            start = _day(params.get("startDate"))
            end = _day(params.get("endDate"))
        except ValueError:
            return _json(400, {"message": "Invalid parameters: dates are YYYY-MM-DD, page and size integers"})
        if page < 1 or not 1 <= size <= 100:
            return _json(400, {"message": "page must be >= 1 and size between 1 and 100"})
        leads = [
            lead
            for lead in reversed(self.leads(bot))
            if (start is None or lead.created_at[:10] >= start.isoformat())
            and (end is None or lead.created_at[:10] <= end.isoformat())
        ]
        rows = [
            {
                "id": lead.id,
                "name": lead.name,
                "email": lead.email,
                "phone": lead.phone,
                "created_at": lead.created_at,
                "chatbot_id": lead.chatbot_id,
                "account_id": "acct_emulator",
            }
            for lead in leads[(page - 1) * size : page * size]
        ]
        return _json(200, {"collectedCustomers": rows})


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
        """The v1 API root, as ``CHATBASE_BASE_URL`` takes it."""
        host, port = str(self.server.server_address[0]), int(self.server.server_address[1])
        return f"http://{host}:{port}/api/v1"

    @property
    def v2_base_url(self) -> str:
        """The v2 API root, ``/api/v2`` included (as the official CLI's ``CHATBASE_API_URL``)."""
        return self.base_url.removesuffix("/api/v1") + "/api/v2"

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
