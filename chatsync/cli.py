"""The chatsync command line: parse, build settings, call the core, render, map errors to exit codes."""

from __future__ import annotations

import functools
import gc
import itertools
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Annotated, Any, TypeVar

import typer

from chatsync import signals
from chatsync.errors import (
    ChatsyncError,
    ConversationNotFound,
    DatabaseUnreachable,
    ExitCode,
    LockHeld,
    Terminated,
    UsageError,
    stop_message,
)
from chatsync.signals import begin, deferrable, held

F = TypeVar("F", bound=Callable[..., Any])

HELP = {"help_option_names": ["-h", "--help"]}
LIST_LIMIT = 20  # conversations `list` shows without --limit
app = typer.Typer(
    name="chatsync",
    help="Sync Chatbase conversations into your database, find the WhatsApp numbers users type, and report.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=HELP,
)


def _group(name: str, help: str, short_help: str | None = None) -> typer.Typer:
    group = typer.Typer(help=help, no_args_is_help=True, context_settings=HELP)
    app.add_typer(group, name=name, short_help=short_help)
    return group


db_app = _group("db", "Database schema and status.")
quarantine_app = _group(
    "quarantine",
    "Records Chatbase sent that could not be stored: list, show, retry.",
    "Records Chatbase sent that could not be stored.",
)
config_app = _group("config", "chatsync's settings and where they come from.")
access_app = _group(
    "access",
    "Which Clerk users and organizations may see which chatbot (HTTP API).",
    "Who may see which chatbot through the HTTP API.",
)
users_app = _group("users", "Clerk users known to chatsync (HTTP API).")
leads_app = _group(
    "leads",
    "Chatbase lead forms (the HTTP API's webhook stores them as they are sent).",
    "Chatbase lead forms: backfill them from get-leads.",
)


@dataclass
class Context:
    """What the global options hand to every command."""

    database_url: str | None = None
    debug: bool = False
    flags: dict[str, Any] = field(default_factory=dict)

    def settings(self, **flags: Any) -> Any:
        from chatsync.config import load_settings

        return load_settings({"database_url": self.database_url, **flags})

    def engine(self, settings: Any, create: bool = True, ride_out: bool = False) -> Any:
        """The database of ``settings``, migrated. ``create=False`` for a command that only reads or
        changes what is stored: a SQLite file that does not exist is an error, not a new empty database
        (a mistyped path once made its folders and an empty file, and the command said all was well).
        ``ride_out``: a database that is down is tried again for the retry budget (a sync from cron)."""
        from chatsync.store.engine import ensure_schema, ensure_schema_riding_out, open_engine

        engine = open_engine(settings.database_url, create=create)
        if ride_out:
            ensure_schema_riding_out(engine, settings.retry_budget.total_seconds())
        else:
            ensure_schema(engine)
        return engine


def handle_errors(command: F) -> F:
    """Turn chatsync's exceptions into one line on stderr and the contract's exit code. Ctrl-C and SIGTERM
    held since start-up (:func:`main`) are taken as the command begins, and reported the same way."""
    return _handling_errors(command, begins=True)


def handle_errors_begun_by_command(command: F) -> F:
    """:func:`handle_errors` for a command that takes the signals held since start-up itself
    (:func:`chatsync.signals.begin`), where it can still report how it ended its own way."""
    return _handling_errors(command, begins=False)


def _handling_errors(command: F, begins: bool) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from chatsync import render

        debug = _ctx().debug
        try:
            try:
                if begins:
                    begin()
                return command(*args, **kwargs)
            finally:
                # The command's outcome is decided (returned or raised): a stop signal from here on
                # changes nothing (Typer would turn a Ctrl-C after this point into a silent exit 130).
                _settle()
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except ChatsyncError as exc:
            if debug:
                traceback.print_exc()
            if isinstance(exc, ConversationNotFound):
                render.error(f"{exc}: give the whole id, as `chatsync list` prints it")
            else:
                render.error(str(exc))
            raise typer.Exit(int(exc.exit_code)) from None
        except (KeyboardInterrupt, Terminated) as exc:
            render.error(_one_line(exc))
            raise typer.Exit(_exit_code(exc)) from None
        except BrokenPipeError:
            # The reader stopped reading (`chatsync list --all | head`): not an error worth a message.
            # Point stdout at devnull so the interpreter's final flush stays quiet, and end as SIGPIPE would.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as exc:
            if debug:
                traceback.print_exc()
            first = str(exc).strip().splitlines()
            render.error(
                f"unexpected {type(exc).__name__}: {first[0] if first else ''} (run with --debug for details)"
            )
            raise typer.Exit(int(ExitCode.ERROR)) from None

    return wrapper  # type: ignore[return-value]


def _default_db_help() -> str:
    from chatsync.config import default_database_path

    try:
        return f"SQLAlchemy URL [env CHATSYNC_DATABASE_URL, DATABASE_URL; default: sqlite:///{default_database_path()}]"
    except Exception:
        return (
            "SQLAlchemy URL [env CHATSYNC_DATABASE_URL, DATABASE_URL; default: SQLite in the data directory]"
        )


def _print_version(value: bool | None) -> None:
    if value:
        from chatsync import render

        render.version_line(installed_version())
        raise typer.Exit()


def installed_version() -> str:
    """The installed distribution's version, else the package's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chatbase-sync")
    except PackageNotFoundError:
        from chatsync import __version__

        return __version__


@app.callback()
def main_options(
    ctx: typer.Context,
    database_url: Annotated[
        str | None, typer.Option("--database-url", metavar="URL", help=_default_db_help(), show_default=False)
    ] = None,
    verbose: Annotated[
        int,
        typer.Option(
            "-v",
            "--verbose",
            count=True,
            show_default=False,
            help="More log lines on stderr: -v info, -vv debug.",
        ),
    ] = 0,
    quiet: Annotated[
        int,
        typer.Option(
            "-q", "--quiet", count=True, show_default=False, help="Fewer log lines: -q errors only."
        ),
    ] = 0,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks, and what libraries log, for errors.")
    ] = False,
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", "-V", callback=_print_version, is_eager=True, help="Show the version and exit."
        ),
    ] = None,
) -> None:
    """Sync Chatbase conversations into your database, find WhatsApp numbers, and report on them."""
    from chatsync import logs

    global _current
    _current = ctx.obj = Context(database_url=database_url, debug=debug)
    # An error is always one line on stderr (handle_errors); log lines are what -v/-q/--debug ask for.
    logs.configure(logs.level_for(verbose, quiet), _log_format(), debug)


def _log_format() -> str:
    """``CHATSYNC_LOG_FORMAT`` (environment, else ``.env``): text or json."""
    from chatsync.config import log_format

    return log_format()


_current = Context()


def _ctx() -> Context:
    """The global options of this invocation (the callback runs before every command)."""
    return _current


def _day(value: str | None) -> date | None:
    from chatsync.timeutil import parse_day

    return parse_day(value) if value is not None else None


def _sources(values: list[str] | None, api: str | None = None) -> tuple[str, ...]:
    """The sources named, spelt as Chatbase does; with ``api``, only those that API's filter knows."""
    from chatsync.sources import SOURCES, V1_SOURCES, V2_SOURCES, canonical_source

    known = {"v1": V1_SOURCES, "v2": V2_SOURCES}.get(api or "", SOURCES)
    return tuple(dict.fromkeys(canonical_source(v, known) for v in values or []))


