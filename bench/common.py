"""What every workload needs: an emulator process, fresh databases, timed chatsync runs, the machine."""

from __future__ import annotations

import json
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POSTGRES_ADMIN_URL = os.environ.get(
    "CHATSYNC_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
SEED = 7


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class EmulatorProcess:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    @property
    def v2_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v2"

    def stats(self) -> dict[str, int]:
        import httpx

        return dict(httpx.get(f"http://127.0.0.1:{self.port}/_emulator/stats", timeout=10).json())


@contextmanager
def emulator(
    conversations: int, latency_ms: float = 0, rate_limit: str = "off", days: int = 60
) -> Iterator[EmulatorProcess]:
    """The Chatbase emulator in its own process, so it does not share the benchmarked interpreter."""
    port = free_port()
    command = [
        sys.executable, "-m", "chatsync", "emulator", "--port", str(port), "--conversations", str(conversations),
        "--seed", str(SEED), "--days", str(days), "--latency-ms", str(latency_ms), "--rate-limit", rate_limit,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    try:
        yield EmulatorProcess(process, port)
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def fresh_database(kind: str, workdir: Path) -> Iterator[str]:
    """An empty SQLite file or PostgreSQL database, removed afterwards."""
    if kind == "sqlite":
        path = workdir / f"bench-{uuid.uuid4().hex[:8]}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            for leftover in workdir.glob(path.name + "*"):
                leftover.unlink()
        return
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"chatsync_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Timed:
    seconds: float
    peak_rss_mb: float  # the sync process's own high-water mark
    summary: dict[str, Any]
    peak_tree_mb: float = float("nan")  # the sync and every process it started (its reading workers)


# Runs chatsync's CLI and reports the process's own peak RSS when it exits. VmHWM, not getrusage:
# ru_maxrss carries the parent's high-water mark across fork/exec, so a child of a large benchmark
# process would report the parent's peak instead of its own.
_MEASURED = (
    "import atexit, sys\n"
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            sys.stderr.write('\\nPEAK_RSS_KB=%d\\n' % int(line.split()[1]))\n"
    "atexit.register(_peak)\n"
    "sys.argv = ['chatsync', *sys.argv[1:]]\n"
    "from chatsync.__main__ import main\n"
    "main()\n"
)


def run_sync(
    database_url: str,
    base_url: str,
    workdir: Path,
    *extra: str,
    unlimited: bool = False,
    api_url: str | None = None,
) -> Timed:
    """``chatsync sync --json`` as a child process: wall time, its peak RSS, its summary.

    ``unlimited``: the server has no rate limit, so chatsync is configured not to keep Chatbase's.
    ``api_url``: the API v2 root (for ``--api 2``).
    """
    env = {
        **os.environ,
        **({"CHATSYNC_RATE_LIMIT": "1000000/1s"} if unlimited else {}),
        **({"CHATBASE_API_URL": api_url} if api_url else {}),
        "CHATBASE_API_KEY": "demo-key",
        "CHATBASE_CHATBOT_ID": "demo-bot",
        "CHATBASE_BASE_URL": base_url,
        "CHATSYNC_DATABASE_URL": database_url,
    }
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", _MEASURED, "sync", "--json", *extra],
        env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    tree = _TreeMemory(process.pid)
    tree.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    tree.stop()
    if process.returncode != 0:
        raise RuntimeError(f"sync failed ({process.returncode}): {stderr[-500:]}")
    peak = [line for line in stderr.splitlines() if line.startswith("PEAK_RSS_KB=")]
    return Timed(
        seconds,
        int(peak[-1].split("=")[1]) / 1024 if peak else float("nan"),
        json.loads(stdout),
        tree.peak_kb / 1024 if tree.peak_kb else float("nan"),
    )


class _TreeMemory:
    """Samples the memory of a process and all its descendants (every 20 ms) and keeps the peak of their sum.

    Each process counts its proportional set size (PSS: pages shared between processes, such as what the
    workers inherit from their fork server, are split among them rather than counted once each), so the
    sum is the memory the whole sync takes; RSS where PSS is not available.
    """

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        self.peak_kb = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.is_set():
            total = sum(_memory_kb(pid) for pid in [self.pid, *_descendants(self.pid)])
            self.peak_kb = max(self.peak_kb, total)
            self._done.wait(0.02)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _memory_kb(pid: int) -> int:
    for name, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return 0


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
    }
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL) as connection:
            info["postgresql"] = connection.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    except Exception as exc:
        info["postgresql"] = f"unavailable ({type(exc).__name__})"
    return info
