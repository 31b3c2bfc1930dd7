"""The fork server the reading workers start from (:mod:`chatsync.workers`), and starting it early.

The server imports :mod:`chatsync.worker_preload` (the rule, the canonical JSON, SQLAlchemy's types:
~0.4 CPU-seconds) once, then forks each worker from it. Started when the first page is ready, that import
is a wait of the whole sync; started as the sync command begins (:func:`start_early`), it runs on the
other core while the sync imports its own modules and opens the database. Measured on an incremental sync
of 20,000 stored conversations (12 requests): about half of its wall time was that wait.

Cheap to import: the standard library and :mod:`chatsync.signals` only.
"""

from __future__ import annotations

import os
import signal

from chatsync.signals import held

TYPE_CHECKING = False  # (typing itself takes 5 ms to import; type checkers read this as True)

if TYPE_CHECKING:
    from typing import Any

PRELOAD = "chatsync.worker_preload"
_QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


def default_workers() -> int:
    """Worker processes for a sync: one per core up to four; none on a single core (read in the writer)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores < 2 else min(cores, 4)


def context() -> Any:
    """A fork server where the platform has one (Linux, macOS): workers start as clean processes with
    :mod:`chatsync.workers` already imported, whatever threads the sync runs; else the platform's
    default."""
    import multiprocessing

    try:
        found = multiprocessing.get_context("forkserver")
    except ValueError:
        return multiprocessing.get_context()
    found.set_forkserver_preload([PRELOAD])
    return found


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (POSIX) before the fork server, outside any block that
    holds Ctrl-C: starting it turns SIGINT and SIGTERM back on in the calling thread (Python 3.11), so
    started inside, it let the fork server start up taking Ctrl-C, and an early Ctrl-C printed the
    server's KeyboardInterrupt traceback (10 of 15 runs on PostgreSQL, found by a helper breaking it)."""
    try:
        from multiprocessing import resource_tracker
    except ImportError:  # (not POSIX)
        return
    # The tracker outlives a SIGKILLed sync and then warns of the pool's "leaked semaphore objects" on
    # the sync's stderr, which cron mails; it cleans them up all the same. It is started with the
    # interpreter's -W options: this one keeps it quiet about that alone.
    import sys

    if _QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(_QUIET_TRACKER)
    resource_tracker.ensure_running()


def start_early() -> None:
    """Start the fork server now, when syncs here read pages in workers (more than one core); it then
    preloads while the caller goes on. Idempotent; the pool uses the same server. The server never takes
    Ctrl-C or SIGTERM (see :meth:`chatsync.workers.ReaderPool.submit`): it ends with the sync."""
    if default_workers() <= 0 or context().get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    start_resource_tracker()
    with held(signal.SIGINT, signal.SIGTERM):
        forkserver.ensure_running()
