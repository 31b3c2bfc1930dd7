"""Holding and settling stop signals (Ctrl-C, SIGTERM): what the CLI and the worker pool share.

Stdlib only and cheap to import (no ``typing`` at run time): the ``chatsync`` command imports this first
thing, before it can hold anything (:mod:`chatsync.__main__`).
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import ExitStack, contextmanager

TYPE_CHECKING = False  # (typing itself takes 5 ms to import; type checkers read this as True)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

    Handler = Callable[[int, Any], Any]
    AtOnce = Callable[[int], None]

_lock = threading.Lock()
_holding = 0  # blocks being run under held(), in any thread
_pending: list[int] = []  # signals whose handler waits for the last of them to end
_settled = False  # how the command ends is decided: deferrable handlers do nothing any more
_stopping_since: float | None = None  # monotonic time the first stop signal's handler ran
AGAIN_SECONDS = 1.0  # a stop repeated this long after the first is a person insisting, not an echo


@contextmanager
def held(*signals: signal.Signals) -> Iterator[None]:
    """Hold ``signals`` until the block ends: one that arrives stays pending (it is not lost) and is taken
    as the block ends. Threads and processes started inside the block inherit the hold, and keep it.

    The operating system holds them for this thread; a handler installed with :func:`deferrable` also
    waits, wherever the signal landed (Python runs every handler in the main thread, so a signal another
    thread took would otherwise run it in the middle of the block). Not POSIX: nothing is held.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    global _holding
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    with _lock:
        _holding += 1
    waiting: list[int] = []
    try:
        yield
    finally:
        try:
            with _lock:
                _holding -= 1
                if not _holding and _pending:
                    waiting = _pending[:1]
                    _pending.clear()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
        for signum in waiting:
            signal.raise_signal(signum)  # its handler runs now, outside every held block


def deferrable(handler: Handler, at_once: AtOnce | None = None) -> Handler:
    """``handler`` as a stop signal's handler: it waits while any :func:`held` block runs (see there),
    and only the first stop runs it. Whatever it raises decides how the command ends, so a second signal
    that comes with it (a second Ctrl-C, SIGTERM after Ctrl-C, both released together by a block) does
    nothing, rather than land in the middle of the first one's reporting; likewise once :func:`settle`
    was called. One repeated :data:`AGAIN_SECONDS` or more after the first, while the command is still
    ending (a request that takes long to answer), calls ``at_once`` with the signal: stop now.
    """

    def handle(signum: int, frame: Any) -> Any:
        # (no lock here: this runs in the main thread between two bytecodes, maybe inside held's own)
        global _settled, _stopping_since
        if _stopping_since is not None:
            if at_once is not None and time.monotonic() - _stopping_since >= AGAIN_SECONDS:
                at_once(signum)
            return None
        if _settled:
            return None
        if _holding:
            _pending.append(signum)
            return None
        _settled = True
        _stopping_since = time.monotonic()
        return handler(signum, frame)

    return handle


def settle() -> None:
    """How the command ends is decided (it returned, or its outcome is being reported): from now on the
    handlers of :func:`deferrable` do nothing. A stop signal arriving later cannot tell a finished run
    that it was interrupted, nor cut its report short; SIGKILL still ends the process at once."""
    global _settled
    _settled = True


_start = ExitStack()  # the hold from the process's start until its command begins (hold_start, begin)
_start_held = False


def hold_start(*signals: signal.Signals) -> None:
    """Hold ``signals`` (as :func:`held` does) from now until :func:`begin`: the command line's start-up
    (imports, building and parsing the command) is not where a Ctrl-C or SIGTERM can be told apart and
    reported, so one arriving then waits for the command, which says how it ended. Called again while
    the hold lasts, it does nothing."""
    global _start_held
    if not _start_held:
        _start.enter_context(held(*signals))
        _start_held = True


def begin() -> None:
    """End the hold of :func:`hold_start`, if any: a signal that arrived meanwhile has its handler run here
    (KeyboardInterrupt, or whatever the handler raises, comes out of this call). Of two that arrived
    while held, the system hands over Ctrl-C (SIGINT) before SIGTERM, whatever their order. Later calls
    do nothing."""
    global _start_held
    _start_held = False
    _start.close()