def _window(since: date | None, until: date | None) -> None:
    if since and until and since > until:
        raise UsageError(f"--since {since} is after --until {until}")


# Options shared by several commands (one definition, stacked where used).
def _given_chatbots(values: list[str] | None) -> list[str] | None:
    """``--chatbot-id`` as given: an empty one is refused, not a filter that matches nothing."""
    if values and any(not value.strip() for value in values):
        raise typer.BadParameter("an empty id: give a chatbot id, or leave the option out")
    return values


ChatbotOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--chatbot-id",
        metavar="ID",
        help="Chatbot to use; repeatable [env CHATBASE_CHATBOT_ID].",
        callback=_given_chatbots,
    ),
]
SourceOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--source",
        metavar="NAME",
        help="Chatbase source (WhatsApp, 'Widget or Iframe', …); repeatable, any case.",
    ),
]
SinceOpt = Annotated[
    str | None, typer.Option("--since", metavar="DATE", help="First day, YYYY-MM-DD (inclusive).")
]
UntilOpt = Annotated[
    str | None, typer.Option("--until", metavar="DATE", help="Last day, YYYY-MM-DD (inclusive).")
]
RegionOpt = Annotated[
    str | None,
    typer.Option(
        "--region",
        metavar="REGION",
        help="Region of 8-digit numbers without country code [env CHATSYNC_DEFAULT_REGION; default HK].",
    ),
]


# ---------------------------------------------------------------------------------------------------- sync
@app.command(short_help="Fetch conversations from Chatbase and upsert them.")
@handle_errors_begun_by_command
def sync(
    chatbot_id: ChatbotOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    source: SourceOpt = None,
    lookback: Annotated[
        str | None,
        typer.Option(
            "--lookback",
            metavar="DURATION",
            help="Refetch what was created this long before the checkpoint [env CHATSYNC_LOOKBACK; default 3d].",
        ),
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="Ignore checkpoints and fetch the whole range again.")
    ] = False,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", metavar="KEY", help="Chatbase secret key [env CHATBASE_API_KEY].", show_default=False
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option("--base-url", metavar="URL", help="Chatbase API v1 root [env CHATBASE_BASE_URL]."),
    ] = None,
    api: Annotated[
        str | None,
        typer.Option(
            "--api",
            metavar="1|2",
            help="Chatbase API to read: 1 get-conversations, 2 the conversations export "
            "(timestamps, feedback, status; needs a plan with API v2) [env CHATBASE_API_VERSION; default 1].",
            show_default=False,
        ),
    ] = None,
    region: RegionOpt = None,
    retry_budget: Annotated[
        str | None,
        typer.Option(
            "--retry-budget",
            metavar="DURATION",
            help="Give up on an outage after this long [env CHATSYNC_RETRY_BUDGET; default 5m].",
        ),
    ] = None,
    concurrency: Annotated[
        str | None,
        typer.Option(
            "--concurrency",
            metavar="N",
            help="Requests in flight at once, 1 to 64 [env CHATSYNC_CONCURRENCY; default 8].",
        ),
    ] = None,
    all_chatbots: Annotated[
        bool,
        typer.Option(
            "--all-chatbots",
            help="Every chatbot the key can see (get-chatbots); hosts running this at once share them.",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the plan (days, windows, estimated requests); fetch and store nothing."
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run summary as one JSON line, also when the run fails.")
    ] = False,
) -> None:
    """Fetch conversations from Chatbase and upsert them (incremental after the first run)."""
    run = _SyncRun(list(chatbot_id or []), as_json)
    try:
        begin()  # a Ctrl-C or SIGTERM since start-up ends the run here, with its line (--json)
        settings = _ctx().settings(
            chatbot_ids=chatbot_id,
            api_key=api_key,
            base_url=base_url,
            api_version=api,
            region=region,
            lookback=lookback,
            retry_budget=retry_budget,
            concurrency=concurrency,
        )
        run.settings = settings
        if all_chatbots and chatbot_id:
            raise UsageError("give --all-chatbots or --chatbot-id, not both")
        with _fewer_collections():
            _sync(run, settings, since, until, source, full, dry_run, all_chatbots)
        _settle()  # it succeeded: a signal from here on does not make its line say otherwise
    except LockHeld as exc:
        run.error = exc
        if as_json:  # the previous run still going is no failure: its JSON line says so, stderr stays empty
            run.report()
            raise typer.Exit(int(ExitCode.LOCKED)) from None
        raise
    except BaseException as exc:
        run.error = exc
        raise
    finally:
        if not dry_run and not (as_json and isinstance(run.error, LockHeld)):
            run.report()
        elif dry_run and as_json and run.error is not None and not run.plan_printed:
            # one JSON object whatever happened, as a sync prints
            from chatsync import render

            error = {"status": "failed", "error": _one_line(run.error), "exit_code": _exit_code(run.error)}
            render.write_json_line({"dry_run": True, **error})


@dataclass
class _SyncRun:
    """One `chatsync sync`: its summary, how it ended, and where that is reported."""

    chatbots: list[str]
    as_json: bool
    settings: Any = None
    error: BaseException | None = None
    summary: Any = None  # the Syncer's SyncSummary, once there is one
    client_stats: Any = None  # the Chatbase client's, once there is one
    plan_printed: bool = False  # a dry run's plan is out (its error, if any, in it)
    begun: datetime = field(default_factory=lambda: datetime.now(UTC))  # for a run that ends before a sync

    def report(self) -> None:
        """The summary on stdout (one JSON line with --json, whatever happened), then the heartbeat."""
        _settle()  # how the run ended is what run.error says: no stop signal cuts the line short now
        with _signals_deferred():
            from chatsync import render
            from chatsync.sync import SyncSummary
            from chatsync.timeutil import iso_z, utcnow

        summary = self.summary or SyncSummary(chatbots=self.chatbots)
        if self.client_stats is not None:  # requests made before the sync began count too
            summary.requests = max(summary.requests, self.client_stats.requests)
            summary.retries = max(summary.retries, self.client_stats.retries)
        now = iso_z(utcnow())
        # when the command began: a wait for the database (or the first page) comes before the sync's start
        summary.started_at = min(filter(None, (summary.started_at, iso_z(self.begun))))
        summary.finished_at = summary.finished_at or now
        line = summary.as_dict()
        code = _exit_code(self.error)
        if self.error is not None:
            line["status"] = {int(ExitCode.PARTIAL): "partial", int(ExitCode.LOCKED): "skipped"}.get(
                code, "failed"
            )
            line.setdefault("synced", summary.synced)  # (also when it ended before any chatbot: [])
            line["error"] = _one_line(self.error)
            line["exit_code"] = code
        if self.as_json:
            render.write_json_line(line)
        elif code in (ExitCode.OK, ExitCode.PARTIAL) or (summary.refused and summary.synced):
            render.sync_summary(summary)  # (some chatbots refused: the others were synced, and this says so)
        settings = self.settings
        if settings is not None and settings.heartbeat_url is not None and code != ExitCode.LOCKED:
            from chatsync.heartbeat import ping

            ping(settings.heartbeat_url, ok=code == ExitCode.OK, body=render.json_line(line))
        if settings is not None and code not in (ExitCode.OK, ExitCode.LOCKED) and self.error is not None:
            from chatsync.logs import capture

            capture(self.error)


