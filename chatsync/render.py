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

from rich import box
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


# ------------------------------------------------------------------------------------------ conversations
def _wa_link(number: str | None, console: Console) -> Text:
    if not number:
        return Text("—", style="dim")
    if console.is_terminal and not console.legacy_windows:
        return Text(number, style=f"link https://wa.me/{number.lstrip('+')}")
    return Text(number)


def _clip(value: str | None, width: int) -> str:
    if not value:
        return ""
    return value if len(value) <= width else value[: width - 1] + "…"


def conversations_table(rows: Iterable[dict[str, Any]]) -> int:
    """Print conversations as a table that fits the terminal; returns how many were shown.

    The id is never cut (people copy it into ``show``); on a narrow terminal the less useful columns go.
    """
    console = stdout_console()
    wide = console.width >= 130
    medium = console.width >= 100
    table = Table(header_style="bold", pad_edge=False, box=box.SIMPLE_HEAD)
    table.add_column("created (UTC)", no_wrap=True, min_width=16)
    table.add_column("id", no_wrap=True, min_width=8)
    if medium:
        table.add_column("source", no_wrap=True, max_width=16, overflow="ellipsis")
    if wide:
        table.add_column("customer", no_wrap=True, max_width=24, overflow="ellipsis")
        table.add_column("country", no_wrap=True)
    table.add_column("msgs", justify="right", no_wrap=True)
    table.add_column("whatsapp", no_wrap=True)
    if wide:
        table.add_column("via", no_wrap=True, style="dim")
    count = 0
    for row in rows:
        count += 1
        cells: list[Any] = [(row["created_at"] or "")[:16].replace("T", " "), row["id"]]
        if medium:
            cells.append(row["source"] or "")
        if wide:
            cells += [_clip(row["customer"], 24), row["country"] or ""]
        cells += [str(row["message_count"]), _wa_link(row["whatsapp_number"], console)]
        if wide:
            cells.append(row["whatsapp_source"] or "")
        table.add_row(*cells)
    if count:
        console.print(table)
    else:
        info("no conversations match")
    return count


def conversation(detail: dict[str, Any]) -> None:
    """One conversation: its fields, transcript, what the rule found, and the audit trail."""
    console = stdout_console()
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold")
    head.add_column()
    for key in (
        "id",
        "chatbot_id",
        "created_at",
        "last_message_at",
        "source",
        "customer",
        "country",
        "message_count",
    ):
        head.add_row(key.replace("_", " "), "" if detail[key] is None else str(detail[key]))
    number = _wa_link(detail["whatsapp_number"], console)
    if detail["whatsapp_source"]:
        number.append(f"  ({detail['whatsapp_source']})", style="dim")
    head.add_row("whatsapp", number)
    finding = detail.get("whatsapp_finding")
    if finding:
        found = finding["outcome"] + (f": {finding['matched']!r}" if finding["matched"] else "")
        head.add_row("rule found", found)
        for reason in finding["rejected"]:
            head.add_row("", Text(f"rejected {reason}", style="dim"))
    console.print(head)
    console.print()
    for message in detail["messages"]:
        stamp = (message["created_at"] or "")[11:19]
        role = message["role"]
        style = "cyan" if role == "user" else "green" if role == "assistant" else "yellow"
        line = Text(f"{stamp:>8} ", style="dim") + Text(f"{role:>9}  ", style=f"bold {style}")
        line.append(message["content"])
        console.print(line, highlight=False)
    if detail["whatsapp_audit"]:
        console.print()
        audit = Table(
            title="WhatsApp changes", title_justify="left", header_style="bold", box=box.SIMPLE_HEAD
        )
        for column in ("at (UTC)", "by", "old", "new"):
            audit.add_column(column)
        for entry in detail["whatsapp_audit"]:
            audit.add_row(
                entry["at"][:19].replace("T", " "),
                entry["by"],
                f"{entry['old'] or '—'} ({entry['old_source'] or 'none'})",
                f"{entry['new'] or '—'} ({entry['new_source'] or 'none'})",
            )
        console.print(audit)


def whatsapp_change(change: Any) -> None:
    def show(number: str | None, source: str | None) -> str:
        return f"{number or 'no number'} ({source or 'none'})"

    if not change.changed:
        info(f"{change.conversation_id}: unchanged, {show(change.new, change.new_source)}")
        return
    stdout_console().print(
        f"{change.conversation_id}: {show(change.old, change.old_source)} → {show(change.new, change.new_source)}",
        highlight=False,
    )
