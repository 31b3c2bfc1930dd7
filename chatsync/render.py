"""Everything chatsync draws: tables, charts and progress on a terminal, plain text when piped.

The only module that imports rich. Machine formats (JSON, CSV, ndjson) are written by ``write_*``
functions that print nothing else.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date, timedelta
from typing import IO, TYPE_CHECKING, Any, Literal

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # the sync engine (and SQLAlchemy) stay out of commands that only draw
    from chatsync.sync import Progress as SyncProgress
    from chatsync.sync import SyncSummary


PIPE_WIDTH = 160  # a table written to a file or a pipe: no terminal says how wide, so values are not cut


def visible(value: object, lines: bool = False, style: str = "") -> Text:
    """Text from Chatbase or a user, safe to draw: never read as rich markup, and every control character
    shown as a symbol of the same width (ESC as ␛), so a message cannot recolour, retitle or rewrite the
    terminal. ``lines``: keep newlines and tabs (a transcript); otherwise they are shown too (a table cell)."""
    from chatsync.logs import shown

    return Text(shown(str(value), lines), style=style)


class _Console(Console):
    """rich's Console, except when the reader stops reading (``chatsync status | head -1``): rich ends the
    process with exit 1 itself, which a monitor reads as "stale" or "failed". Raised as BrokenPipeError
    instead, the command ends as any other does on a closed pipe: quietly, with 141 (as SIGPIPE would)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def stdout_console() -> Console:
    """Where tables go: stdout in its own encoding, a character it cannot show printed as ``?``."""
    import os

    _reconfigure(sys.stdout, errors="replace")
    piped = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    # markup=False: Chatbase's text ("jane[/]doe", "[bold red]SYSTEM") is shown as it is, never as styles
    return _Console(soft_wrap=False, width=PIPE_WIDTH if piped else None, markup=False)


def machine_stdout() -> IO[str]:
    """Where machine formats (JSON, ndjson, CSV) go: stdout as UTF-8, whatever the locale or
    ``PYTHONIOENCODING`` say (a Windows ``> file`` would otherwise get cp1252 and fail on Chinese)."""
    _reconfigure(sys.stdout, encoding="utf-8", errors="strict")
    return sys.stdout


def _reconfigure(stream: IO[str], **options: str) -> None:
    current = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    if current in ("utf8", "utf8sig"):
        return
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(**options)


def stderr_console() -> Console:
    return _Console(stderr=True, markup=False)


def error(message: str) -> None:
    """One line on stderr naming what went wrong and what to do (a JSON object when the log is JSON)."""
    from chatsync.logs import json_error_line

    as_json = json_error_line(message)
    if as_json is not None:
        print(as_json, file=sys.stderr)
        return
    console = stderr_console()
    if console.is_terminal:
        console.print(Text("error: ", style="bold red") + visible(message), highlight=False)
    else:
        print(f"error: {visible(message).plain}", file=sys.stderr)


def line(text: str) -> None:
    """A command's one-line result on stdout (where a script reading it looks)."""
    print(text)


def version_line(version: str) -> None:
    print(f"chatsync {version}")


def info(message: str, wrap: bool = True) -> None:
    """A line for the person at the terminal, on stderr. ``wrap=False`` for one holding a command to copy:
    the terminal folds it, rich does not break it into two lines that each paste as a command."""
    console = stderr_console()
    if console.is_terminal:
        console.print(visible(message, lines=True, style="dim"), highlight=False, soft_wrap=not wrap)
    else:
        print(visible(message, lines=True).plain, file=sys.stderr)


# ------------------------------------------------------------------------------------------------ machine
def write_json(value: Any, stream: IO[str] | None = None) -> None:
    stream = stream or machine_stdout()
    stream.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")
    stream.flush()