def _signals_deferred() -> AbstractContextManager[None]:
    """Hold SIGINT and SIGTERM for a block: an interrupt that lands inside an ``import`` leaves
    half-imported modules behind, and the run could then not even say how it ended. The signal is
    handled as soon as the block ends. Threads started inside the block keep them held for good, so the
    main thread is the one that takes them."""
    return held(signal.SIGINT, signal.SIGTERM)


def _exit_code(error: BaseException | None) -> int:
    if error is None or (isinstance(error, typer.Exit) and error.exit_code == 0):
        return ExitCode.OK
    if isinstance(error, ChatsyncError):
        return int(error.exit_code)
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, Terminated):
        return 143
    if isinstance(error, typer.Exit):
        return int(error.exit_code)
    return ExitCode.ERROR


def _one_line(error: BaseException) -> str:
    if isinstance(error, ChatsyncError):
        return str(error)
    stopped = stop_message(error)
    if stopped is not None:
        return stopped
    first = str(error).strip().splitlines()
    return f"unexpected {type(error).__name__}: {first[0] if first else ''}".strip()


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """Run a sync with the collector's young generation 20,000 objects deep, not 700.

    A sync decodes every page in this process too (ids and days for paging) and frees what it made by
    reference count, so a pass every 700 new objects only burns the CPU the writer needs: 0.6 of 8.6 CPU-s
    of this process at 20,000 conversations (median of 4 runs). Nothing is frozen (``gc.freeze`` kept a
    caller's uncollected garbage, an open SQLite transaction among it, for good), and the threshold is put
    back after, for whatever runs in the same process next.
    """
    previous = gc.get_threshold()
    gc.set_threshold(20_000, 20, 20)
    try:
        yield
    finally:
        gc.set_threshold(*previous)


def _sync(
    run: _SyncRun,
    settings: Any,
    since: str | None,
    until: str | None,
    source: list[str] | None,
    full: bool,
    dry_run: bool,
    all_chatbots: bool = False,
) -> None:
    with _signals_deferred():
        from chatsync import render
        from chatsync.chatbase import PageAhead, open_client
        from chatsync.logs import configure_sentry
        from chatsync.timeutil import utcnow

    configure_sentry(settings.sentry_dsn.reveal() if settings.sentry_dsn else None)
    start, end = _day(since), _day(until)
    _window(start, end)
    today = utcnow().date()
    if start is not None and start > today:
        # (a dry run once planned it: first day 2999-12-31, last day today, 0 days)
        raise UsageError(f"--since {start} is after today ({today}, UTC): nothing can be fetched yet")
    chatbot_ids = () if all_chatbots else settings.require_chatbot_ids()
    sources = _sources(source, settings.api_version)
    run.chatbots = list(chatbot_ids)
    settings.require_api_key()
    if not dry_run:
        from chatsync.worker_server import start_early

        start_early()  # the workers' fork server preloads on the other core while this process goes on
    with open_client(settings, max_connections=settings.concurrency * 2) as client:
        run.client_stats = client.stats
        with _signals_deferred():
            ahead = None
            if (
                chatbot_ids
                and not dry_run
                and not client.cursor_paged
                and (start or today) <= today <= (end or today)
            ):
                # every such run pages today from page 1: ask for it now, while the database is opened
                ahead = PageAhead(client, chatbot_ids[0], today, sources, utcnow)
            from chatsync.sync import Syncer, SyncRequest

        request = SyncRequest(
            chatbot_ids=chatbot_ids,
            since=start,
            until=end,
            sources=sources,
            lookback=settings.lookback,
            full=full,
            share=all_chatbots,
        )
        engine = _ctx().engine(settings, ride_out=not dry_run)
        if all_chatbots:
            found = tuple(bot.id for bot in client.list_chatbots())
            request = replace(request, chatbot_ids=found)
        with render.sync_progress(not run.as_json and not dry_run) as hook:
            syncer = Syncer(engine, client, settings.whatsapp, settings.concurrency, hook, ahead=ahead)
            run.summary = syncer.summary
            if dry_run:
                plans = syncer.plan(request)
                refusal = syncer.first_refusal()
                render.sync_plan(
                    [p.as_dict() for p in plans],
                    client.stats.requests,
                    run.as_json,
                    syncer.summary.refused,
                    None if refusal is None else (_one_line(refusal), _exit_code(refusal)),
                )
                run.plan_printed = True
                if refusal is not None:
                    raise refusal
                return
            syncer.run(request)


# ---------------------------------------------------------------------------------------- list, show, set
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        metavar="FORMAT",
        help="table, json, csv or ndjson [default: table on a terminal, else json].",
    ),
]


@app.command("list")
@handle_errors
def list_(
    chatbot_id: ChatbotOpt = None,
    source: SourceOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    has_whatsapp: Annotated[
        bool | None,
        typer.Option(
            "--has-whatsapp/--no-whatsapp",
            help="Only conversations with / without a number.",
            show_default=False,
        ),
    ] = None,
    number: Annotated[
        str | None,
        typer.Option(
            "--number", metavar="NUMBER", help="Conversations with this WhatsApp number, any format."
        ),
    ] = None,
    search: Annotated[
        str | None, typer.Option("--search", metavar="TEXT", help="Case-insensitive text in any message.")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", metavar="N", min=1, help="How many, newest first.  [default: 20]", show_default=False
        ),
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Stream every match.")] = False,
    output: FormatOpt = None,
    region: RegionOpt = None,
) -> None:
    """List stored conversations, newest first."""
    from chatsync import render
    from chatsync.store.queries import LIST_KEYS, ConversationFilter, iter_conversations
    from chatsync.whatsapp import lookup_number

    if all_ and limit is not None:
        raise UsageError("give --limit or --all, not both")
    limit = limit or LIST_LIMIT
    settings = _ctx().settings(region=region)
    fmt = _format(output, ("table", "json", "csv", "ndjson"))
    start, end = _day(since), _day(until)
    _window(start, end)
    filters = ConversationFilter(
        chatbot_ids=tuple(chatbot_id or ()),
        sources=_sources(source),
        since=start,
        until=end,
        has_whatsapp=has_whatsapp,
        number=lookup_number(number, settings.whatsapp) if number is not None else None,
        search=search or None,
    )
    engine = _ctx().engine(settings, create=False)
    found = iter_conversations(engine, filters, None if all_ else limit)
    written = 0

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal written
        for row in found:
            written += 1
            yield row

    if fmt == "table":
        render.conversations_table(rows())
    elif fmt == "json":
        render.write_json_array(rows())
    elif fmt == "ndjson":
        render.write_ndjson(rows())
    else:
        render.write_csv(rows(), LIST_KEYS)
    if not all_ and written == limit:  # (on stderr: what a script reads stays the rows alone)
        shown = "the newest match" if limit == 1 else f"the newest {limit} matches"
        render.info(f"{shown} (--limit {limit}); --all for every match")
    if not written:
        _say_if_nothing_synced(engine, settings)


