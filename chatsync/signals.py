"""Holding signals for a block of code: what the CLI and the worker pool share (stdlib only, cheap to import)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def held(*signals: signal.Signals) -> Iterator[None]:
    """Hold ``signals`` in this thread until the block ends: one that arrives stays pending (it is not
    lost) and is taken as the block ends. Threads and processes started inside the block inherit the
    hold, and keep it. Not POSIX: nothing is held."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
