"""One sync per chatbot at a time, across processes and hosts.

* **PostgreSQL**: a lease row per chatbot in ``sync_leases``. It needs no server session, so it holds
  behind a transaction pooler (PgBouncer, Supabase's port 6543) where session advisory locks do not.
  Every step is one atomic statement on the database clock, so racing takers and hosts' clocks do not
  matter:

  - *take*: insert the row, or overwrite it when its lease has expired;
  - *renew*: a background thread pushes the expiry on every ``LEASE / 12`` while the holder still owns the
    row; when the row is someone else's, or renewals failed until ``LEASE / 6`` before the expiry, the
    holder is told (``on_lost``) and must stop;
  - *release*: delete the row if it is still ours;
  - *take over*: a holder on this host (same boot, same PID namespace) whose process no longer lives,
    or one of this process that it no longer holds (its release could not be written), is replaced at
    once, provided the row still names that holder. One on another host, which this host cannot see,
    blocks for at most ``LEASE``.

* **SQLite file**: ``flock`` on a file beside the database; the operating system releases it when the
  process dies, even on SIGKILL.
* **In-memory SQLite**: a lock in this process (nothing else can reach the database).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.util import asbool

from chatsync.errors import LockHeld, LockLost
from chatsync.store.tables import sync_leases

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=60)
"""How long a PostgreSQL sync lock lasts without renewal: the longest a sync killed on another host blocks."""
KEPT_WITHOUT_DATABASE = LEASE * 5 / 6
"""How long a sync keeps going without renewing its PostgreSQL lock (a database away) before it stops: it
must stop before the database could hand the lease to another."""

LostHook = Callable[[LockLost], None]

_LOCAL: dict[str, threading.Lock] = {}
_LOCAL_GUARD = threading.Lock()
# Leases this process holds right now: one of its own rows whose release could not be written (the
# database was away) is known to be over, without waiting for it to lapse.
_HOLDING: set[str] = set()


@contextmanager
def chatbot_lock(
    engine: Engine, chatbot_id: str, *, on_lost: LostHook | None = None, lease: timedelta = LEASE
) -> Iterator[None]:
    """Hold the sync lock of one chatbot, or raise LockHeld at once.

    ``on_lost`` is called (once, from a background thread) if a PostgreSQL lease is lost while held;
    the holder must then stop writing. ``lease`` (positive) is the lease length, PostgreSQL only.
    """
    if engine.dialect.name == "postgresql":
        held = _Lease(engine, chatbot_id, lease, on_lost)
        held.take()
        try:
            yield
        finally:
            held.release()
        return
    database = _the_file(engine)
    if database is None:
        with _process_lock(f"{id(engine)}:{chatbot_id}", chatbot_id):
            yield
        return
    with _file_lock(database, chatbot_id):
        yield


def sync_held(engine: Engine, chatbot_id: str) -> bool | None:
    """Whether a process holds the chatbot's sync lock now, without taking it; None when this process
    cannot tell (in-memory SQLite). For ``status``: a run still marked running whose lock is free was
    ended without recording how (SIGKILL, a power cut).

    PostgreSQL: a lease row that has not expired and whose holder, if on this host, still lives. SQLite
    file: the lock file's ``flock`` probed with a shared lock for an instant (a sync taking its lock in
    that instant tries again: :func:`_file_lock`).
    """
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            row = _holder(connection, chatbot_id, unexpired=True)
        return row is not None and not _holder_is_gone(
            row.holder, row.pid_namespace, row.pid, row.process_start, _this_process()
        )
    database = _the_file(engine)
    if database is None:
        return None
    import fcntl

    try:
        fd = os.open(_lock_path(database, chatbot_id), os.O_RDONLY)
    except FileNotFoundError:
        return False  # no sync of it ever ran here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (closing releases the shared lock when it was taken)
    return False


# ----------------------------------------------------------------------------------------- the holder
def _holder(connection: Any, chatbot_id: str, unexpired: bool = False) -> Any:
    """The lease row's holder columns (holder, pid_namespace, pid, process_start), or None."""
    where = [sync_leases.c.chatbot_id == chatbot_id]
    if unexpired:
        where.append(sync_leases.c.expires_at > func.now())
    columns = (
        sync_leases.c.holder,
        sync_leases.c.pid_namespace,
        sync_leases.c.pid,
        sync_leases.c.process_start,
    )
    return connection.execute(select(*columns).where(*where)).first()


@dataclass(frozen=True)
class _Process:
    """This process as a lease row names it; ``pid_namespace`` and ``start`` are None off Linux."""

    pid: int
    pid_namespace: str | None
    start: int | None


