"""The workloads S1–S9 of docs/benchmarks.md. Each returns its figures as plain data."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.common import Timed, emulator, free_port, fresh_database, run_sync
from bench.peers import dlt_seconds, floor_seconds

PAGE = {"v1": 100, "v2": 20}  # conversations a page: get-conversations' maximum, the export's
CEILING = {api: 100 / 10 * page for api, page in PAGE.items()}  # 100 requests / 10 s × a page: 1,000/s, 200/s
LATENCY_S = 0.25


def minimum_requests(size: int, api: str = "v1") -> int:
    """Requests a client that does not know how many conversations there are needs: on v1 the last page
    must come back short or empty; on v2 the last page says it is the last (``hasMore`` false)."""
    return size // PAGE[api] + 1 if api == "v1" else -(-size // PAGE[api])


def minimum_seconds(size: int, api: str = "v1") -> float:
    """The physical minimum of S1: the last request leaves once the sliding window lets it (100 a 10 s),
    and its answer takes one latency (201 requests: 20 s + 0.25 s)."""
    return (minimum_requests(size, api) - 1) // 100 * 10 + LATENCY_S


def s1_rate_limit(size: int, kind: str, workdir: Path, api: str = "v1") -> dict[str, Any]:
    """Realistic Chatbase: 250 ms a request, 100 requests per 10 s; chatsync with its default settings,
    reading API ``api``."""
    latency_ms = LATENCY_S * 1000
    with (
        emulator(size, latency_ms=latency_ms, rate_limit="100/10s") as emu,
        fresh_database(kind, workdir) as url,
    ):
        if api == "v2":
            run = run_sync(url, emu.base_url, workdir, "--api", "2", api_url=emu.v2_base_url)
        else:
            run = run_sync(url, emu.base_url, workdir)
        stats = emu.stats()
    rate = size / run.seconds
    return {
        "api": api,
        "conversations": size,
        "seconds": round(run.seconds, 2),
        "conversations_per_s": round(rate, 1),
        "ceiling_share": round(rate / CEILING[api], 3),
        "minimum_seconds": minimum_seconds(size, api),
        "over_minimum": round(run.seconds / minimum_seconds(size, api), 3),
        "requests": run.summary["requests"],
        "minimum_requests": minimum_requests(size, api),
        "http_429": stats["throttled"],
    }


def s2_s4_speed(size: int, small: int, kinds: list[str], workdir: Path) -> dict[str, dict[str, Any]]:
    """Raw speed from empty against the floor and dlt; the time per conversation at ``small`` and at
    ``size``; then an incremental run with nothing changed. One emulator of each size serves every
    database (there is no rate limit to share), and the floor, which touches no database, is measured
    once on it. Returns {database: {"S2": figures, "S4": figures}}."""
    early: dict[str, Timed] = {}
    with emulator(small) as emu:
        for kind in kinds:
            with fresh_database(kind, workdir) as url:
                early[kind] = run_sync(url, emu.base_url, workdir, unlimited=True)
    out: dict[str, dict[str, Any]] = {}
    with emulator(size) as emu:
        floor, fetched = floor_seconds(emu.base_url)
        for kind in kinds:
            with fresh_database(kind, workdir) as url:
                first = run_sync(url, emu.base_url, workdir, unlimited=True)
                again = run_sync(url, emu.base_url, workdir, unlimited=True)
            with fresh_database(kind, workdir) as url:
                peer, loaded = dlt_seconds(emu.base_url, url)
            out[kind] = _s2_s4_figures(size, small, floor, fetched, early[kind], first, again, peer, loaded)
    return out


def _s2_s4_figures(
    size: int,
    small: int,
    floor: float,
    fetched: int,
    early: Timed,
    first: Timed,
    again: Timed,
    peer: float,
    loaded: int,
) -> dict[str, Any]:
    return {
        "S2": {
            "conversations": size,
            "seconds": round(first.seconds, 2),
            "floor_seconds": round(floor, 2),
            "floor_ratio": round(first.seconds / floor, 3),
            "dlt_seconds": round(peer, 2),
            "dlt_rows": loaded,
            "times_faster_than_dlt": round(peer / first.seconds, 2),
            "inserted": first.summary["inserted"],
            "floor_fetched": fetched,
            "small": small,
            "ms_per_conversation_small": round(early.seconds / small * 1000, 4),
            "ms_per_conversation": round(first.seconds / size * 1000, 4),
            "growth_per_conversation": round((first.seconds / size) / (early.seconds / small), 3),
            "peak_tree_mb": round(first.peak_tree_mb, 1),
            "peak_tree_mb_small": round(early.peak_tree_mb, 1),
            "peak_rss_mb": round(first.peak_rss_mb, 1),
            "peak_rss_mb_small": round(early.peak_rss_mb, 1),
        },
        "S4": {
            "seconds": round(again.seconds, 2),
            "share_of_S2": round(again.seconds / first.seconds, 4),
            "requests": again.summary["requests"],
            "requests_first_run": first.summary["requests"],
            "unchanged": again.summary["unchanged"],
        },
    }


def s3_memory(small: int, large: int, kinds: list[str], workdir: Path) -> dict[str, dict[str, Any]]:
    """Peak memory of a sync from empty at two history sizes: the sync process and its reading workers
    together (summed PSS), and the sync process alone (its RSS high-water mark). One emulator of each
    size serves every database. Returns {database: figures}."""
    runs: dict[str, dict[int, Timed]] = {kind: {} for kind in kinds}
    for size in (small, large):
        with emulator(size) as emu:
            for kind in kinds:
                with fresh_database(kind, workdir) as url:
                    runs[kind][size] = run_sync(url, emu.base_url, workdir, unlimited=True)
    return {
        kind: {
            "small": small,
            "large": large,
            "peak_rss_mb_small": round(by_size[small].peak_tree_mb, 1),
            "peak_rss_mb_large": round(by_size[large].peak_tree_mb, 1),
            "growth": round(by_size[large].peak_tree_mb / by_size[small].peak_tree_mb, 3),
            "main_process_rss_mb_small": round(by_size[small].peak_rss_mb, 1),
            "main_process_rss_mb_large": round(by_size[large].peak_rss_mb, 1),
        }
        for kind, by_size in runs.items()
    }


def s3_from_s2(s2: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """S3's figures from S2's own syncs from empty (``--quick``: its two sizes, a tenfold history as S3's
    are, cost no syncs of their own). Returns {database: figures} as :func:`s3_memory`."""
    return {
        kind: {
            "small": f["small"],
            "large": f["conversations"],
            "peak_rss_mb_small": f["peak_tree_mb_small"],
            "peak_rss_mb_large": f["peak_tree_mb"],
            "growth": round(f["peak_tree_mb"] / f["peak_tree_mb_small"], 3),
            "main_process_rss_mb_small": f["peak_rss_mb_small"],
            "main_process_rss_mb_large": f["peak_rss_mb"],
            "from_S2": True,
        }
        for kind, f in s2.items()
    }


# ------------------------------------------------------------------------------------- 1M conversations
def seed_templates(count: int = 5000) -> list[dict[str, Any]]:
    """``count`` emulator conversations as a sync stores them (normalised, their JSON columns encoded the
    way the sync's workers hand them to the writer): what :func:`seed` clones, built once for every
    database."""
    from chatsync.config import WhatsAppRule
    from chatsync.emulator.data import Dataset
    from chatsync.normalize import normalize_conversation
    from chatsync.store.writes import encode_json

    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    dataset = Dataset("bench-bot", count, 11, end, 60)
    templates = []
    for i in range(count):
        row = normalize_conversation(dataset.conversation(i)[0], "bench-bot", WhatsAppRule())
        row["messages"], row["raw"] = encode_json(row["messages"]), encode_json(row["raw"])
        templates.append(row)
    return templates


def seed(url: str, count: int, templates: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``count`` realistic conversations straight through the storage layer.

    The ``templates`` (:func:`seed_templates`) are cloned with new ids and start times spread over two
    years: the rows are what a sync would have stored, without paying for a sync. Each clone of a
    conversation with a customer gets its own customer, so the data has as many users as a real account
    of that size rather than the templates' few thousand.
    """
    from chatsync.store.engine import ensure_schema, open_engine
    from chatsync.store.writes import upsert_conversations

    engine = open_engine(url)
    ensure_schema(engine)
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    span = timedelta(days=730).total_seconds()
    started = time.perf_counter()
    batch: list[dict[str, Any]] = []
    now = datetime.now(UTC)
    for i in range(count):
        row = dict(templates[i % len(templates)])
        created = end - timedelta(seconds=span * (1 - i / count))
        shift = created - row["created_at"]
        row["id"] = f"seed-{i:08d}"
        if row["customer"] is not None:
            row["customer"] = f"{row['customer']}~{i // len(templates)}"
        row["created_at"] = created
        row["last_message_at"] = row["last_message_at"] + shift if row["last_message_at"] else None
        batch.append(row)
        if len(batch) == 10_000:
            with engine.begin() as connection:
                upsert_conversations(connection, batch, now, known_hashes={})  # every id is new
            batch = []
    if batch:
        with engine.begin() as connection:
            upsert_conversations(connection, batch, now, known_hashes={})
    with engine.begin() as connection:
        from sqlalchemy import text

        connection.execute(text("ANALYZE"))
    engine.dispose()
    return {"conversations": count, "seed_seconds": round(time.perf_counter() - started, 1)}


def seed_in_parallel(urls: dict[str, str], count: int) -> dict[str, Any]:
    """:func:`seed` ``count`` conversations into each database at once, each in its own process (seeding
    is the writer's Python work: one core each). Returns {database: figures}."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # (spawn: the benchmark runs threads beside this, which a forked child must not inherit mid-lock)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(urls), mp_context=context) as pool:
        futures = {db: pool.submit(_seed_from_scratch, url, count) for db, url in urls.items()}
        return {db: future.result() for db, future in futures.items()}


def _seed_from_scratch(url: str, count: int) -> dict[str, Any]:
    return seed(url, count, seed_templates())


def _best(call: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def s5_s6_queries(url: str) -> dict[str, Any]:
    """The report over everything and one month; the support lookups; against a bare count."""
    from sqlalchemy import func, select, text

    from chatsync.analytics import report
    from chatsync.store.engine import open_engine
    from chatsync.store.queries import (
        ConversationFilter,
        get_conversation,
        iter_conversations,
        list_statement,
    )
    from chatsync.store.tables import conversations

    engine = open_engine(url)
    with engine.connect() as connection:
        count_s = _best(
            lambda: connection.execute(select(func.count()).select_from(conversations)).scalar(), 3
        )
        last = connection.execute(select(func.max(conversations.c.created_at))).scalar()
        month_end = (last if isinstance(last, datetime) else datetime.fromisoformat(str(last))).date()
        month_start = month_end - timedelta(days=30)
        all_s = _best(lambda: report(connection, ConversationFilter()), 2)
        month_s = _best(lambda: report(connection, ConversationFilter(), month_start, month_end), 2)
        users = report(connection, ConversationFilter())["users"]
        number = connection.execute(
            select(conversations.c.whatsapp_number)
            .where(conversations.c.whatsapp_number.is_not(None))
            .limit(1)
        ).scalar()
        some_id = connection.execute(select(conversations.c.id).offset(12345).limit(1)).scalar_one()

    def timed_ms(call: Any) -> float:
        samples = []
        for _ in range(25):
            started = time.perf_counter()
            call()
            samples.append((time.perf_counter() - started) * 1000)
        return round(statistics.median(samples), 2)

    by_number = ConversationFilter(number=number)
    with_number = ConversationFilter(has_whatsapp=True, sources=("WhatsApp",))
    lookups = {
        "list_number_ms": timed_ms(lambda: list(iter_conversations(engine, by_number, 20))),
        "list_has_whatsapp_ms": timed_ms(lambda: list(iter_conversations(engine, with_number, 20))),
        "show_ms": timed_ms(lambda: _show(engine, some_id, get_conversation)),
    }
    plans: dict[str, bool] = {}
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            for name, statement in (
                ("list_number", list_statement(by_number, "postgresql", 20)),
                ("list_has_whatsapp", list_statement(with_number, "postgresql", 20)),
            ):
                sql = str(statement.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
                plan = "\n".join(r[0] for r in connection.execute(text("EXPLAIN " + sql)))
                plans[name] = "Index" in plan and "Seq Scan" not in plan
    engine.dispose()
    return {
        "S5": {
            "report_all_s": round(all_s, 3),
            "report_month_s": round(month_s, 3),
            "count_s": round(count_s, 4),
            "all_over_count": round(all_s / count_s, 1) if count_s else None,
            "month_faster": month_s < all_s,
            "users": users,
        },
        "S6": {**lookups, "plans_use_indexes": plans or None},
    }


def _show(engine: Any, conversation_id: str, get: Any) -> None:
    with engine.connect() as connection:
        get(connection, conversation_id)


def s7_http(url: str, seconds: float, clients: int, workdir: Path, workers: int = 2) -> dict[str, Any]:
    """`GET /api/conversations?limit=20` from a second process: requests/s, p50, p99, errors."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    now = int(time.time())
    token = jwt.encode(
        {"sub": "bench_admin", "iss": "https://clerk.bench", "azp": "https://app.bench", "iat": now, "nbf": now,
         "exp": now + 3600},
        key, algorithm="RS256",
    )  # fmt: skip
    port = free_port()
    env = {
        **os.environ,
        "CHATSYNC_DATABASE_URL": url,
        "CLERK_JWT_KEY": public,
        "CLERK_ISSUER": "https://clerk.bench",
        "CLERK_AUTHORIZED_PARTIES": "https://app.bench",
        "CHATSYNC_ADMIN_USER_IDS": "bench_admin",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "chatsync", "serve", "--port", str(port), "--workers", str(workers)],
        env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import httpx

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        target = f"http://127.0.0.1:{port}/api/conversations?limit=20"
        if shutil.which("wrk"):
            return {**_wrk(target, token, clients, seconds), "workers": workers}
        load = subprocess.run(
            [sys.executable, "-m", "bench.load", target, token, str(clients), str(seconds)],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        return {**json.loads(load.stdout), "load_generator": "python threads", "workers": workers}
    finally:
        server.terminate()
        server.wait(timeout=10)


def _wrk(url: str, token: str, clients: int, seconds: float) -> dict[str, Any]:
    """wrk as the second process: light enough to leave the CPU to the server on a small machine."""
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{clients}",
            f"-d{int(seconds)}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {token}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        match = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return round(value / 1000 if unit == "us" else value * 1000 if unit == "s" else value, 1)

    requests = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, socket.groups())) if socket else 0)
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": int(requests.group(1)) if requests else 0,
        "requests_per_s": float(rate.group(1)) if rate else 0.0,
        "p50_ms": ms("50%"),
        "p99_ms": ms("99%"),
        "errors": errors,
        "error_detail": {
            "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
            **(
                dict(zip(("connect", "read", "write", "timeout"), map(int, socket.groups()), strict=True))
                if socket
                else {}
            ),
        },
        "load_generator": "wrk",
    }