@app.command(short_help="One conversation: transcript, number, audit trail.")
@handle_errors
def show(
    conversation_id: Annotated[str, typer.Argument(metavar="ID", help="Conversation id.")],
    output: Annotated[
        str | None,
        typer.Option("--format", metavar="FORMAT", help="table or json [default: table on a terminal]."),
    ] = None,
) -> None:
    """One conversation with its transcript and WhatsApp audit trail."""
    from chatsync import render
    from chatsync.store.queries import get_conversation

    fmt = _format(output, ("table", "json"))
    settings = _ctx().settings()
    with _ctx().engine(settings, create=False).connect() as connection:
        detail = get_conversation(connection, conversation_id, with_finding=fmt == "table")
    if fmt == "json":
        render.write_json(detail)
    else:
        render.conversation(detail)


@app.command("set-whatsapp", short_help="Set or clear a conversation's WhatsApp number by hand.")
@handle_errors
def set_whatsapp(
    conversation_id: Annotated[str, typer.Argument(metavar="ID", help="Conversation id.")],
    number: Annotated[
        str | None, typer.Argument(metavar="NUMBER", help="8 digits, optionally with country code.")
    ] = None,
    clear: Annotated[
        bool, typer.Option("--clear", help="The conversation has no number (kept by later syncs).")
    ] = False,
    auto: Annotated[
        bool, typer.Option("--auto", help="Forget the manual value; use what the other sources give.")
    ] = False,
    by: Annotated[
        str | None, typer.Option("--by", metavar="NAME", help="Who made the change [default: the OS user].")
    ] = None,
    region: RegionOpt = None,
) -> None:
    """Store a WhatsApp number on a conversation by hand; later syncs never overwrite it."""
    from chatsync import render
    from chatsync.store.queries import set_whatsapp as store_number
    from chatsync.timeutil import utcnow
    from chatsync.whatsapp import normalize_number

    if sum([number is not None, clear, auto]) != 1:
        raise UsageError("give exactly one of NUMBER, --clear or --auto")
    settings = _ctx().settings(region=region)
    e164 = normalize_number(number, settings.whatsapp) if number is not None else None
    with _ctx().engine(settings, create=False).begin() as connection:
        change = store_number(
            connection, conversation_id, number=e164, auto=auto, by=by or _os_user(), now=utcnow()
        )
    render.whatsapp_change(change)


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _format(value: str | None, allowed: tuple[str, ...]) -> str:
    if value is None:
        return "table" if sys.stdout.isatty() else "json"
    if value not in allowed:
        raise UsageError(f"invalid --format {value!r}: expected {' or '.join(allowed)}")
    return value


# ------------------------------------------------------------------------------------------------ whatsapp
@app.command("extract-test", short_help="Show how the WhatsApp rule reads a reply.")
@handle_errors
def extract_test(
    text: Annotated[
        str, typer.Argument(metavar="TEXT", help="A user's reply (or, with --prompt, a bot message).")
    ],
    prompt: Annotated[
        bool, typer.Option("--prompt", help="Say whether TEXT is the bot's WhatsApp prompt.")
    ] = False,
    region: RegionOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
) -> None:
    """Show how the WhatsApp rule reads a reply: each candidate and why it was accepted or rejected."""
    from chatsync import render
    from chatsync.whatsapp import extract_reply, is_prompt

    rule = _ctx().settings(region=region).whatsapp
    if prompt:
        verdict = is_prompt(text, rule)
        if as_json:
            render.write_json({"text": text, "is_prompt": verdict})
        else:
            render.line("this is the WhatsApp prompt" if verdict else "this is not the WhatsApp prompt")
        return
    result = extract_reply(text, rule)
    if as_json:
        render.write_json(
            {
                "text": text,
                "outcome": result.outcome,
                "number": result.number,
                "candidates": [
                    {"text": c.text, "start": c.start, "end": c.end, "number": c.e164, "rejected": c.reason}
                    for c in result.candidates
                ],
            }
        )
    else:
        render.extraction(text, result)


@app.command(short_help="Apply the WhatsApp rule again to stored conversations.")
@handle_errors
def reextract(
    chatbot_id: ChatbotOpt = None,
    region: RegionOpt = None,
) -> None:
    """Apply the WhatsApp rule again to stored conversations (after changing its settings); no fetching."""
    from chatsync import render
    from chatsync.reextract import count_conversations
    from chatsync.reextract import reextract as run

    settings = _ctx().settings(region=region)
    engine = _ctx().engine(settings, create=False)
    bots = tuple(chatbot_id or ())
    with render.progress("re-extracting", count_conversations(engine, bots)) as done:
        counts = run(engine, settings.whatsapp, bots, progress=lambda c: done(c.examined))
    render.info(
        f"examined {counts.examined:,} conversations: {counts.changed:,} findings changed, "
        f"{counts.numbers_changed:,} stored numbers changed (manual numbers kept)"
    )


