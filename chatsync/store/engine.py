"""Opening the database and keeping its schema current (Alembic, shipped inside the package)."""

from __future__ import annotations

import functools
import json
import logging
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from chatsync.config import normalize_database_url
from chatsync.errors import ConfigError, DatabaseUnavailable, DatabaseUnreachable, SchemaTooNew, Terminated

log = logging.getLogger("chatsync.store")
T = TypeVar("T")
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# Compact UTF-8 JSON: the default escapes every CJK character, which is slower and stores more bytes.
_JSON = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))
POOLER_PORTS = (6543, 6432)
CONNECT_TIMEOUT = 10  # seconds for a PostgreSQL connection, unless the URL says (?connect_timeout=N)
_UPGRADE_LOCK = 0x63686174_73796E63  # "chatsync": serialises concurrent upgrades on PostgreSQL


_OPENED: weakref.WeakSet[Engine] = weakref.WeakSet()  # every engine open_engine made that is still alive


def close_engines() -> None:
    """Close the pooled connections of every engine still alive, so SQLite folds its write-ahead log
    into the database file, as it does when its last connection closes. A command calls this before it
    exits, as the process's end would otherwise leave that to garbage collection."""
    for engine in list(_OPENED):
        engine.dispose()


def open_engine(url: str, pool_size: int | None = None, create: bool = True) -> Engine:
    """An engine for a SQLite path/URL or a PostgreSQL URL (Supabase URLs work as given).

    ``pool_size``: PostgreSQL connections kept open (no overflow), for a server that knows how many
    threads use the database at once; by default SQLAlchemy's 5, plus 10 opened and closed on demand.
    ``create``: make a SQLite file's folder (and so the file) when missing; without it a missing file is
    DatabaseUnreachable (``doctor`` checks and never creates). ``~`` in a SQLite path is the home folder.
    """
    url = normalize_database_url(url)
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError(
            "invalid database URL: expected sqlite:///path or postgresql://user@host/db"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            path = Path(database).expanduser()
            parsed = parsed.set(database=str(path))
            if create:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:  # a file where the folder should be, a read-only place, …
                    raise DatabaseUnreachable(exc) from None
            elif not path.is_file():
                raise DatabaseUnreachable(
                    FileNotFoundError(
                        f"no database file at {path}: check the URL, or run chatsync sync to make one"
                    )
                )
        engine = create_engine(
            parsed, connect_args={"timeout": 30}, json_serializer=_JSON, hide_parameters=True
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "handle_error", _stop_kept)
        _OPENED.add(engine)
        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        # hide_parameters: an error names the statement, never the values (messages, numbers, emails)
        kwargs: dict[str, Any] = {"pool_pre_ping": True, "json_serializer": _JSON, "hide_parameters": True}
        if pool_size is not None:
            kwargs.update(pool_size=pool_size, max_overflow=0)
        # A transaction pooler cannot keep prepared statements or our pool: Supabase's (port 6543),
        # PgBouncer's default port (6432), or any pooler named with ?pgbouncer=true.
        if parsed.port in POOLER_PORTS or parsed.query.get("pgbouncer") == "true":
            parsed = parsed.difference_update_query(["pgbouncer"])
            kwargs = {
                "poolclass": NullPool,
                "connect_args": {"prepare_threshold": None},
                "json_serializer": _JSON,
                "hide_parameters": True,
            }
        if "connect_timeout" not in parsed.query:
            # libpq waits for the system's TCP timeout (130 s here) on a server that never answers: a
            # sync waiting for its database within the retry budget must get an answer sooner
            kwargs["connect_args"] = {**kwargs.get("connect_args", {}), "connect_timeout": CONNECT_TIMEOUT}
        try:
            engine = create_engine(parsed, **kwargs)
        except ModuleNotFoundError:
            raise ConfigError(
                "PostgreSQL needs psycopg 3: pip install 'chatbase-sync[postgres]', or from a checkout pip install '.[postgres]'"
            ) from None
        event.listen(engine, "handle_error", _without_row_values)
        event.listen(engine, "handle_error", _stop_kept)
        _OPENED.add(engine)
        return engine
    raise ConfigError(f"unsupported database {parsed.get_backend_name()!r}: use SQLite or PostgreSQL")


_DETAIL = re.compile(r"\nDETAIL:[^\n]*")


def _without_row_values(context: ExceptionContext) -> None:
    """Drop PostgreSQL's ``DETAIL`` line from a database error: it can quote the failing row ("Failing row
    contains (…)", "Key (email)=(…)"), so a lead's name or a message would reach the logs, a 500's report
    and Sentry. The error's class, SQLSTATE and ``diag`` are unchanged; hide_parameters keeps the values
    SQLAlchemy would add."""
    for error in (context.original_exception, context.sqlalchemy_exception):
        if (
            error is not None
            and error.args
            and isinstance(error.args[0], str)
            and "\nDETAIL:" in error.args[0]
        ):
            error.args = (_DETAIL.sub("", error.args[0]), *error.args[1:])


def _stop_kept(context: ExceptionContext) -> BaseException | None:
    """A Ctrl-C or SIGTERM (:class:`~chatsync.errors.Terminated`) that lands inside the driver can be
    replaced by the error of its own clean-up: SQLAlchemy's pre-ping on PostgreSQL, stopped inside its
    ``SELECT 1``, sets ``autocommit`` back in a ``finally`` and gets "can't change 'autocommit' now:
    connection in transaction status ACTIVE". The run then ended as "the database went away" (exit 3)
    and was recorded so, not as stopped (130/143). Returns the stop for SQLAlchemy to raise in that
    error's place, with the connection (in an unknown state mid-protocol) thrown away, not pooled.
    Every other error passes unchanged (None)."""
    error: BaseException | None = context.original_exception
    seen = 0
    while error is not None and seen < 16:  # (a chain is short; the bound only guards against a cycle)
        if isinstance(error, (KeyboardInterrupt, Terminated)):
            context.is_disconnect = True
            context.invalidate_pool_on_disconnect = False  # the other pooled connections are fine
            return error
        error = error.__context__
        seen += 1
    return None


def _casefold(value: object) -> str | None:
    return value.casefold() if isinstance(value, str) else None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # case-insensitive search in every script (SQLite's own lower() folds ASCII only)
    dbapi_connection.create_function("chatsync_casefold", 1, _casefold, deterministic=True)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    if _ours_or_new(cursor):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            _into_wal_when_free(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _ours_or_new(cursor: Any) -> bool:
    """Whether a SQLite file is chatsync's (or new) and may be put in WAL: the switch persists in the
    file, and another application's, which chatsync then refuses to touch, was once left in WAL."""
    names = {row[0] for row in cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return not names or {"alembic_version", "conversations", "sync_runs"} <= names


def _into_wal_when_free(cursor: Any) -> None:
    """Switch a new SQLite file to WAL while other connections open it too.

    The switch needs the file to itself, and SQLite answers "database is locked" at once, without
    waiting out the busy timeout, when another connection is making the same switch: first runs started
    together (cron and a person, or a service's workers) saw it. Retried here for up to the busy
    timeout; a file already in WAL never gets here.
    """
    from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

    @retry(
        retry=retry_if_exception(
            lambda exc: isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
        ),
        wait=wait_random_exponential(multiplier=0.01, max=0.5),
        stop=stop_after_delay(30),
        reraise=True,
    )
    def switch() -> None:
        cursor.execute("PRAGMA journal_mode=WAL")

    switch()


def _alembic_config(connection: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    config = _alembic_config(None)
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


# The newest migration under migrations/versions (a test keeps the two equal). Knowing it without loading
# Alembic lets a command on an up-to-date database skip Alembic's ~0.3 s of imports.
HEAD_REVISION = "0008"

# Alembic's version table, as Alembic itself creates it (alembic.runtime.migration), for create_schema.
_ALEMBIC_VERSION = Table(
    "alembic_version",
    MetaData(),
    Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


def current_revision(engine: Engine) -> str | None:
    """The revision the database was migrated to (``alembic_version``), None before the first upgrade."""
    from sqlalchemy import inspect

    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        versions = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return versions[0] if len(versions) == 1 else None


def known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory.from_config(_alembic_config(None)).walk_revisions()}


def upgrade(engine: Engine) -> str:
    """Apply every migration not yet applied; refuse a schema newer than this code."""
    from alembic import command

    with engine.begin() as connection:
        # One upgrade at a time (cron's sync and the API started together after an upgrade of chatsync):
        # the others wait here, then find the schema current. SQLite: its write lock, taken before the
        # revision is read.
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _UPGRADE_LOCK})
        else:
            lock_for_writing(connection)
        from alembic.runtime.migration import MigrationContext

        found = MigrationContext.configure(connection).get_current_revision()
        if found is not None and found not in known_revisions():
            raise SchemaTooNew(found, head_revision())
        if found is None:
            refuse_foreign_tables(connection)
        if found != head_revision():
            command.upgrade(_alembic_config(connection), "head")
    return head_revision()


def ensure_schema(engine: Engine) -> None:
    """Bring the schema to this code's head on first use; cheap when it already is. DatabaseUnreachable
    when the database cannot be read (its ``down`` says whether trying again may help)."""
    try:
        found = current_revision(engine)
    except Exception as exc:
        raise DatabaseUnreachable(exc, down=is_down(exc), advice=_file_advice(exc)) from None
    if found == HEAD_REVISION:
        return
    try:
        if found is None and create_schema(engine):
            return
        if found is not None and found not in known_revisions():
            raise SchemaTooNew(found, head_revision())
        upgrade(engine)
    except DBAPIError as exc:
        if is_down(exc):  # (lost as the schema was made: a sync waits, and the next try finds it made or not)
            raise DatabaseUnreachable(exc, down=True) from None
        if not sqlite_file_failed(exc):
            raise
        raise DatabaseUnreachable(exc, advice=sqlite_file_advice(exc)) from None


SQLITE_FILE_ADVICE = "check the free space and permissions where its file is"
SQLITE_DAMAGED_ADVICE = (
    "the file is damaged: check it with PRAGMA integrity_check and restore it from a backup"
)


def sqlite_error_name(exc: BaseException) -> str | None:
    """SQLite's own name for the error behind ``exc`` (``SQLITE_FULL``, ``SQLITE_IOERR_WRITE``…), or None
    for an error that is not SQLite's."""
    return getattr(getattr(exc, "orig", exc), "sqlite_errorname", None)


def sqlite_file_advice(exc: BaseException) -> str:
    """What to do about SQLite failing its file (:func:`sqlite_file_failed`)."""
    name = sqlite_error_name(exc) or ""
    return (
        SQLITE_DAMAGED_ADVICE if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) else SQLITE_FILE_ADVICE
    )


# SQLSTATE classes of PostgreSQL failing a statement for a reason of its own, whatever rows it wrote:
# syntax or access (42: no privilege, no such table), resources (53: disk full, out of memory), system
# (58: I/O), internal (XX: data corrupted). Not a row's fault: quarantining the rows would be wrong.
_DATABASE_STATES = frozenset({"42", "53", "58", "XX"})


def fails_every_row(exc: BaseException) -> bool:
    """Whether a statement's error is the database's, not the rows it wrote (which a writer saves one by
    one, quarantining those refused): SQLite failing its file, or PostgreSQL's :data:`_DATABASE_STATES`."""
    if sqlite_file_failed(exc):
        return True
    state = getattr(getattr(exc, "orig", exc), "sqlstate", None)
    return state is not None and state[:2] in _DATABASE_STATES


def sqlite_file_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite failing to use its file (a full disk, a file-size limit, an I/O error,
    no permission to write, a damaged file), by SQLite's own error name: not one another program's lock
    (busy, locked), which passes, nor a statement or a row it refused."""
    name = sqlite_error_name(exc)
    return name is not None and name.startswith(_SQLITE_FILE_ERRORS)


# SQLite's primary result codes (and their extended codes, which start with them) that are about the file.
_SQLITE_FILE_ERRORS = (
    "SQLITE_FULL",
    "SQLITE_IOERR",
    "SQLITE_READONLY",
    "SQLITE_CANTOPEN",
    "SQLITE_CORRUPT",
    "SQLITE_NOTADB",
    "SQLITE_PERM",
)


def _file_advice(exc: BaseException) -> str | None:
    return sqlite_file_advice(exc) if sqlite_file_failed(exc) else None


# What a PostgreSQL server says when it turns connections away for now (libpq's FATAL lines carry no
# SQLSTATE for psycopg): starting up, shutting down, in recovery, out of connection slots. In English:
# a server set to another language (lc_messages) is taken as refusing, and the sync fails at once.
_PASSING = re.compile(
    r"FATAL:\s+(the database system is (starting up|shutting down|in recovery mode|not yet accepting)|"
    r"sorry, too many clients|remaining connection slots|terminating connection due to administrator)"
)


# SQLSTATEs of a server going away or turning connections away for now, besides class 08 (connection
# exceptions): shut down by an administrator, crashed, starting up, an idle session closed, too many
# connections. Not the rest of classes 53 and 57: a statement timeout (57014) or a full disk (53100) is
# not an outage to wait out, and would come back on every try.
_PASSING_STATES = frozenset({"57P01", "57P02", "57P03", "57P05", "53300"})


def is_down(exc: BaseException) -> bool:
    """Whether a PostgreSQL server could not be reached or is not taking connections for now: no answer,
    a restart, a failover, too many connections (SQLSTATE class 08 and :data:`_PASSING_STATES`), as
    opposed to a server that answered and refused chatsync (a wrong password, no such database or role)
    or a statement it failed. SQLite: never."""
    original = getattr(exc, "orig", None)
    if not isinstance(exc, OperationalError) or not type(original).__module__.startswith("psycopg"):
        return False
    state = getattr(original, "sqlstate", None)
    if state is not None:
        return state[:2] == "08" or state in _PASSING_STATES
    message = str(original)
    return "FATAL:" not in message or _PASSING.search(message) is not None


def ride_out(
    action: Callable[[], T],
    budget: float,
    *,
    down: Callable[[BaseException], bool],
    warn: Callable[[BaseException], None],
    stop: threading.Event | None = None,
) -> T:
    """``action()``, tried again while it fails with an exception ``down`` says is a database down for now,
    for up to ``budget`` seconds from the first try (the retry budget); ``warn`` is told of the first
    failure. Backoff 0.5 s doubling to 10 s, plus up to 0.5 s of jitter, the last wait cut so that the
    last try comes as the budget ends. Raises the last failure when the budget is spent or ``stop`` is set
    (then without waiting out the backoff), any other exception at once, and a stop (Ctrl-C, SIGTERM)
    during a wait as it comes."""
    from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential, wait_random

    backoff = wait_exponential(multiplier=0.5, max=10.0) + wait_random(0, 0.5)

    def wait(state: RetryCallState) -> float:
        return max(0.0, min(backoff(state), budget - (state.seconds_since_start or 0.0)))

    def stopped(state: RetryCallState) -> bool:
        return (state.seconds_since_start or 0.0) >= budget or (stop is not None and stop.is_set())

    def tell(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if state.attempt_number == 1 and error is not None:
            warn(error)

    def sleep(seconds: float) -> None:
        if stop is None:
            time.sleep(seconds)
        else:
            stop.wait(seconds)  # (a stop of the run ends the wait: the next check gives up)

    retrying = Retrying(
        retry=retry_if_exception(down),
        stop=stopped,
        wait=wait,
        before_sleep=tell,
        sleep=sleep,
        reraise=True,
    )
    return retrying(action)


def ensure_schema_riding_out(engine: Engine, budget: float) -> None:
    """:func:`ensure_schema` for a sync from cron: a database that is down (:func:`is_down`) is tried
    again, with a warning at its first failure, for up to ``budget`` seconds (the retry budget). Then
    DatabaseUnavailable (exit 3: nothing was written, the next run starts where the last one ended).
    A database that refuses chatsync fails at once."""

    def warn(error: BaseException) -> None:
        log.warning(
            "the database is unreachable (%s): trying again for up to %.0f s, the retry budget",
            getattr(error, "first_line", error),
            budget,
        )

    started = time.monotonic()
    try:
        ride_out(
            lambda: ensure_schema(engine),
            budget,
            down=lambda exc: isinstance(exc, DatabaseUnreachable) and exc.down,
            warn=warn,
        )
    except DatabaseUnreachable as exc:
        if not exc.down:
            raise
        raise DatabaseUnavailable(
            f"the database stayed unreachable for {time.monotonic() - started:.0f} s (retry budget "
            f"{budget:.0f} s; last: {exc.first_line}); nothing was written, and the next run starts where "
            "the last one ended"
        ) from None


def refuse_foreign_tables(connection: Connection) -> None:
    """ConfigError when the database holds tables named as chatsync's but no chatsync version (another
    application's, or made by hand): migrating would fail half-way on 'table … already exists'."""
    from sqlalchemy import inspect

    from chatsync.store.tables import metadata

    taken = sorted(set(inspect(connection).get_table_names()) & set(metadata.tables))
    if taken:
        raise ConfigError(
            f"the database already holds tables chatsync would make ({', '.join(taken[:3])}"
            f"{', …' if len(taken) > 3 else ''}) but no chatsync schema version: it is another "
            "application's, or was made by hand; give chatsync a database of its own"
        )


def create_schema(engine: Engine) -> bool:
    """On a database that holds none of chatsync's tables, create them as they are at ``HEAD_REVISION``
    and record that revision, in one transaction; False (nothing done) on any other database.

    This is Alembic's own recipe for a new database ("create_all, then stamp head"): the same tables the
    migrations build (a test compares the two on SQLite and PostgreSQL), without loading Alembic and
    running every migration in turn, which is most of a first sync's start-up. Concurrent first runs
    are serialised like upgrades (PostgreSQL's advisory lock, SQLite's write lock).
    """
    from sqlalchemy import inspect

    from chatsync.store.tables import metadata

    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _UPGRADE_LOCK})
        else:
            lock_for_writing(connection)
        existing = set(inspect(connection).get_table_names())
        if existing & ({_ALEMBIC_VERSION.name} | set(metadata.tables)):
            return False  # someone else's first run won, or a schema to upgrade: Alembic decides
        metadata.create_all(connection)
        _ALEMBIC_VERSION.create(connection)
        connection.execute(_ALEMBIC_VERSION.insert().values(version_num=HEAD_REVISION))
    return True