def json_line(value: Any) -> str:
    """One compact JSON line (a cron log holds one of these per run)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def write_json_line(value: Any, stream: IO[str] | None = None) -> None:
    stream = stream or machine_stdout()
    stream.write(json_line(value) + "\n")
    stream.flush()


def write_json_array(rows: Iterable[dict[str, Any]], stream: IO[str] | None = None) -> None:
    """A JSON array written row by row, so ``--all`` streams instead of building a list."""
    stream = stream or machine_stdout()
    stream.write("[")
    first = True
    for row in rows:
        stream.write("\n  " if first else ",\n  ")
        stream.write(json.dumps(row, ensure_ascii=False))
        first = False
    stream.write("\n]\n" if not first else "]\n")
    stream.flush()


def write_ndjson(rows: Iterable[dict[str, Any]], stream: IO[str] | None = None) -> None:
    stream = stream or machine_stdout()
    for row in rows:
        stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    stream.flush()


def write_csv(rows: Iterable[dict[str, Any]], keys: list[str], stream: IO[str] | None = None) -> None:
    stream = stream or machine_stdout()
    writer = csv.DictWriter(stream, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else _inert(row[k]) for k in keys})
    stream.flush()


_NUMBER = re.compile(r"^[+-]?\d[\d .]*$")


def _inert(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting like a formula (``=``, ``@``, ``+``/``-`` that
    is not a number, a tab or carriage return) gets a leading ``'`` (OWASP's advice for CSV injection).
    Numbers, E.164 ones included (``+85291234567``), are left as they are."""
    if not isinstance(value, str) or not value or value[0] not in "=@+-\t\r" or _NUMBER.match(value):
        return value
    return "'" + value


# ----------------------------------------------------------------------------------------------------- sync
@contextmanager
def sync_progress(enabled: bool) -> Iterator[Any]:
    """A progress bar over windows on a terminal (stderr); a no-op hook otherwise."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = stderr_console()
    if not enabled or not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}", style="bold", markup=False),
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


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal (stderr) for a long command; yields ``done(n)`` to report how many
    of ``total`` are done. Nothing is drawn when stderr is not a terminal."""
    console = stderr_console()
    if not console.is_terminal:
        yield lambda done: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done: bar.update(task, completed=done)


# what a person reads for a summary field whose name alone misleads (the JSON keeps the field names)
_SUMMARY_LABELS = {"whatsapp_captured": "with a number found (new or not)", "synced": "synced to the end"}


def sync_summary(summary: SyncSummary) -> None:
    console = stdout_console()
    table = Table(title=f"sync {summary.status}", show_header=False, title_justify="default")
    table.add_column(style="bold")
    table.add_column(justify="right")
    shown = summary.as_dict()  # (refused, and synced for a run that did not end ok, as --json has them)
    for key in (
        "chatbots",
        "refused",
        "synced",
        "requests",
        "retries",
        "fetched",
        "inserted",
        "updated",
        "unchanged",
        "quarantined",
        "repaired",
        "whatsapp_captured",
        "started_at",
        "finished_at",
    ):
        if key not in shown:
            continue
        value = shown[key]
        table.add_row(
            _SUMMARY_LABELS.get(key, key.replace("_", " ")),
            (", ".join(value) or "none")
            if isinstance(value, list)
            else f"{value:,}"
            if isinstance(value, int)
            else str(value),
        )
    console.print(table)


def sync_plan(
    plans: list[dict[str, Any]],
    requests_made: int,
    as_json: bool,
    refused: list[str] | None = None,
    error: tuple[str, int] | None = None,
) -> None:
    """What ``sync --dry-run`` would do, per chatbot. ``refused``: the chatbots Chatbase refused, left
    out; ``error``: (message, exit code) the command ends with, told in the JSON object too."""
    if as_json:
        line: dict[str, Any] = {"dry_run": True, "planning_requests": requests_made, "chatbots": plans}
        if refused:
            line["refused"] = refused
        if error is not None:
            line.update(status="failed", error=error[0], exit_code=error[1])
        write_json_line(line)
        return
    if refused and not plans:
        return  # nothing to plan: the command's error says why
    if refused:
        info(f"not planned, refused by Chatbase: {', '.join(refused)}")
    console = stdout_console()
    table = Table(title="sync plan (nothing fetched or stored)", title_justify="default", header_style="bold")
    for header in ("chatbot", "from", "to", "days to fetch", "windows", "stored now", "≈ requests"):
        table.add_column(
            header, no_wrap=True, justify="left" if header in ("chatbot", "from", "to") else "right"
        )
    for plan in plans:
        table.add_row(
            plan["chatbot_id"],
            plan["first_day"] or "no conversations",
            plan["last_day"] or "",
            f"{plan['days']:,}",
            f"{len(plan['windows']):,}",
            f"{plan['stored_conversations']:,}",
            f"{plan['estimated_requests']:,}",
        )
    console.print(table)
    info(
        f"planning took {requests_made} request(s); 'from'..'to' are the days the sync would fetch, cut into "
        "'windows' fetched side by side; '≈ requests' counts one per page of what is stored now and one last "
        "page per window: conversations not stored yet add pages"
    )