# -------------------------------------------------------------------------------------------------- report
@app.command(short_help="Analytics over stored conversations.")
@handle_errors
def report(
    chatbot_id: ChatbotOpt = None,
    source: SourceOpt = None,
    since: Annotated[
        str | None,
        typer.Option("--since", metavar="DATE", help="First day in the report's time zone, YYYY-MM-DD."),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", metavar="DATE", help="Last day in the report's time zone, YYYY-MM-DD."),
    ] = None,
    tz: Annotated[
        str | None,
        typer.Option(
            "--tz",
            metavar="ZONE",
            help="Time zone for days and the weekday/hour grid [env CHATSYNC_TIMEZONE; default UTC].",
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option("--format", metavar="FORMAT", help="table or json [default: table on a terminal]."),
    ] = None,
) -> None:
    """Analytics over stored conversations, computed in the database."""
    from chatsync import render
    from chatsync.analytics import report as build_report
    from chatsync.store.queries import ConversationFilter

    fmt = _format(output, ("table", "json"))
    settings = _ctx().settings(timezone=tz)
    start, end = _day(since), _day(until)
    _window(start, end)
    filters = ConversationFilter(chatbot_ids=tuple(chatbot_id or ()), sources=_sources(source))
    engine = _ctx().engine(settings, create=False)
    with engine.connect() as connection:
        data = build_report(connection, filters, start, end, settings.timezone)
    if fmt == "json":
        render.write_json(data)
    else:
        render.report(data)
    if not data["conversations"]:
        _say_if_nothing_synced(engine, settings)


def _say_if_nothing_synced(engine: Any, settings: Any) -> None:
    """Nothing matched: if that is because the database holds no conversation at all, say which database
    it is and how to fill it (on stderr: a script's JSON stays as it is). After the demo, plain ``list``
    reads the default database, not the demo's file, and answered only "no conversations match"."""
    from chatsync import render
    from chatsync.config import mask_url
    from chatsync.store.queries import holds_conversations

    with engine.connect() as connection:
        if holds_conversations(connection):
            return
    render.info(
        f"no conversation is stored in {mask_url(settings.database_url)} yet: run chatsync sync, or give "
        "the database to read before the command (chatsync --database-url URL list; the demo's last line names its own)"
    )


# ------------------------------------------------------------------------------------------------ operating
@app.command(short_help="Per chatbot: last run, last good sync, quarantine.")
@handle_errors
def status(
    chatbot_id: ChatbotOpt = None,
    max_age: Annotated[
        str | None,
        typer.Option(
            "--max-age",
            metavar="DURATION",
            help="Exit 1 when a chatbot's last good sync is older than this (or missing), e.g. 2h.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Per chatbot: the last run and how it ended, when data was last fetched, what is quarantined."""
    from chatsync import render
    from chatsync.operations import chatbot_statuses
    from chatsync.timeutil import parse_duration, utcnow

    settings = _ctx().settings(chatbot_ids=chatbot_id)
    age = parse_duration(max_age) if max_age is not None else None
    now = utcnow()
    with _ctx().engine(settings, create=False).connect() as connection:
        statuses = chatbot_statuses(connection, settings.chatbot_ids, now, age)
    data = {"checked_at": now, "max_age_seconds": age.total_seconds() if age else None}
    render.status([s.as_dict(now) for s in statuses], data, as_json)
    stale = [s.chatbot_id for s in statuses if s.stale]
    if stale:
        render.error(f"last good sync older than {max_age} (or none) for: {', '.join(stale)}")
        raise typer.Exit(int(ExitCode.ERROR))


@app.command(short_help="Check the setup, one line per check.")
@handle_errors
def doctor(
    chatbot_id: ChatbotOpt = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", metavar="KEY", help="Chatbase secret key [env CHATBASE_API_KEY].", show_default=False
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option("--base-url", metavar="URL", help="Chatbase API root [env CHATBASE_BASE_URL]."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as one JSON object.")] = False,
) -> None:
    """Check the setup, one line each: database, key, chatbot ids (one size=1 request each), sync locks."""
    from chatsync import render
    from chatsync.operations import run_checks

    settings = _ctx().settings(chatbot_ids=chatbot_id, api_key=api_key, base_url=base_url)
    checks = run_checks(settings)
    render.checks(checks, as_json)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise typer.Exit(int(ExitCode.CONFIG if any(c.configuration for c in failed) else ExitCode.ERROR))


@config_app.command("show")
@handle_errors
def config_show(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Every setting, its value (secrets masked) and where it came from: flag, environment, .env, default."""
    from chatsync import render
    from chatsync.config import describe_settings

    rows = describe_settings(_ctx().settings())
    render.settings_table(
        [
            {
                "name": r.name,
                "variables": list(r.variables),
                "flag": r.flag,
                "value": r.value,
                "origin": r.origin.kind,
                "from": r.origin.variable,
            }
            for r in rows
        ],
        as_json,
    )


@quarantine_app.command("list")
@handle_errors
def quarantine_list(chatbot_id: ChatbotOpt = None, output: FormatOpt = None) -> None:
    """Quarantined records, most recently seen first, with their reasons."""
    from chatsync import render
    from chatsync.operations import QUARANTINE_KEYS, list_quarantined

    fmt = _format(output, ("table", "json", "csv", "ndjson"))
    with _ctx().engine(_ctx().settings(), create=False).connect() as connection:
        rows = list(list_quarantined(connection, tuple(chatbot_id or ())))
    if fmt == "table":
        render.quarantined(rows)
    elif fmt == "json":
        render.write_json_array(rows)
    elif fmt == "ndjson":
        render.write_ndjson(rows)
    else:
        render.write_csv(rows, QUARANTINE_KEYS)


@quarantine_app.command("show")
@handle_errors
def quarantine_show(
    quarantine_id: Annotated[int, typer.Argument(metavar="ID", help="The id `quarantine list` shows.")],
    output: Annotated[
        str | None,
        typer.Option("--format", metavar="FORMAT", help="table or json [default: table on a terminal]."),
    ] = None,
) -> None:
    """One quarantined record: why, when, and the JSON exactly as Chatbase sent it."""
    from chatsync import render
    from chatsync.operations import get_quarantined

    fmt = _format(output, ("table", "json"))
    with _ctx().engine(_ctx().settings(), create=False).connect() as connection:
        record = get_quarantined(connection, quarantine_id)
    if fmt == "json":
        render.write_json(record)
    else:
        render.quarantined_record(record)


@quarantine_app.command("retry")
@handle_errors
def quarantine_retry(
    quarantine_id: Annotated[
        list[int] | None, typer.Argument(metavar="[ID]...", help="Only these records [default: all].")
    ] = None,
    chatbot_id: ChatbotOpt = None,
    region: RegionOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as one JSON object.")] = False,
) -> None:
    """Normalise quarantined records again (after an upgrade fixed the cause) and store those that pass."""
    from dataclasses import asdict

    from chatsync import render
    from chatsync.operations import retry_quarantined

    settings = _ctx().settings(region=region)
    counts = retry_quarantined(
        _ctx().engine(settings, create=False),
        settings.whatsapp,
        tuple(chatbot_id or ()),
        tuple(quarantine_id or ()),
    )
    if as_json:
        render.write_json_line(asdict(counts))
    else:
        render.line(
            f"retried {counts.examined:,} quarantined record(s): {counts.stored:,} stored, "
            f"{counts.still_refused:,} still refused (reasons updated)"
        )
    if counts.skipped_chatbots:
        render.error(
            f"a sync is running for {', '.join(counts.skipped_chatbots)}; their records were not retried: "
            "run this again when it ends"
        )
        raise typer.Exit(int(ExitCode.LOCKED))


# ------------------------------------------------------------------------------------------------------ db
@db_app.command("upgrade")
@handle_errors
def db_upgrade() -> None:
    """Apply the schema migrations shipped with chatsync."""
    from chatsync import render
    from chatsync.config import mask_url
    from chatsync.store.engine import open_engine, upgrade

    settings = _ctx().settings()
    revision = upgrade(open_engine(settings.database_url))
    render.info(f"{mask_url(settings.database_url)} is at schema {revision}")


@db_app.command("info")
@handle_errors
def db_info(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show the database URL (password masked), schema revision and row counts."""
    from chatsync import render
    from chatsync.config import mask_url
    from chatsync.store.engine import current_revision, head_revision, table_counts

    settings = _ctx().settings()
    engine = _ctx().engine(settings, create=False)
    render.db_info(
        mask_url(settings.database_url),
        current_revision(engine),
        head_revision(),
        table_counts(engine),
        as_json,
    )


@db_app.command("rebuild-rollups")
@handle_errors
def db_rebuild_rollups() -> None:
    """Recompute the report's rollups from the stored conversations.

    Every chatsync write keeps them exact; run this after changing conversations with plain SQL.
    """
    from sqlalchemy import func, select

    from chatsync import render
    from chatsync.store.rollups import rebuild
    from chatsync.store.tables import conversations

    settings = _ctx().settings()
    engine = _ctx().engine(settings, create=False)
    with engine.connect() as connection:
        total = connection.execute(select(func.count()).select_from(conversations)).scalar_one()
    with render.progress("rebuilding rollups", total) as done, engine.begin() as connection:
        count = rebuild(connection, progress=done)
    render.info(f"rollups rebuilt from {count:,} conversations")


# ------------------------------------------------------------------------------------------------ emulator
@app.command(short_help="Serve the Chatbase-compatible emulator.")
@handle_errors
def emulator(
    host: Annotated[str, typer.Option(metavar="HOST", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on.")] = 8765,
    conversations: Annotated[int, typer.Option(metavar="N", help="Conversations per chatbot.")] = 5000,
    seed: Annotated[int, typer.Option(metavar="N", help="Same seed, same data.")] = 1,
    days: Annotated[
        float, typer.Option(metavar="DAYS", help="Spread conversations over this many days before now.")
    ] = 60,
    chatbot_id: Annotated[
        list[str] | None, typer.Option("--chatbot-id", metavar="ID", help="Chatbots served; repeatable.")
    ] = None,
    api_key: Annotated[
        str, typer.Option("--api-key", metavar="KEY", help="The only key accepted.")
    ] = "demo-key",
    latency_ms: Annotated[
        float, typer.Option("--latency-ms", metavar="MS", help="Added to every request.")
    ] = 0,
    rate_limit: Annotated[
        str, typer.Option("--rate-limit", metavar="N/SPAN", help="requests/span, or 'off'.")
    ] = "100/10s",
    fail_rate: Annotated[
        float, typer.Option("--fail-rate", metavar="SHARE", help="Share of requests answered 429/5xx.")
    ] = 0.0,
    slow_rate: Annotated[
        float, typer.Option("--slow-rate", metavar="SHARE", help="Share of requests answered slowly.")
    ] = 0.0,
    malformed_rate: Annotated[
        float,
        typer.Option("--malformed-rate", metavar="SHARE", help="Share of pages sent with a truncated body."),
    ] = 0.0,
    bad_records: Annotated[
        int, typer.Option("--bad-records", metavar="N", help="Conversations sent as broken records.")
    ] = 0,
    damaged_records: Annotated[
        int,
        typer.Option(
            "--damaged-records",
            metavar="N",
            help="Conversations sent with text no database holds (half an emoji, NUL).",
        ),
    ] = 0,
    v2_plan: Annotated[
        bool,
        typer.Option(
            "--v2-plan/--no-v2-plan", help="Whether the plan has API v2: without it v2 answers 403."
        ),
    ] = True,
) -> None:
    """Serve the Chatbase-compatible emulator for tests, demos and benchmarks."""
    from chatsync import render
    from chatsync.config import _parse_rate
    from chatsync.emulator import Emulator, Faults
    from chatsync.emulator.server import make_server

    limit = None if rate_limit.lower() in ("off", "none", "0") else _parse_rate(rate_limit)
    emu = Emulator(
        conversations=conversations,
        seed=seed,
        chatbot_ids=tuple(chatbot_id or ["demo-bot"]),
        api_key=api_key,
        days=days,
        latency_ms=latency_ms,
        rate_limit=limit,
        faults=Faults(fail_rate=fail_rate, slow_rate=slow_rate, malformed_rate=malformed_rate),
        bad_records=bad_records,
        damaged_records=damaged_records,
        v2_plan=v2_plan,
    )
    try:
        server = make_server(emu, host, port)
    except OSError as exc:  # the port is taken (an emulator left running), or the address is not ours
        raise UsageError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; another emulator may be running there: "
            "stop it, or give another --port"
        ) from None
    root = f"http://{server.server_address[0]!s}:{server.server_address[1]}/api"
    render.info(
        f"Chatbase emulator: chatbots {', '.join(emu.datasets)}, key {api_key!r}; Ctrl-C to stop. Point chatsync "
        "at it with the lines on stdout (in a shell, or in .env without 'export'; the last is API v2, sync --api 2)"
    )
    # on stdout, so `chatsync emulator … > emulator.env &` then `. ./emulator.env` sets them (quoted for a
    # shell where a value needs it: a key with `"` or `\\` once broke the sourcing)
    from shlex import quote

    print(
        f"export CHATBASE_API_KEY={quote(api_key)}\nexport CHATBASE_CHATBOT_ID={quote(','.join(emu.datasets))}\n"
        f"export CHATBASE_BASE_URL={root}/v1\nexport CHATBASE_API_URL={root}/v2",
        flush=True,
    )
    try:
        server.serve_forever()
    except (KeyboardInterrupt, Terminated):  # Ctrl-C or kill: how an emulator is meant to stop
        pass
    finally:
        server.server_close()


@app.command(short_help="The whole job, no account: emulator → SQLite → report.")
@handle_errors
def demo(
    conversations: Annotated[
        int, typer.Option(metavar="N", help="How many conversations the emulator serves.")
    ] = 3000,
    seed: Annotated[int, typer.Option(metavar="N", help="Same seed, same data.")] = 1,
    path: Annotated[
        str | None,
        typer.Option(
            "--path", metavar="FILE", help="SQLite file to create [default: demo.db in the data directory]."
        ),
    ] = None,
) -> None:
    """The whole job with no account and no network: emulator → fresh SQLite file → report."""
    from pathlib import Path

    from chatsync import render
    from chatsync.analytics import report as build_report
    from chatsync.chatbase import ChatbaseClient
    from chatsync.config import Secret, default_database_path, load_settings
    from chatsync.emulator import Emulator, serve_in_thread
    from chatsync.store.engine import ensure_schema, open_engine
    from chatsync.store.queries import ConversationFilter
    from chatsync.sync import Syncer, SyncRequest

    database = Path(path).expanduser() if path else default_database_path().with_name("demo.db")
    if path and database.exists():
        # Never replace a file the user named: it may be a real database (the default demo.db is ours).
        raise UsageError(f"{database} already exists: give --path a new file, or remove it first")
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where the folder should be, a read-only place, …
        raise DatabaseUnreachable(exc) from None
    for suffix in ("", "-wal", "-shm", "-journal"):  # the demo's own file and SQLite's companions, only
        database.with_name(database.name + suffix).unlink(missing_ok=True)
    url = f"sqlite:///{database}"
    engine = open_engine(url)
    ensure_schema(engine)
    settings = load_settings({"database_url": url})
    render.info(f"emulating Chatbase with {conversations:,} conversations; syncing into {database}")
    with (
        serve_in_thread(Emulator(conversations=conversations, seed=seed)) as server,
        ChatbaseClient(Secret("demo-key"), server.base_url) as client,
        render.sync_progress(True) as hook,
    ):
        summary = Syncer(engine, client, settings.whatsapp, settings.concurrency, hook).run(
            SyncRequest(("demo-bot",))
        )
    render.sync_summary(summary)
    with engine.connect() as connection:
        data = build_report(connection, ConversationFilter(), tz=settings.timezone)
    render.report(data)
    render.info(f"explore it: {_as_invoked()} --database-url {url} list --has-whatsapp", wrap=False)
    render.info(
        "then, with the same start: show ID (an id from that list), set-whatsapp ID NUMBER, "
        "report --since YYYY-MM-DD --until YYYY-MM-DD; --help lists every command"
    )


def _as_invoked() -> str:
    """How to run chatsync again as this run was started: ``chatsync`` when that is on PATH, else the path
    it was started by (``.venv/bin/chatsync`` of the README's demo command), else ``python -m chatsync``."""
    import shlex
    import shutil
    from pathlib import Path

    started = Path(sys.argv[0])
    on_path = shutil.which("chatsync")
    if on_path and started.name == "chatsync" and Path(on_path).resolve() == started.resolve():
        return "chatsync"
    if started.name == "chatsync":
        return shlex.quote(sys.argv[0])
    return f"{shlex.quote(sys.executable)} -m chatsync"


# ---------------------------------------------------------------------------------------------- HTTP API
@app.command(short_help="Serve the HTTP API for the frontend.")
@handle_errors
def serve(
    host: Annotated[str, typer.Option(metavar="HOST", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on.")] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, metavar="N", help="Worker processes (one per core is a good start).")
    ] = 1,
    log_format: Annotated[
        str | None,
        typer.Option(
            "--log-format", metavar="FORMAT", help="text or json [env CHATSYNC_LOG_FORMAT; default text]."
        ),
    ] = None,
) -> None:
    """Serve the HTTP API for the frontend (needs the api extra and CLERK_* settings)."""
    try:
        import uvicorn

        from chatsync.logs import configure_sentry
        from chatsync.store.engine import ensure_schema, open_engine
        from chatsync.web.app import WORKER_THREADS, create_app
        from chatsync.web.auth import ClerkSettings
        from chatsync.web.logs import configure_logging
    except ImportError:
        raise UsageError(
            "the HTTP API needs the api extra: pip install 'chatbase-sync[api]', or from a checkout pip install '.[api]'"
        ) from None
    settings = _ctx().settings(log_format=log_format)
    ClerkSettings.from_settings(settings)  # refuse to start without the Clerk settings
    engine = open_engine(settings.database_url, pool_size=WORKER_THREADS)
    ensure_schema(engine)  # refuse to start on an unreachable or too-new database
    debug = _ctx().debug
    configure_logging(settings.log_format, debug)
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": None,  # our handler: every line with its request id
        "log_level": "debug" if debug else "info",
        "access_log": False,  # our access line leaves out query values (numbers, search text)
        "proxy_headers": True,
        "timeout_graceful_shutdown": 5,  # event streams never end by themselves
    }
    if workers > 1:  # each worker process builds its own app from the same settings
        for variable, flag in (
            ("CHATSYNC_DATABASE_URL", _ctx().database_url),
            ("CHATSYNC_LOG_FORMAT", log_format),
        ):
            if flag:
                os.environ[variable] = flag
        os.environ["CHATSYNC_SERVE_DEBUG"] = "1" if debug else "0"
        app: Any = "chatsync.web.app:app_from_env"
        options.update(factory=True, workers=workers)
    else:
        configure_sentry(settings.sentry_dsn.reveal() if settings.sentry_dsn else None)
        app = create_app(engine, settings)
    try:
        uvicorn.run(app, **options)
    except Terminated:
        # uvicorn shut down gracefully on SIGTERM, then raised the signal again for whoever handles it:
        # for a server that is how it is meant to stop (systemd, docker stop), not a failure
        return


def _principal(user: str | None, org: str | None) -> tuple[str, str]:
    if (user is None) == (org is None):
        raise UsageError("give exactly one of --user USER_ID or --org ORG_ID")
    principal = user if user is not None else org or ""
    if not principal or len(principal) > 64 or any(not c.isprintable() for c in principal):
        raise UsageError(f"invalid Clerk id {principal[:40]!r}: expected up to 64 printable characters")
    return ("user", principal) if user is not None else ("org", principal)


@access_app.command("grant")
@handle_errors
def access_grant(
    chatbot_id: Annotated[str, typer.Argument(metavar="CHATBOT_ID")],
    user: Annotated[str | None, typer.Option("--user", metavar="USER_ID", help="Clerk user id.")] = None,
    org: Annotated[str | None, typer.Option("--org", metavar="ORG_ID", help="Clerk organization id.")] = None,
) -> None:
    """Let a Clerk user, or everyone in a Clerk organization, see a chatbot's conversations."""
    from chatsync import render
    from chatsync.config import chatbot_id as checked_chatbot_id
    from chatsync.store.access import grant
    from chatsync.timeutil import utcnow

    kind, principal = _principal(user, org)
    with _ctx().engine(_ctx().settings()).begin() as connection:
        added = grant(connection, checked_chatbot_id(chatbot_id), kind, principal, utcnow())
    render.info(f"{kind} {principal} {'may now see' if added else 'could already see'} chatbot {chatbot_id}")


@access_app.command("revoke")
@handle_errors
def access_revoke(
    chatbot_id: Annotated[str, typer.Argument(metavar="CHATBOT_ID")],
    user: Annotated[str | None, typer.Option("--user", metavar="USER_ID", help="Clerk user id.")] = None,
    org: Annotated[str | None, typer.Option("--org", metavar="ORG_ID", help="Clerk organization id.")] = None,
) -> None:
    """Take a chatbot away from a Clerk user or organization."""
    from chatsync import render
    from chatsync.store.access import revoke

    kind, principal = _principal(user, org)
    with _ctx().engine(_ctx().settings(), create=False).begin() as connection:
        removed = revoke(connection, chatbot_id, kind, principal)
    render.info(
        f"{kind} {principal} {'no longer sees' if removed else 'had no grant for'} chatbot {chatbot_id}"
    )


@access_app.command("list")
@handle_errors
def access_list(
    output: Annotated[str | None, typer.Option("--format", metavar="FORMAT", help="table or json.")] = None,
) -> None:
    """Every grant: chatbot, user or organization, since when."""
    from chatsync import render
    from chatsync.store.access import list_grants

    fmt = _format(output, ("table", "json"))
    with _ctx().engine(_ctx().settings(), create=False).connect() as connection:
        grants = [{**g, "granted_at": iso_z_text(g["granted_at"])} for g in list_grants(connection)]
    if fmt == "json":
        render.write_json(grants)
    else:
        render.grants(grants)


def iso_z_text(moment: Any) -> str | None:
    from chatsync.timeutil import as_utc, iso_z

    return iso_z(as_utc(moment)) if moment else None


@users_app.command("sync")
@handle_errors
def users_sync() -> None:
    """Backfill users from Clerk's Backend API (CLERK_SECRET_KEY) with the webhook's upsert."""
    from chatsync import render
    from chatsync.clerk import fetch_clerk_users
    from chatsync.errors import ConfigError
    from chatsync.store.users import upsert_user

    settings = _ctx().settings()
    if not settings.clerk_secret_key:
        raise ConfigError("CLERK_SECRET_KEY is not set: export it or put it in .env")
    engine = _ctx().engine(settings)
    users = fetch_clerk_users(settings.clerk_secret_key, settings.clerk_api_url)
    seen = written = 0
    while batch := list(itertools.islice(users, 500)):  # one transaction per page of Clerk users
        with engine.begin() as connection:
            written += sum(1 for user in batch if upsert_user(connection, user))
        seen += len(batch)
    render.info(f"{seen:,} Clerk users read, {written:,} stored or updated")


@leads_app.command("sync")
@handle_errors
def leads_sync(chatbot_id: ChatbotOpt = None, since: SinceOpt = None, until: UntilOpt = None) -> None:
    """Backfill lead forms from Chatbase's get-leads for the report's lead count; running it again stores
    nothing twice. (get-leads names no conversation: only the webhook gives a conversation a lead's number.)"""
    from chatsync import render
    from chatsync.chatbase import ChatbaseClient
    from chatsync.leads import backfill_leads

    settings = _ctx().settings(chatbot_ids=chatbot_id)
    start, end = _day(since), _day(until)
    _window(start, end)
    bots = settings.require_chatbot_ids()
    key = settings.require_api_key()
    engine = _ctx().engine(settings)
    with (
        ChatbaseClient(
            key,
            settings.base_url,
            rate_limit=(settings.rate_limit_requests, settings.rate_limit_seconds),
            retry_budget=settings.retry_budget,
        ) as client,
        render.progress("reading leads", None) as done,
    ):
        found = backfill_leads(engine, client, bots, settings.whatsapp, start, end, lambda p: done(p.read))
    for bot, counts in found.items():
        render.info(
            f"chatbot {bot}: {counts.stored:,} leads stored, {counts.merged:,} already received by webhook, "
            f"{counts.unchanged:,} already stored"
            + (f", {len(counts.skipped):,} unreadable rows skipped" if counts.skipped else "")
        )


def main() -> None:
    """Run the command line (``sys.argv``) and exit with the contract's code. The ``chatsync`` command enters
    through :func:`chatsync.__main__.main`, which holds Ctrl-C and SIGTERM before this module loads; they are
    taken as the command begins (:func:`handle_errors`), or at the end if none did (``--help``). The first
    stop decides how the command ends; later ones, and any after the command's outcome is decided, do
    nothing (:func:`chatsync.signals.deferrable`)."""
    import gc

    if os.environ.get("NO_COLOR"):
        os.environ.setdefault("TERM", "dumb")
    for argument in sys.argv[1:]:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 arrive as lone surrogates
            shown = argument.encode("utf-8", "surrogateescape")
            print(f"error: an argument is not valid UTF-8: {shown!r}", file=sys.stderr)
            sys.exit(int(ExitCode.USAGE))
    # Both wait while a block holds them (chatsync.signals.held), whichever thread the signal reached.
    # (Already held at the OS level since chatsync.__main__ began, if it did: none is lost meanwhile.)
    global _stop_handlers_installed
    signals.hold_start(signal.SIGINT, signal.SIGTERM)  # (held already when chatsync.__main__ came first)
    signal.signal(signal.SIGTERM, deferrable(_terminate, _stop_at_once))
    signal.signal(signal.SIGINT, deferrable(signal.default_int_handler, _stop_at_once))
    _stop_handlers_installed = True
    try:
        try:
            # not standalone: a command line Typer refuses comes back here, to be told in one line
            code = app(prog_name="chatsync", standalone_mode=False)
            sys.exit(code if isinstance(code, int) else 0)  # (a command's typer.Exit comes back as its code)
        except Exception as exc:
            exit_code = getattr(exc, "exit_code", None)
            if not (hasattr(exc, "format_message") and isinstance(exit_code, int)):
                raise
            # (Typer carries its own copy of Click, whose exceptions are no importable names: these are
            # the Click exceptions, which say what was wrong and exit with their code; 2 for bad usage)
            if exit_code == ExitCode.USAGE and type(exc).__name__ != "NoArgsIsHelpError":  # (its help)
                print(f"error: {_usage_message(exc)}", file=sys.stderr)
                _usage_error_line(exc)
            else:
                exc.show()  # type: ignore[attr-defined]
            sys.exit(exit_code)
        except typer.Abort:
            print("Aborted!", file=sys.stderr)
            sys.exit(1)
        except SystemExit as ended:
            # Click ends a write to a closed pipe outside any command (--help | true) with exit 1, after
            # wrapping stdout to keep the interpreter's last flush quiet: as a command does, end with 141
            if ended.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
                sys.exit(141)
            raise
        finally:
            begin()  # no command began (--help, a usage error): a signal held meanwhile is taken now
            _settle()
    except KeyboardInterrupt:  # before a command took over (a command says how it ended itself)
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        sys.exit(143)
    finally:
        if "chatsync.store.engine" in sys.modules:
            from chatsync.store.engine import close_engines

            close_engines()  # SQLite's write-ahead log goes into the database file now, not at collection
        # Everything else the command made dies with the process: without this Python's collections at
        # exit walk all of it (0.15 s after a sync, measured), which every cron run and script waits for.
        gc.freeze()
        # The command has ended, and said how. Python puts the default action back on its handlers' signals
        # as it shuts down, so a stop arriving now would kill a run that succeeded (a helper saw SIGTERM
        # 10-30 ms after an "ok" line end 3 of 10 syncs with -15); ignored signals stay ignored.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _usage_message(refused: Any) -> str:
    """Typer's refusal of a command line as chatsync's one line: what was wrong, then where help is (Typer
    itself prints its usage, a hint and the error on four lines). A global option given after the command
    (``chatsync sync --database-url …``) says where it goes instead of suggesting a look-alike option."""
    message = " ".join(line.strip() for line in refused.format_message().strip().splitlines() if line.strip())
    context = getattr(refused, "ctx", None)
    if context is None:
        return message
    option = getattr(refused, "option_name", None)
    root = context.find_root()
    if option and context is not root:
        for param in root.command.params:
            if option in param.opts:
                flag = getattr(param, "is_flag", False) or getattr(param, "count", False)
                value = "" if flag else f" {param.metavar or (param.name or 'value').upper()}"
                command = context.command_path[len(root.command_path) :].strip()  # "sync", "db info"
                return f"{option} goes before the command: chatsync {option}{value} {command} …"
    return f"{message} (see '{context.command_path} --help')"


def _usage_error_line(refused: Any) -> None:
    """``sync --json`` that Typer refused before the command began (an unknown option, a missing value):
    its one JSON line all the same, so a cron log holds a line for every run. ``refused`` is the Click
    exception (exit code 2) that says what was wrong."""
    arguments = sys.argv[1:]
    context = getattr(refused, "ctx", None)  # the command whose command line was refused
    command = getattr(getattr(context, "command", None), "name", None) or _first_command(arguments)
    if not (command == "sync" and "--json" in arguments):
        return
    refusal = UsageError(_usage_message(refused))  # (the words stderr has)
    _SyncRun(chatbots=[], as_json=True, error=refusal).report()


def _first_command(arguments: list[str]) -> str | None:
    """The first of chatsync's command names among ``arguments`` (for a usage error that names none)."""
    from typer.main import get_command_name

    names = {c.name or get_command_name(c.callback.__name__) for c in app.registered_commands if c.callback}
    names |= {g.name for g in app.registered_groups if g.name}
    return next((argument for argument in arguments if argument in names), None)


_stop_handlers_installed = False  # by main(): this process is a chatsync command, not a host running one


def _settle() -> None:
    """The command's outcome is decided: chatsync's stop handlers, where main() installed them, do nothing
    from now on (:func:`chatsync.signals.settle`). A command run inside another program (tests, Typer's
    runner) leaves that program's handlers alone."""
    if _stop_handlers_installed:
        signals.settle()


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def _stop_at_once(signum: int) -> None:
    """A second Ctrl-C or SIGTERM while the command is still ending after the first: end the process now,
    as SIGKILL would (what was committed is kept; a sync's lock goes with the process, and the next run
    continues where the last commit left off), with the exit code of the signal."""
    os.write(2, b"error: stopped at once (signalled again while ending); what was committed is kept\n")
    os._exit(128 + signum)


if __name__ == "__main__":  # pragma: no cover
    main()
