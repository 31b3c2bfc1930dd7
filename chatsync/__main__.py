"""The ``chatsync`` command and ``python -m chatsync``.

Ctrl-C and SIGTERM are held from here, before the command line's modules load (0.1 s idle, more on a busy
machine), until its command begins: a Ctrl-C inside an import or Typer's parsing once printed a traceback,
or ended the run with 130 and not a word (Typer turns KeyboardInterrupt into that). Held, it waits for
the command, which says how it ended (:func:`chatsync.cli.main`). What comes before this module runs (the
interpreter's own start, about 40 ms) still ends the process the default way.
"""

from __future__ import annotations

import signal

from chatsync.signals import hold_start


def main() -> None:
    """Console-script entry point: hold both signals, then run the command line."""
    hold_start(signal.SIGINT, signal.SIGTERM)
    from chatsync.cli import main as run_command_line

    run_command_line()


if __name__ == "__main__":
    main()