def s8_extraction(count: int) -> dict[str, Any]:
    """The corpus replies repeated to ``count``, through the rule, on one core."""
    from chatsync.whatsapp import extract_reply

    corpus = Path(__file__).resolve().parents[1] / "tests" / "data" / "whatsapp_replies.jsonl"
    lines = corpus.read_text(encoding="utf-8").splitlines()
    replies = [json.loads(line)["reply"] for line in lines if line.strip()]
    work = [replies[i % len(replies)] for i in range(count)]
    random.Random(1).shuffle(work)
    started = time.perf_counter()
    for reply in work:
        extract_reply(reply)
    seconds = time.perf_counter() - started
    return {"replies": count, "seconds": round(seconds, 3), "replies_per_s": round(count / seconds)}


def s9_startup(workdir: Path, repeat: int = 5) -> dict[str, Any]:
    """CPU seconds (user + system) of the commands support staff type, on an up-to-date SQLite database.

    Each is the best of ``repeat`` runs of a fresh process, so it is the interpreter's and chatsync's
    start-up plus one small query; ``python -c pass`` is measured the same way as the floor.
    """
    from chatsync.config import Secret, WhatsAppRule
    from chatsync.emulator import Emulator, EmulatorTransport
    from chatsync.store.engine import ensure_schema, open_engine
    from chatsync.sync import Syncer, SyncRequest

    url = f"sqlite:///{workdir / 's9.db'}"
    engine = open_engine(url)
    ensure_schema(engine)
    emulator = Emulator(conversations=500, seed=SEED_S9, rate_limit=None)
    from chatsync.chatbase import ChatbaseClient

    with ChatbaseClient(
        Secret("demo-key"), "http://emulator/api/v1", transport=EmulatorTransport(emulator)
    ) as client:
        Syncer(engine, client, WhatsAppRule()).run(SyncRequest(("demo-bot",)))
    engine.dispose()
    conversation_id = emulator.datasets["demo-bot"].conversation_id(7)
    env = {**os.environ, "CHATSYNC_DATABASE_URL": url}
    chatsync = [sys.executable, "-m", "chatsync"]
    commands = {
        "python_pass": [sys.executable, "-c", "pass"],
        "list": [*chatsync, "list", "--limit", "1", "--format", "json"],
        "show": [*chatsync, "show", conversation_id, "--format", "json"],
        "set_whatsapp": [*chatsync, "set-whatsapp", conversation_id, "--auto", "--by", "bench"],
        "extract_test": [*chatsync, "extract-test", "my number is 9123 4567", "--json"],
    }
    figures: dict[str, Any] = {}
    for name, command in commands.items():
        figures[f"{name}_cpu_s"] = round(min(_cpu_seconds(command, env, workdir) for _ in range(repeat)), 3)
    return figures


SEED_S9 = 9


def _cpu_seconds(command: list[str], env: dict[str, str], cwd: Path) -> float:
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:])} exited {process.returncode}")
    return float(usage.ru_utime + usage.ru_stime)
