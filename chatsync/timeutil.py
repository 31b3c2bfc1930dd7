"""Dates, durations and timestamps as chatsync reads and prints them (UTC ISO 8601 with ``Z``)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

from chatsync.errors import InvalidDate, InvalidDuration, UsageError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


MAX_DURATION_SECONDS = 3650 * 86400  # beyond this a date computed with it overflows, and no setting needs it
FIRST_DAY = date(1970, 1, 1)
LAST_DAY = date(2999, 12, 31)


def parse_day(text: str) -> date:
    """Parse a command-line ``YYYY-MM-DD`` (zero-padded, a real calendar day)."""
    if not _DAY.match(text.strip()):
        raise InvalidDate(text)
    try:
        return check_day(date.fromisoformat(text.strip()))
    except ValueError:
        raise InvalidDate(text) from None


def check_day(day: date) -> date:
    """Refuse days no conversation can have (and whose next day would overflow)."""
    if not FIRST_DAY <= day <= LAST_DAY:
        raise UsageError(f"date {day.isoformat()} is out of range: expected {FIRST_DAY} to {LAST_DAY}")
    return day


def parse_duration(text: str) -> timedelta:
    """Parse ``3d``, ``12h``, ``90m``, ``30s`` or ``1w``."""
    match = _DURATION.match(text)
    if not match:
        raise InvalidDuration(text)
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    if seconds > MAX_DURATION_SECONDS:
        raise UsageError(f"duration {text.strip()!r} is too long: at most 10 years (3650d)")
    return timedelta(seconds=seconds)


def format_duration(span: timedelta) -> str:
    """A duration the way ``parse_duration`` reads it: ``3d``, ``5m``, ``90s`` (the largest exact unit)."""
    seconds = span.total_seconds()
    for unit in ("w", "d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def parse_timestamp(value: object) -> datetime:
    """Read a Chatbase timestamp (ISO 8601 string, or epoch seconds/milliseconds) as aware UTC.

    Raises ValueError for anything else, so the caller can quarantine the record.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, int | float):
        seconds = value / 1000 if value > 10**12 else value
        return datetime.fromtimestamp(seconds, UTC)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"not a timestamp: {value!r}")
    text = value.strip()
    if text.endswith("z"):
        text = text[:-1] + "Z"
    parsed = datetime.fromisoformat(text)  # reads a trailing Z itself since Python 3.11
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def iso_z(moment: datetime | None) -> str | None:
    """Print a moment as UTC ISO 8601 with a ``Z`` suffix (seconds, plus milliseconds when present)."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    spec = "milliseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def as_utc(moment: datetime) -> datetime:
    """Attach UTC to a naive datetime read back from SQLite; convert an aware one."""
    if moment.tzinfo is UTC:  # already (most moments chatsync makes): no conversion to pay for
        return moment
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def day_end(day: date) -> datetime:
    """The first instant after ``day`` (exclusive end)."""
    return day_start(day) + timedelta(days=1)
