"""Everything chatsync raises on purpose, and the exit codes the CLI maps it to.

Catch at the level you care about::

    ChatsyncError                      base of every deliberate failure
    ├── UsageError                     bad input from a person or script (exit 2)
    │   ├── InvalidDate
    │   ├── InvalidDuration
    │   └── InvalidNumber              not an 8-digit number, optionally with country code
    ├── NotFound                       a named thing does not exist (exit 1)
    │   └── ConversationNotFound
    ├── ConfigError                    configuration rejected (exit 4)
    │   ├── MissingSetting             e.g. no CHATBASE_API_KEY
    │   └── ChatbaseRejected           Chatbase said 400/401/403/404: bad key, chatbot or parameter
    ├── SchemaTooNew                   database migrated by a newer chatsync (exit 1)
    ├── DatabaseUnreachable            the database cannot be opened (exit 1; a sync waits while it is down)
    ├── LockHeld                       another sync of the chatbot is running (exit 75)
    ├── LockLost                       the lock was taken over mid-sync; committed work stays (exit 3)
    ├── DatabaseUnavailable            the database went away mid-sync, or stayed down (exit 3)
    │   └── DatabaseFailed             it failed a statement no record caused: a timeout, a full disk (exit 1)
    ├── NormalizerCrashed              a worker process reading pages died; committed work stays (exit 3)
    └── ChatbaseUnavailable            retries ran out: outage, rate limit, broken pages (exit 3)
        └── PagingError                the server repeated a page or never stopped paging

A record Chatbase sends that cannot be stored is not an exception the caller sees: it raises
``BadRecord`` inside normalisation and the sync engine quarantines it. Likewise ``BadLead``: a signed lead
webhook the API answers 400, or a get-leads row the backfill skips, with the reason.
"""

from __future__ import annotations

import re
from enum import IntEnum