# -------------------------------------------------------------------------------------------- operating
def status(statuses: list[dict[str, Any]], checked: dict[str, Any], as_json: bool) -> None:
    """``chatsync status``: one row per chatbot, or one JSON object."""
    from chatsync.timeutil import iso_z

    if as_json:
        write_json(
            {
                "checked_at": iso_z(checked["checked_at"]),
                "max_age_seconds": checked["max_age_seconds"],
                "chatbots": statuses,
            }
        )
        return
    if not statuses:
        info("no chatbot synced yet: run chatsync sync")
        return
    now = checked["checked_at"]
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for header in ("chatbot", "run", "ended", "good sync", "newest", "stored", "quarantined"):
        table.add_column(
            header, no_wrap=True, justify="right" if header in ("stored", "quarantined") else "left"
        )
    for s in statuses:
        run = s["last_run"] or {}
        good = s["last_good_sync_age_seconds"]
        table.add_row(
            visible(s["chatbot_id"]),
            Text(
                run.get("status", "never"),
                style={"ok": "green", "partial": "yellow"}.get(run.get("status", ""), "red"),
            ),
            _ago(run.get("finished_at") or run.get("started_at"), now),
            Text(
                ("STALE " if s["stale"] else "") + (_age(good) if good is not None else "never"),
                style="bold red" if s["stale"] else "",
            ),
            _ago(s["newest_conversation_at"], now),
            f"{s['conversations']:,}",
            Text(f"{s['quarantined']:,}", style="yellow" if s["quarantined"] else ""),
        )
    console = stdout_console()
    console.print(table)
    console.print(
        Text("ended, good sync (the last complete one), newest (conversation): how long ago", style="dim")
    )
    for s in statuses:
        run = s["last_run"] or {}
        if run.get("error"):
            info(f"{s['chatbot_id']}: last run {run['status']}: {run['error']}")


def checks(results: list[Any], as_json: bool) -> None:
    """``chatsync doctor``: one line per check (``ok``, ``warn`` or ``FAIL``), or one JSON object."""
    if as_json:
        write_json_line(
            {
                "ok": all(c.ok for c in results),
                "checks": [
                    {"name": c.name, "ok": c.ok, "warning": c.warning, "detail": c.detail} for c in results
                ],
            }
        )
        return
    console = stdout_console()
    for check in results:
        mark = (
            Text("FAIL", style="bold red")
            if not check.ok
            else Text("warn", style="yellow")
            if check.warning
            else Text("ok  ", style="green")
        )
        console.print(mark + Text(f"  {check.name:<16} {check.detail}"), highlight=False, soft_wrap=True)


def settings_table(rows: list[dict[str, Any]], as_json: bool) -> None:
    """``chatsync config show``: each setting's variable, value and origin."""
    if as_json:
        write_json({"settings": rows})
        return
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("setting", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("from", no_wrap=True)
    for row in rows:
        origin = row["origin"] + (f" {row['from']}" if row["from"] else "")
        table.add_row(
            row["variables"][0], row["value"], Text(origin, style="dim" if row["origin"] == "default" else "")
        )
    stdout_console().print(table)


def _ago(moment: str | None, now: Any) -> str:
    """How long ago an ISO ``Z`` timestamp was, ``4.0m`` (``--json`` has the time itself)."""
    if not moment:
        return ""
    from chatsync.timeutil import parse_timestamp

    return _age(round((now - parse_timestamp(moment)).total_seconds()))


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds}s"


def quarantined(rows: list[dict[str, Any]]) -> None:
    if not rows:
        info("nothing is quarantined")
        return
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("chatbot", no_wrap=True)
    table.add_column("conversation", no_wrap=True)
    table.add_column("last seen", no_wrap=True)
    table.add_column("reason")
    for row in rows:
        table.add_row(
            str(row["id"]),
            visible(row["chatbot_id"]),
            visible(row["conversation_id"] or "—"),
            row["last_seen_at"],
            visible(row["reason"]),
        )
    stdout_console().print(table)


