"""The ``chatsync`` command and ``python -m chatsync``.

Ctrl-C and SIGTERM are held from the first moment, before the command line's modules load (0.1 s idle,
more on a busy machine), until its command begins: a Ctrl-C inside an import or Typer's parsing once
printed a traceback, or ended the run with 130 and not a word (Typer turns KeyboardInterrupt into that).
Held, it waits for the command, which says how it ended (:func:`chatsync.cli.main`).
"""

from __future__ import annotations

import signal
from typing import Any

from chatsync.errors import Terminated
from chatsync.signals import deferrable, hold_start


def main() -> None:
    """Console-script entry point: install chatsync's handlers, hold both signals, run the command line."""
    # Both also wait while a block holds them (chatsync.signals.held), whichever thread the signal reached.
    signal.signal(signal.SIGTERM, deferrable(_terminate))
    signal.signal(signal.SIGINT, deferrable(signal.default_int_handler))
    hold_start(signal.SIGINT, signal.SIGTERM)
    from chatsync.cli import main as run_command_line

    run_command_line()


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


if __name__ == "__main__":
    main()