def table_counts(engine: Engine) -> dict[str, int]:
    from chatsync.store.tables import metadata

    counts = {}
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            counts[table.name] = connection.execute(select(func.count()).select_from(table)).scalar_one()
    return counts


def insert_for(connection: Connection, table: Any) -> Any:
    """INSERT with ON CONFLICT support for the connection's dialect."""
    module = postgresql if connection.dialect.name == "postgresql" else sqlite
    return module.insert(table)


def is_among(connection: Connection, column: Any, values: list[Any]) -> Any:
    """``column IN (values)`` in the form the connection's database runs fastest.

    One parameter however many values (a sync page's 100 ids were 100 parameters, each processed by
    SQLAlchemy on its own), still served by the column's index: PostgreSQL gets ``column = ANY(:array)``,
    SQLite ``column IN (SELECT value FROM json_each(:array))``.
    """
    if connection.dialect.name == "postgresql":
        return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
    listed: Any = select(literal_column("value")).select_from(
        func.json_each(bindparam(None, json.dumps(values)))
    )
    return column.in_(listed.scalar_subquery())


def lock_for_writing(connection: Connection) -> None:
    """Make what this transaction reads before it writes stay true until it commits.

    PostgreSQL does this per row (the writers read with FOR UPDATE). SQLite has one writer at a time,
    and its driver only begins a transaction at the first write, so take the write lock now.
    """
    if connection.dialect.name != "sqlite":
        return
    if not connection.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
        connection.exec_driver_sql("BEGIN IMMEDIATE")
