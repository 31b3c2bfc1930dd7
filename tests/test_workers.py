"""The reading workers' pool: a worker that dies or stops never leaves the sync waiting.

Real worker processes (the fork server's) throughout; what a killed worker leaves behind is made by
writing into the executor's own result pipe, which is how the standard library's pool fails, not ours.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest

from chatsync.config import WhatsAppRule
from chatsync.workers import PageTask, ReaderPool

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="worker processes of a fork server (POSIX)")


def _page(conversations: int) -> PageTask:
    records = [
        {
            "id": f"c{i}",
            "chatbot_id": "bot",
            "created_at": "2024-05-01T10:00:00Z",
            "source": "API",
            "messages": [
                {"role": "assistant", "content": "What is your WhatsApp number?"},
                {"role": "user", "content": f"It is 9{i % 10}23 4567"},
            ],
        }
        for i in range(conversations)
    ]
    return PageTask(json.dumps({"data": records}).encode(), {}, "bot", WhatsAppRule())


def _workers(pool: ReaderPool) -> list[Any]:
    processes: dict[int, Any] = getattr(pool._executor, "_processes", None) or {}
    return list(processes.values())


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_worker_killed_halfway_through_sending_a_result_breaks_the_pool_instead_of_hanging_it() -> None:
    """SIGKILL (the OOM killer) in the middle of a worker's answer leaves half of it in the pipe every
    worker answers through: the standard library's executor waits for the rest for ever. The wait for a
    page then sees the dead worker and gives the pool up: the page raises BrokenProcessPool, which the
    sync turns into exit 3, and closing the pool takes no longer than killing what is left of it."""
    pool = ReaderPool(2)
    try:
        assert [o.kind for o in pool.result(pool.submit(_page(3)))] == ["row"] * 3
        executor: Any = pool._executor
        # what a worker killed while writing a result leaves: a length and the first bytes of it
        os.write(executor._result_queue._writer.fileno(), struct.pack("!i", 100_000) + b"\x80\x05half")
        future = pool.submit(_page(3))
        victim = _workers(pool)[0]
        os.kill(victim.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(BrokenProcessPool):
            pool.result(future)
        assert time.monotonic() - started < 30  # (pytest-timeout ends a hang; this says what hung)
        workers = [p.pid for p in _workers(pool)]
    finally:
        pool.close()
    assert not any(_alive(pid) for pid in workers)


def test_closing_a_pool_does_not_wait_for_a_stopped_worker() -> None:
    """A stopped worker (SIGSTOP, a machine swapping) with a page unread: the sync that stops or fails
    closes its pool, which kills the workers rather than wait for that page."""
    pool = ReaderPool(2)
    stopped: list[int] = []
    try:
        pool.result(pool.submit(_page(1)))
        pool.result(pool.submit(_page(1)))
        stopped = [p.pid for p in _workers(pool)]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        unread = pool.submit(_page(50))
        time.sleep(0.2)
        assert not unread.done()
        started = time.monotonic()
        pool.close()
        assert time.monotonic() - started < 30
        assert not any(_alive(pid) for pid in stopped)
    finally:
        for pid in stopped:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_pool_whose_pages_were_all_read_shuts_down_its_workers_gracefully() -> None:
    """The normal end: every page was read, so closing waits for the workers to finish, killing none."""
    pool = ReaderPool(2)
    futures = [pool.submit(_page(20)) for _ in range(6)]
    results = [pool.result(f) for f in futures]
    workers = _workers(pool)
    pool.close()
    assert [len(r) for r in results] == [20] * 6
    assert workers and all(p.exitcode == 0 for p in workers)  # (a killed one ends with -9)


def test_a_pool_given_up_kills_its_workers_even_with_every_page_read() -> None:
    """The sync stopped (or failed) after its workers had read every page, and they are stopped: leaving
    the pool on an exception kills them rather than wait for them to end (a stopped sync then hung at
    its exit, Ctrl-C and SIGTERM ignored by then, found by a helper breaking it)."""
    stopped: list[int] = []
    started = 0.0
    try:
        with pytest.raises(KeyboardInterrupt), ReaderPool(2) as pool:
            pool.result(pool.submit(_page(1)))
            pool.result(pool.submit(_page(1)))
            stopped = [p.pid for p in _workers(pool)]
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            started = time.monotonic()
            raise KeyboardInterrupt
        assert time.monotonic() - started < 30
        assert stopped and not any(_alive(pid) for pid in stopped)
    finally:
        for pid in stopped:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