def quarantined_record(record: dict[str, Any]) -> None:
    console = stdout_console()
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold")
    head.add_column()
    for key in ("id", "chatbot_id", "conversation_id", "reason", "first_seen_at", "last_seen_at", "run_id"):
        head.add_row(key.replace("_", " "), visible("" if record[key] is None else record[key]))
    console.print(head)
    console.print()
    try:
        pretty = json.dumps(json.loads(record["raw"]), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        pretty = record["raw"]
    console.print(visible(pretty, lines=True), highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------------- db info
def db_info(url: str, revision: str | None, head: str, counts: dict[str, int], as_json: bool) -> None:
    """``chatsync db info``: a table, or one JSON object (``url`` masked, ``schema``, ``schema_head``,
    ``rows`` per table)."""
    if as_json:
        write_json({"url": url, "schema": revision, "schema_head": head, "rows": counts})
        return
    console = stdout_console()
    table = Table(show_header=False, title="database", title_justify="default")
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


@dataclass(frozen=True)
class _Column:
    header: str
    width: int  # what its widest cell needs
    least: int  # what it may shrink to (== width: never cut)
    cell: Callable[[dict[str, Any]], Any]
    justify: Literal["left", "right"] = "left"
    style: str = ""


def _list_columns(rows: list[dict[str, Any]], room: int, console: Console) -> list[_Column]:
    """The columns of ``list`` that fit in ``room`` characters, in their display order.

    The id and the number are never cut (people copy them); the other columns come in order of use while
    they fit, at their full width or else shrunk (source, customer), before a column is left out.
    """

    def widest(values: Iterable[str], header: str) -> int:
        return max([len(header), *(len(v) for v in values)])

    ids = widest((r["id"] for r in rows), "id")
    numbers = widest((r["whatsapp_number"] or "—" for r in rows), "whatsapp")
    sources = min(16, widest((r["source"] or "" for r in rows), "source"))
    customers = min(24, widest((r["customer"] or "" for r in rows), "customer"))
    counts = widest((str(r["message_count"]) for r in rows), "msgs")
    columns = {
        "created": _Column("created (UTC)", 16, 16, lambda r: (r["created_at"] or "")[:16].replace("T", " ")),
        "id": _Column("id", ids, ids, lambda r: r["id"]),
        "source": _Column("source", sources, min(sources, 8), lambda r: r["source"] or ""),
        "customer": _Column("customer", customers, min(customers, 10), lambda r: r["customer"] or ""),
        "country": _Column("country", 7, 7, lambda r: r["country"] or ""),
        "msgs": _Column("msgs", counts, counts, lambda r: str(r["message_count"]), "right"),
        "whatsapp": _Column("whatsapp", numbers, numbers, lambda r: _wa_link(r["whatsapp_number"], console)),
        "via": _Column("via", 9, 9, lambda r: r["whatsapp_source"] or "", style="dim"),
    }
    widths = {"id": ids, "whatsapp": numbers}
    for name in ("created", "msgs", "source", "via", "customer", "country"):
        for width in dict.fromkeys((columns[name].width, columns[name].least)):
            if sum(widths.values()) + width + 3 * (len(widths) + 1) - 1 <= room:
                widths[name] = width
                break
    return [replace(column, width=widths[name]) for name, column in columns.items() if name in widths]


def _width(columns: list[_Column]) -> int:
    """A SIMPLE_HEAD table's width without outer padding: the cells plus three characters between them."""
    return sum(c.width for c in columns) + 3 * len(columns) - 1


def conversations_table(rows: Iterable[dict[str, Any]]) -> int:
    """Print conversations as a table that fits the terminal; returns how many were shown.

    The id and the number are never cut (people copy them into ``show`` and WhatsApp): on a narrow terminal
    the other columns shrink or go, and when even those two do not fit the lines run past the edge.
    """
    shown = list(rows)
    if not shown:
        info("no conversations match")
        return 0
    console = stdout_console()
    columns = _list_columns(shown, console.width, console)
    table = Table(header_style="bold", pad_edge=False, box=box.SIMPLE_HEAD)
    for column in columns:
        table.add_column(
            column.header,
            no_wrap=True,
            min_width=column.width,
            max_width=column.width,
            overflow="ellipsis",
            justify=column.justify,
            style=column.style or None,
        )
    for row in shown:
        cells = (column.cell(row) for column in columns)
        table.add_row(*(cell if isinstance(cell, Text) else visible(cell) for cell in cells))
    console.print(table, width=max(console.width, _width(columns)), crop=False)
    return len(shown)


def conversation(detail: dict[str, Any]) -> None:
    """One conversation: its fields, transcript, what the rule found, and the audit trail."""
    console = stdout_console()
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold")
    head.add_column()
    from chatsync.store.queries import LIST_KEYS

    for key in LIST_KEYS:
        if key.startswith("whatsapp_"):
            continue  # shown below with its source and a link
        head.add_row(key.replace("_", " "), visible("" if detail[key] is None else detail[key]))
    number = _wa_link(detail["whatsapp_number"], console)
    if detail["whatsapp_source"]:
        number.append(f"  ({detail['whatsapp_source']})", style="dim")
    head.add_row("whatsapp", number)
    for key in ("title", "status"):  # API v2 only
        if detail.get(key):
            head.add_row(key, visible(str(detail[key]).replace("_", " ")))
    finding = detail.get("whatsapp_finding")
    if finding:
        found = finding["outcome"] + (f": {finding['matched']!r}" if finding["matched"] else "")
        head.add_row("rule found", visible(found))
        for reason in finding["rejected"]:
            head.add_row("", visible(f"rejected {reason}", style="dim"))
        others = [f"{source} {number}" for source, number in finding["sources"].items() if number]
        if others:
            head.add_row("numbers known", visible(", ".join(others)))
    console.print(head)
    console.print()
    for message in detail["messages"]:
        stamp = (message["created_at"] or "")[11:19]
        role = message["role"]
        style = "cyan" if role == "user" else "green" if role == "assistant" else "yellow"
        line = Text(f"{stamp:>8} ", style="dim") + visible(f"{role:>9}  ", style=f"bold {style}")
        if message.get("tools"):
            line.append(visible(f"[called {', '.join(message['tools'])}] ", style="dim"))
        line.append(visible(message["content"], lines=True))
        if message.get("feedback"):
            line.append(
                f"  ({'rated up' if message['feedback'] == 'positive' else 'rated down'})", style="dim"
            )
        console.print(line, highlight=False)
    if detail["whatsapp_audit"]:
        console.print()
        audit = Table(
            title="WhatsApp changes", title_justify="default", header_style="bold", box=box.SIMPLE_HEAD
        )
        for column in ("at (UTC)", "by", "old", "new"):
            audit.add_column(column)
        for entry in detail["whatsapp_audit"]:
            audit.add_row(
                entry["at"][:19].replace("T", " "),
                visible(entry["by"]),
                f"{entry['old'] or '—'} ({entry['old_source'] or 'none'})",
                f"{entry['new'] or '—'} ({entry['new_source'] or 'none'})",
            )
        console.print(audit)


def whatsapp_change(change: Any) -> None:
    def show(number: str | None, source: str | None) -> str:
        return f"{number or 'no number'} ({source or 'none'})"

    if not change.changed:
        info(visible(f"{change.conversation_id}: unchanged, {show(change.new, change.new_source)}").plain)
        return
    stdout_console().print(
        visible(
            f"{change.conversation_id}: {show(change.old, change.old_source)} → {show(change.new, change.new_source)}"
        ),
        highlight=False,
    )


# ------------------------------------------------------------------------------------------------- report
_SHADES = " ░▒▓█"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def _num(value: float | int | None, unit: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,}{unit}" if isinstance(value, int) else f"{value:,.2f}{unit}"


def _bar(value: int, top: int, width: int) -> str:
    if not top:
        return ""
    cells = value / top * width
    full = int(cells)
    return "█" * full + ("▌" if cells - full >= 0.5 else "")


def _section(console: Console, title: str) -> None:
    console.print()
    console.print(Text(title, style="bold underline"))


def _pairs_table(rows: list[tuple[str, str]]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in rows:
        table.add_row(label, value)
    return table


def _counts_table(counts: dict[str, int], total: int, limit: int = 8) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column()
    table.add_column(justify="right")
    table.add_column(justify="right", style="dim")
    table.add_column()
    top = max(counts.values(), default=0)
    items = list(counts.items())
    shown, rest = items[:limit], items[limit:]
    if rest:
        shown.append((f"{len(rest)} more", sum(v for _, v in rest)))
    for key, value in shown:
        table.add_row(
            visible(key), f"{value:,}", _pct(value / total if total else None), _bar(value, top, 20)
        )
    return table


def report(data: dict[str, Any]) -> None:
    """The report as a person reads it: window and coverage first, then volume, depth, WhatsApp, audience."""
    console = stdout_console()
    window = data["window"]
    since, until = window["since"], window["until"]
    days = (
        f"{since} … {until}"
        if since and until
        else f"from {since}"
        if since
        else f"until {until}"
        if until
        else "all time"
    )
    span = f"{days} ({window['timezone']})"
    console.print(Text("chatsync report", style="bold") + Text(f"  {span}", style="dim"))
    n = data["conversations"]
    if not n:
        console.print("no conversations in this window")
        return
    console.print(
        _pairs_table(
            [
                ("conversations", f"{n:,}"),
                ("users", f"{data['users']:,}  (known for {_pct(data['users_coverage'])} of conversations)"),
                ("response-time coverage", _pct(data["response_time_seconds"]["coverage"])),
            ]
        )
    )

    _section(console, "Volume")
    console.print(
        _pairs_table(
            [
                ("messages", f"{data['messages']:,}"),
                ("from users", f"{data['user_messages']:,}"),
                ("from the bot", f"{data['assistant_messages']:,}"),
            ]
        )
    )
    days = data["by_day"]
    if days:
        console.print()
        if len(days) > 31:  # weeks keep a long window readable on 80 columns
            weeks: dict[str, int] = {}
            for row in days:
                day = date.fromisoformat(row["date"])
                key = (day - timedelta(days=day.weekday())).isoformat()
                weeks[key] = weeks.get(key, 0) + row["conversations"]
            rows = [(f"week of {k}", v) for k, v in weeks.items()]
            shares: list[float | None] = []
        else:
            rows = [(row["date"], row["conversations"]) for row in days]
            shares = [row["rated_up_share"] for row in days]
        rated = any(share is not None for share in shares)  # the trend of answers rated up, per day
        per = "conversations started per week" if len(days) > 31 else "conversations started per day"
        console.print(Text(f"{per:<66}{'answers rated up' if rated else ''}", style="dim"), highlight=False)
        top = max(v for _, v in rows)
        for i, (label, value) in enumerate(rows):
            bar = f"{label:>18} {value:>7,} {_bar(value, top, 38 if rated else 46)}"
            console.print(f"{bar:<66} {_pct(shares[i]):>7}" if rated else bar, highlight=False)

    _section(console, "Depth")
    per = data["messages_per_conversation"]
    console.print(
        _pairs_table(
            [
                ("messages per conversation", f"mean {_num(per['mean'])} · median {_num(per['median'])}"),
                ("engaged (2+ user messages)", _pct(data["engagement_rate"])),
                ("ended on a bot question", _pct(data["unanswered_rate"])),
            ]
        )
    )
    console.print(
        _counts_table(
            {f"{k} message{'' if k == '1' else 's'}": v for k, v in data["length_histogram"].items()}, n
        )
    )

    _feedback_and_status(console, data)

    _section(console, "WhatsApp numbers")
    wa = data["whatsapp"]
    console.print(
        _pairs_table(
            [
                ("asked for a number", f"{wa['prompted']:,}"),
                ("replied", f"{wa['replied']:,}"),
                ("number captured", f"{wa['captured']:,}  ({_pct(wa['capture_rate'])} of asked)"),
                ("the WhatsApp sender's own", f"{wa['from_channel']:,}"),
                ("from lead forms", f"{wa['from_lead']:,}"),
                ("from Chatbase forms", f"{wa['from_form']:,}"),
                ("set by hand", f"{wa['manual']:,}"),
                ("conversations with a number", f"{wa['with_number']:,}"),
                ("lead forms received", "—" if wa["leads"] is None else f"{wa['leads']:,}"),
            ]
        )
    )
    missed = wa["missed"]
    if any(missed.values()):
        console.print(Text("missed because", style="dim"))
        labels = {
            "no_reply": "no reply",
            "not_found": "no number in reply",
            "ambiguous": "two numbers in reply",
        }
        console.print(_counts_table({labels[k]: v for k, v in missed.items()}, max(wa["prompted"], 1)))

    _section(console, "Audience")
    console.print(Text("sources", style="dim"))
    console.print(_counts_table(data["by_source"], n))
    console.print(Text("countries", style="dim"))
    console.print(_counts_table(data["by_country"], n))
    if data["by_phone_region"]:
        console.print(Text("phone regions", style="dim"))
        console.print(_counts_table(data["by_phone_region"], wa["with_number"]))
    console.print(Text(f"conversation starts by weekday and hour ({window['timezone']})", style="dim"))
    grid = data["by_weekday_hour"]
    top = max((v for row in grid for v in row), default=0)
    console.print("      " + "".join(f"{h:<6}" for h in range(0, 24, 3)), highlight=False)
    for name, row in zip(("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"), grid, strict=True):
        cells = "".join(_SHADES[min(4, math.ceil(v / top * 4))] * 2 if top else "  " for v in row)
        console.print(f"{name:>4}  {cells}", highlight=False)
    if top:
        # shades are shares of the busiest hour: with few conversations a light cell may be chance
        quarters = " ".join(f"{_SHADES[i]} ≤{i * 25}%" for i in range(1, 4))
        legend = f"share of the busiest hour ({top:,} starts): {quarters} {_SHADES[4]} >75%"
        console.print(Text(f"      {legend}", style="dim"), highlight=False)

    timing = data["response_time_seconds"]
    first = data["first_response_time_seconds"]
    if timing["coverage"]:
        _section(console, "Timing")
        console.print(
            _pairs_table(
                [
                    (
                        "bot reply time",
                        f"median {_num(timing['median'], 's')} · p90 {_num(timing['p90'], 's')} · "
                        f"mean {_num(timing['mean'], 's')}",
                    ),
                    (
                        "first reply time",
                        f"median {_num(first['median'], 's')} · p90 {_num(first['p90'], 's')}",
                    ),
                    (
                        "measured on",
                        f"{timing['pairs']:,} replies, {_pct(timing['coverage'])} of conversations",
                    ),
                ]
            )
        )


def _feedback_and_status(console: Console, data: dict[str, Any]) -> None:
    """Thumbs on answers, takeovers and statuses: what only Chatbase API v2 data carries ("n/a" without)."""

    def share(value: float | None) -> str:
        return "n/a" if value is None else _pct(value)

    _section(console, "Ratings and takeovers")
    feedback = data["feedback"]
    statuses = data["by_status"]
    with_status = sum(statuses.values()) if statuses else 0
    answers = feedback["answers"]
    rows = [
        (
            "answers rated up",
            share(feedback["rated_up_share"])
            + (
                ""
                if answers is None
                else f"  ({feedback['rated_up']:,} of {answers:,} answers, rated or not)"
            ),
        ),
        (
            "answers rated down",
            share(feedback["rated_down_share"])
            + ("" if answers is None else f"  ({feedback['rated_down']:,} of {answers:,})"),
        ),
        (
            "taken over by a person",
            share(data["takeover_rate"])
            + (f"  (of {with_status:,} conversations with a status)" if statuses else ""),
        ),
    ]
    if answers is not None and feedback["coverage"] is not None and feedback["coverage"] < 1:
        # a range mixing v1 and v2 data: say how much of it these figures speak for
        rows.append(("measured on", f"{_pct(feedback['coverage'])} of conversations (API v2 data)"))
    console.print(_pairs_table(rows))
    if statuses:
        console.print(Text("statuses", style="dim"))
        console.print(_counts_table(statuses, with_status))
    if answers is None and not statuses:
        console.print(Text("ratings and statuses come with Chatbase API v2 data", style="dim"))


def extraction(text: str, result: Any) -> None:
    """Each candidate of a reply and the verdict on it, for "why wasn't this number stored?"."""
    console = stdout_console()
    verdict = {
        "captured": f"stores {result.number}",
        "ambiguous": "stores nothing: more than one number",
        "not_found": "stores nothing: no acceptable number",
    }[result.outcome]
    console.print(Text(verdict, style="bold"), highlight=False)
    if not result.candidates:
        console.print("no digits in the reply", highlight=False)
        return
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    table.add_column("candidate")
    table.add_column("verdict")
    for candidate in result.candidates:
        table.add_row(
            candidate.text,
            (candidate.e164 and f"accepted as {candidate.e164}") or f"rejected: {candidate.reason}",
        )
    console.print(table)


def grants(rows: list[dict[str, Any]]) -> None:
    if not rows:
        info("no grants: nobody but admins sees any chatbot")
        return
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    for column in ("chatbot", "who", "id", "granted (UTC)"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["chatbot_id"], row["principal_type"], row["principal_id"], (row["granted_at"] or "")[:19]
        )
    stdout_console().print(table)
