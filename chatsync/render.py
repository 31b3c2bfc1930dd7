"""Everything chatsync draws: tables, charts and progress on a terminal, plain text when piped.

The only module that imports rich. Machine formats (JSON, CSV, ndjson) are written by ``write_*``
functions that print nothing else.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from chatsync.sync import Progress as SyncProgress
from chatsync.sync import SyncSummary


def stdout_console() -> Console:
    return Console(soft_wrap=False)


def stderr_console() -> Console:
    return Console(stderr=True)


def error(message: str) -> None:
    """One line on stderr naming what went wrong and what to do."""
    console = stderr_console()
    if console.is_terminal:
        console.print(Text("error: ", style="bold red") + Text(message), highlight=False)
    else:
        print(f"error: {message}", file=sys.stderr)


def info(message: str) -> None:
    console = stderr_console()
    if console.is_terminal:
        console.print(Text(message, style="dim"), highlight=False)
    else:
        print(message, file=sys.stderr)


# ------------------------------------------------------------------------------------------------ machine
def write_json(value: Any, stream: IO[str] | None = None) -> None:
    stream = stream or sys.stdout
    stream.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")
    stream.flush()


def write_json_array(rows: Iterable[dict[str, Any]], stream: IO[str] | None = None) -> None:
    """A JSON array written row by row, so ``--all`` streams instead of building a list."""
    stream = stream or sys.stdout
    stream.write("[")
    first = True
    for row in rows:
        stream.write("\n  " if first else ",\n  ")
        stream.write(json.dumps(row, ensure_ascii=False))
        first = False
    stream.write("\n]\n" if not first else "]\n")
    stream.flush()


def write_ndjson(rows: Iterable[dict[str, Any]], stream: IO[str] | None = None) -> None:
    stream = stream or sys.stdout
    for row in rows:
        stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    stream.flush()


def write_csv(rows: Iterable[dict[str, Any]], keys: list[str], stream: IO[str] | None = None) -> None:
    stream = stream or sys.stdout
    writer = csv.DictWriter(stream, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in keys})
    stream.flush()


# ----------------------------------------------------------------------------------------------------- sync
@contextmanager
def sync_progress(enabled: bool) -> Iterator[Any]:
    """A progress bar over windows on a terminal (stderr); a no-op hook otherwise."""
    console = stderr_console()
    if not enabled or not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("windows · {task.fields[conversations]:,} conversations"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def hook(status: SyncProgress) -> None:
            if status.chatbot_id not in tasks:
                tasks[status.chatbot_id] = bar.add_task(
                    status.chatbot_id, total=status.windows_total or 1, conversations=0
                )
            bar.update(
                tasks[status.chatbot_id],
                total=status.windows_total or 1,
                completed=status.windows_done if status.windows_total else 1,
                conversations=status.conversations,
            )

        yield hook


def sync_summary(summary: SyncSummary) -> None:
    console = stdout_console()
    table = Table(title=f"sync {summary.status}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key in (
        "chatbots",
        "requests",
        "retries",
        "fetched",
        "inserted",
        "updated",
        "unchanged",
        "quarantined",
        "whatsapp_captured",
        "started_at",
        "finished_at",
    ):
        value = getattr(summary, key)
        table.add_row(
            key.replace("_", " "),
            ", ".join(value)
            if isinstance(value, list)
            else f"{value:,}"
            if isinstance(value, int)
            else str(value),
        )
    console.print(table)


# ------------------------------------------------------------------------------------------------- db info
def db_info(url: str, revision: str | None, head: str, counts: dict[str, int]) -> None:
    console = stdout_console()
    table = Table(show_header=False, title="database", title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("url", url)
    table.add_row("schema", f"{revision or 'none'}" + ("" if revision == head else f" (code knows {head})"))
    for name, count in counts.items():
        table.add_row(name, f"{count:,}")
    console.print(table)