def _this_process() -> _Process:
    pid = os.getpid()
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
        stat = _stat(pid)
    except OSError:
        return _Process(pid, None, None)
    return _Process(pid, f"{boot} {namespace}", stat[1] if stat else None)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start in clock ticks after boot) of a process from /proc; None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name in parentheses may contain spaces
    return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime) of proc(5)


def _holder_is_gone(
    holder: str, pid_namespace: str | None, pid: int, start: int | None, me: _Process
) -> bool:
    """Whether a lease's holder surely no longer holds it. Only a holder in this host's PID namespace can
    be judged; anything uncertain (another host, a /proc that hides other users) counts as alive."""
    if me.pid_namespace is None or pid_namespace != me.pid_namespace or start is None or pid <= 0:
        return False
    if (pid, start) == (me.pid, me.start):
        with _LOCAL_GUARD:
            return holder not in _HOLDING
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it lives, as another user
    try:
        stat = _stat(pid)
    except OSError:
        return False
    # gone: ended (or a zombie its parent has not reaped), or its pid now belongs to another process
    return stat is None or stat[0] in ("Z", "X") or stat[1] != start


# ------------------------------------------------------------------------------------------- the lease
class _Lease:
    """One hold of a chatbot's lease row: take, keep renewed, release."""

    def __init__(self, engine: Engine, chatbot_id: str, lease: timedelta, on_lost: LostHook | None) -> None:
        self.engine = engine
        self.chatbot_id = chatbot_id
        self.lease = lease
        self.on_lost = on_lost
        self.holder = str(uuid.uuid4())
        self._renew_every = lease.total_seconds() / 12
        # Stop before the database could hand the lease to another: the deadline counts from the local
        # start of the last statement that set the expiry, which is never later than the database's.
        self._give_up_after = lease.total_seconds() * (KEPT_WITHOUT_DATABASE / LEASE)
        self._deadline = 0.0  # time.monotonic() by which a renewal must have succeeded
        self._released = threading.Event()
        self._lost = threading.Lock()
        self._threads: list[threading.Thread] = []

    def take(self) -> None:
        """Take the lease, or raise LockHeld: free, expired, or left by a process of this host that died."""
        me = _this_process()
        dead: str | None = None
        for _ in range(3):  # a row released or replaced between our statements: look again
            started = time.monotonic()
            # Alive here from before the row is written (another thread of this process must not take it
            # for a dead one's), and only if its transaction commits: one whose COMMIT failed (its answer
            # lost, the row written or not) is not kept, nor renewed, and its row, if written, is a dead
            # holder's that the next try takes over, where it had read as another sync (exit 75).
            with _LOCAL_GUARD:
                _HOLDING.add(self.holder)
            taken = False  # (true once the transaction that wrote the row has committed)
            try:
                with self.engine.begin() as connection:
                    written = connection.execute(self._take(me, dead)).first() is not None
                    row = None if written else _holder(connection, self.chatbot_id)
                taken = written
            finally:
                if not taken:
                    with _LOCAL_GUARD:
                        _HOLDING.discard(self.holder)
            if taken:
                self._deadline = started + self._give_up_after
                self._start_keeping()
                return
            if row is not None and not _holder_is_gone(
                row.holder, row.pid_namespace, row.pid, row.process_start, me
            ):
                break
            dead = row.holder if row is not None else None
        raise LockHeld(self.chatbot_id)

    def _take(self, me: _Process, dead: str | None) -> Any:
        """INSERT … ON CONFLICT DO UPDATE … WHERE expired (or WHERE the holder is the dead one we saw)."""
        now = func.now()
        values = {
            "holder": self.holder,
            "host": socket.gethostname()[:255],
            "pid": me.pid,
            "pid_namespace": me.pid_namespace,
            "process_start": me.start,
            "acquired_at": now,
            "expires_at": now + self.lease,
        }
        statement = insert(sync_leases).values(chatbot_id=self.chatbot_id, **values)
        takeable = sync_leases.c.expires_at <= now
        if dead is not None:
            takeable = or_(takeable, sync_leases.c.holder == dead)
        return statement.on_conflict_do_update(
            index_elements=[sync_leases.c.chatbot_id],
            set_={name: statement.excluded[name] for name in values},
            where=takeable,
        ).returning(sync_leases.c.holder)

    def _ours(self) -> Any:
        return (sync_leases.c.chatbot_id == self.chatbot_id) & (sync_leases.c.holder == self.holder)

    def _start_keeping(self) -> None:
        for target, name in ((self._renew, "renew"), (self._watch, "watch")):
            thread = threading.Thread(
                target=target, name=f"chatsync-lease-{name}-{self.chatbot_id[:16]}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _renew(self) -> None:
        statement = (
            update(sync_leases)
            .where(self._ours())
            .values(expires_at=func.now() + self.lease)
            .returning(sync_leases.c.holder)
        )
        failing = False
        while not self._released.wait(self._renew_every):
            started = time.monotonic()
            try:
                with self.engine.begin() as connection:
                    still_ours = connection.execute(statement).first() is not None
            except SQLAlchemyError as exc:
                # The watchdog gives up if this goes on; until then the lease still stands. Said once a
                # streak: a database away for 50 s had put the same line in the log every 5 s.
                log.log(
                    logging.DEBUG if failing else logging.WARNING,
                    "could not renew the sync lock of %s (%s); the sync stops if it cannot for %.0f s",
                    self.chatbot_id,
                    type(exc).__name__,
                    self._give_up_after,
                )
                failing = True
                continue
            failing = False
            if not still_ours:
                self._lose("another sync took it over")
                return
            self._deadline = started + self._give_up_after

    def _watch(self) -> None:
        while not self._released.wait(max(0.0, self._deadline - time.monotonic())):
            if time.monotonic() >= self._deadline:
                self._lose(f"it could not be renewed for {self._give_up_after:.0f} s")
                return

    def _lose(self, reason: str) -> None:
        if self._released.is_set() or not self._lost.acquire(blocking=False):
            return  # released meanwhile, or already told
        log.info("lost the sync lock of %s: %s", self.chatbot_id, reason)  # the run's error line says it too
        if self.on_lost is not None:
            self.on_lost(LockLost(self.chatbot_id, reason))

    def release(self) -> None:
        """Stop renewing and delete the row if it is still ours (a taken-over lease is left alone)."""
        self._released.set()
        with _LOCAL_GUARD:
            _HOLDING.discard(self.holder)
        for thread in self._threads:
            thread.join()
        # When the database is gone the row stays: it expires, or a rerun here sees this process is gone.
        with suppress(DBAPIError), self.engine.begin() as connection:
            connection.execute(delete(sync_leases).where(self._ours()))


# ---------------------------------------------------------------------------------------- SQLite locks
_TAKE_ATTEMPTS = 4  # over 60 ms


def _the_file(engine: Engine) -> Path | None:
    """The SQLite file itself, whatever names it (a symlink, ``..``, a relative path, a ``file:`` URI with
    ``?uri=true``): one lock for it. None for a database in memory, which only this process reaches.

    The path is resolved as SQLite is handed it: SQLAlchemy makes a plain path absolute as text first
    (``link/../x`` is ``./x`` whatever ``link`` points to); a URI's path the system resolves as it goes.
    """
    database = engine.url.database
    if not database or database == ":memory:":
        return None
    try:
        uri = asbool(engine.url.query.get("uri", False))  # (as SQLAlchemy reads it: "yes", "on", "1", …)
    except ValueError:
        uri = False
    if not uri:
        return Path(os.path.realpath(os.path.abspath(database)))
    if database.startswith("file:"):
        from urllib.parse import parse_qs, unquote, urlsplit

        parts = urlsplit(database)
        modes = [*parse_qs(parts.query).get("mode", []), str(engine.url.query.get("mode", ""))]
        database = unquote(parts.path)
        if not database or database == ":memory:" or "memory" in modes:
            return None
    return Path(os.path.realpath(database))


def _lock_path(database: Path, chatbot_id: str) -> Path:
    digest = hashlib.sha256(chatbot_id.encode()).hexdigest()[:16]
    return database.with_name(f"{database.name}.sync-{digest}.lock")


@contextmanager
def _file_lock(database: Path, chatbot_id: str) -> Iterator[None]:
    import fcntl

    path = _lock_path(database, chatbot_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for attempt in range(_TAKE_ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # a sync holds it, or `status`/`doctor` probes it for an instant: look again shortly
                if attempt == _TAKE_ATTEMPTS - 1:
                    raise LockHeld(chatbot_id) from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def _process_lock(name: str, chatbot_id: str) -> Iterator[None]:
    with _LOCAL_GUARD:
        lock = _LOCAL.setdefault(name, threading.Lock())
    if not lock.acquire(blocking=False):
        raise LockHeld(chatbot_id)
    try:
        yield
    finally:
        lock.release()