class ExitCode(IntEnum):
    """Exit statuses of the CLI contract (docs/cli.md)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    PARTIAL = 3
    CONFIG = 4
    LOCKED = 75


class ChatsyncError(Exception):
    """Base of every deliberate chatsync failure."""

    exit_code: ExitCode = ExitCode.ERROR


class UsageError(ChatsyncError):
    exit_code = ExitCode.USAGE


class InvalidDate(UsageError):
    def __init__(self, text: str) -> None:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):  # the form is right: the day does not exist
            super().__init__(f"invalid date {text!r}: no such day (expected YYYY-MM-DD of a real day)")
        else:
            super().__init__(f"invalid date {text!r}: expected YYYY-MM-DD, e.g. 2024-05-01")


class InvalidDuration(UsageError):
    def __init__(self, text: str) -> None:
        super().__init__(f"invalid duration {text!r}: expected a number and a unit, e.g. 3d, 12h, 90m, 30s")


class InvalidNumber(UsageError):
    def __init__(
        self, text: str, reason: str = "", country_codes: tuple[str, ...] = ("852", "853", "65")
    ) -> None:
        detail = f" ({reason})" if reason else ""
        codes = (
            ", ".join(country_codes[:-1]) + f" or {country_codes[-1]}"
            if len(country_codes) > 1
            else country_codes[0]
        )
        super().__init__(
            f"invalid WhatsApp number {text!r}{detail}: expected 8 digits, optionally with country code "
            f"{codes} (CHATSYNC_ACCEPTED_REGIONS), e.g. 9123 4567 or +{country_codes[0]} 9123 4567"
        )


class NotFound(ChatsyncError):
    exit_code = ExitCode.ERROR


class ConversationNotFound(NotFound):
    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        super().__init__(f"conversation {conversation_id!r} not found")


class ConfigError(ChatsyncError):
    exit_code = ExitCode.CONFIG


class MissingSetting(ConfigError):
    def __init__(self, variable: str, flag: str) -> None:
        super().__init__(f"{variable} is not set: export it or pass {flag}")


class ChatbaseRejected(ConfigError):
    """Chatbase answered 400/401/403/404: retrying will not help, the configuration must change."""

    def __init__(self, status: int, message: str, hint: str, *, every_chatbot: bool = False) -> None:
        self.status = status
        # Not about the chatbot asked for: every chatbot would get the same answer (a 404 from whatever
        # serves a mistyped URL, an API v2 plan without API access).
        self.every_chatbot = every_chatbot
        super().__init__(f"Chatbase rejected the request ({status}: {message}); {hint}")


class SchemaTooNew(ChatsyncError):
    def __init__(self, found: str, known: str) -> None:
        super().__init__(
            f"database schema {found!r} is not one this chatsync knows (its newest is {known!r}): if a newer "
            "chatsync made it, upgrade chatsync; if the database is another application's (its own Alembic "
            "version), give chatsync a database of its own"
        )


class DatabaseUnreachable(ChatsyncError):
    """``down``: the server is down or restarting (worth trying again), not refusing chatsync (a wrong
    password, no such database) nor a path that cannot be a database."""

    def __init__(self, exc: BaseException, down: bool = False, advice: str | None = None) -> None:
        self.down = down
        # (the driver's words, without SQLAlchemy's wrapping)
        said = str(getattr(exc, "orig", None) or exc).strip()
        self.first_line = said.splitlines()[0] if said else type(exc).__name__
        super().__init__(f"cannot open the database: {self.first_line}" + (f": {advice}" if advice else ""))


class DatabaseUnavailable(ChatsyncError):
    """The database went away mid-run (e.g. a PostgreSQL restart); what was committed stays.

    ``down``: the server is down or restarting (:func:`chatsync.store.engine.is_down`), so a sync tries
    again within its retry budget before it gives up; otherwise (SQLite, a server that refuses) at once.
    """

    exit_code = ExitCode.PARTIAL

    def __init__(self, message: str, down: bool = False) -> None:
        self.down = down
        super().__init__(message)


class DatabaseFailed(DatabaseUnavailable):
    """The database failed a statement of a sync for a reason of its own, not a record's nor an outage
    (PostgreSQL: a statement timeout, a full disk; SQLite: a file that cannot be written): the run ends as
    it does when the database goes away, but with exit 1, as it will fail the same way until someone
    changes the database."""

    exit_code = ExitCode.ERROR


class NormalizerCrashed(ChatsyncError):
    """A worker process reading pages died mid-sync (killed, out of memory); what was committed stays."""

    exit_code = ExitCode.PARTIAL


class LockHeld(ChatsyncError):
    exit_code = ExitCode.LOCKED

    def __init__(self, chatbot_id: str) -> None:
        self.chatbot_id = chatbot_id
        super().__init__(f"another sync of chatbot {chatbot_id!r} is running; nothing was done")


class LockLost(ChatsyncError):
    """The sync lock could not be renewed in time or was taken over: the sync stops so that two never run
    side by side; what was committed stays and the next run continues."""

    exit_code = ExitCode.PARTIAL

    def __init__(self, chatbot_id: str, reason: str) -> None:
        self.chatbot_id = chatbot_id
        super().__init__(
            f"lost the sync lock of chatbot {chatbot_id!r} ({reason}); stopped, what was committed is kept "
            "and the next run continues"
        )


class ChatbaseUnavailable(ChatsyncError):
    """Transient failures outlasted the retry budget; what was committed stays, the next run continues.

    ``last``: the last failure, when there was one (``HTTP 503: …``, ``ConnectError: …``)."""

    exit_code = ExitCode.PARTIAL

    def __init__(self, message: str, last: str | None = None) -> None:
        super().__init__(message)
        self.last = last


class PagingError(ChatbaseUnavailable):
    """The server repeated a page or paged past any sane bound."""


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM, e.g. systemd's timeout): raised in the main thread so a
    sync stops like an interrupt (what was committed is kept) and still reports how it ended (exit 143).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""


def stop_message(error: BaseException) -> str | None:
    """The one line for a run stopped by Ctrl-C or SIGTERM (``error`` KeyboardInterrupt or
    :class:`Terminated`, whose own messages are empty), as stderr, ``--json`` and ``chatsync status`` give
    it; None for any other error."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted; what was committed is kept"
    if isinstance(error, Terminated):
        return "terminated (SIGTERM); what was committed is kept"
    return None


class BadRecord(Exception):
    """A Chatbase record that cannot be stored; carries the reason it is quarantined with."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class BadLead(Exception):
    """A signed lead webhook body or a get-leads row that is not a lead chatsync can store; says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
