"""One sync per chatbot at a time: PostgreSQL advisory locks, a file lock beside an SQLite database.

Both are released by the operating system or the server when the process dies, so a killed sync never
leaves a stale lock behind.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from sqlalchemy import Engine, text

from chatsync.errors import LockHeld

_LOCAL: dict[str, threading.Lock] = {}
_LOCAL_GUARD = threading.Lock()


def _key(chatbot_id: str) -> int:
    digest = hashlib.sha256(f"chatsync-sync:{chatbot_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def chatbot_lock(engine: Engine, chatbot_id: str) -> Iterator[None]:
    """Hold the sync lock of one chatbot, or raise LockHeld at once."""
    if engine.dialect.name == "postgresql":
        with _advisory_lock(engine, chatbot_id):
            yield
        return
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        with _process_lock(f"{id(engine)}:{chatbot_id}", chatbot_id):
            yield
        return
    with _file_lock(Path(database), chatbot_id):
        yield


@contextmanager
def _advisory_lock(engine: Engine, chatbot_id: str) -> Iterator[None]:
    connection = engine.connect()
    try:
        got = connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _key(chatbot_id)}).scalar()
        connection.commit()
        if not got:
            raise LockHeld(chatbot_id)
        yield
    finally:
        with suppress(Exception):  # when the server went away, the lock went with it
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _key(chatbot_id)})
            connection.commit()
        with suppress(Exception):
            connection.close()


@contextmanager
def _file_lock(database: Path, chatbot_id: str) -> Iterator[None]:
    import fcntl

    digest = hashlib.sha256(chatbot_id.encode()).hexdigest()[:16]
    path = database.with_name(f"{database.name}.sync-{digest}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(chatbot_id) from None
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
