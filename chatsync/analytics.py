"""The metrics of spec/analytics.md as aggregate SQL over stored columns; one implementation, two renderers.

Per-conversation figures (message counts, response times, the WhatsApp outcome) are computed at sync
time, so a report is a handful of aggregate queries: no conversation is loaded into Python. Medians of
message counts come from a GROUP BY distribution (exact, and cheap because counts are small integers);
response-time percentiles use percentile_cont on PostgreSQL and ranked rows on SQLite, both interpolating
linearly between ranks.

SQLite has no time zones, so local days and hours come from the zone's UTC offsets over the data's span,
written into the query as a CASE over offset segments: still one SQL query, exact across DST changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, and_, case, func, literal_column, select, text, true
from sqlalchemy.sql import ColumnElement

from chatsync.store.queries import ConversationFilter, conditions
from chatsync.store.tables import conversations as c
from chatsync.timeutil import as_utc

LENGTH_BUCKETS = (
    ("1", 1, 1),
    ("2", 2, 2),
    ("3-5", 3, 5),
    ("6-10", 6, 10),
    ("11-20", 11, 20),
    ("21+", 21, None),
)
MISSED = ("no_reply", "not_found", "ambiguous")
MAX_WINDOW_DAYS = 20 * 366  # by_day lists every day of the window


def _rate(numerator: int | float, denominator: int | float) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def _round2(value: float | None) -> float | None:
    return None if value is None else round(float(value), 2)


def percentile_from_distribution(distribution: Sequence[tuple[float, int]], p: float) -> float | None:
    """percentile_cont over values given as sorted (value, count) pairs."""
    total = sum(count for _, count in distribution)
    if not total:
        return None
    rank = p * (total - 1)
    lo, hi = math.floor(rank), math.ceil(rank)

    def at(index: int) -> float:
        seen = 0
        for value, count in distribution:
            seen += count
            if index < seen:
                return float(value)
        return float(distribution[-1][0])

    low = at(lo)
    return low + (at(hi) - low) * (rank - lo)


# ------------------------------------------------------------------------------------------- time zones
def local_window(since: date | None, until: date | None, tz: str) -> tuple[datetime | None, datetime | None]:
    """UTC bounds of whole local days ``since..until`` (inclusive) in zone ``tz``."""
    zone = ZoneInfo(tz)
    start = datetime(since.year, since.month, since.day, tzinfo=zone).astimezone(UTC) if since else None
    after = until + timedelta(days=1) if until else None
    end = datetime(after.year, after.month, after.day, tzinfo=zone).astimezone(UTC) if after else None
    return start, end


def offset_segments(tz: str, start: datetime, end: datetime) -> list[tuple[datetime, int]]:
    """(from-instant, UTC offset in minutes) pieces covering ``start..end`` in zone ``tz``."""
    zone = ZoneInfo(tz)

    def offset(moment: datetime) -> int:
        delta = moment.astimezone(zone).utcoffset() or timedelta(0)
        return int(delta.total_seconds() // 60)

    segments = [(start, offset(start))]
    probe = start
    while probe < end:
        step = min(probe + timedelta(days=1), end)
        if offset(step) != segments[-1][1]:
            lo, hi = probe, step  # bisect to the minute of the change
            while hi - lo > timedelta(minutes=1):
                mid = lo + (hi - lo) / 2
                if offset(mid) == segments[-1][1]:
                    lo = mid
                else:
                    hi = mid
            segments.append((hi.replace(second=0, microsecond=0), offset(hi)))
        probe = step
    return segments


class _LocalTime:
    """SQL for a conversation's local hour in the report's zone, as one sortable key.

    PostgreSQL: the local timestamp truncated to the hour; SQLite: ``YYYY-MM-DD HH``.
    """

    hour: Any

    def __init__(self, connection: Connection, tz: str, where: list[ColumnElement[bool]]) -> None:
        self.dialect = connection.dialect.name
        self.tz = tz
        if self.dialect == "postgresql":
            self.hour = func.date_trunc("hour", func.timezone(tz, c.c.created_at))
            return
        span = connection.execute(
            select(func.min(c.c.created_at), func.max(c.c.created_at)).where(and_(true(), *where))
        ).one()
        first = as_utc(span[0]) if span[0] is not None else datetime.now(UTC)
        last = as_utc(span[1]) if span[1] is not None else first
        segments = offset_segments(tz, first - timedelta(days=1), last + timedelta(days=1))
        if len(segments) == 1:
            minutes: Any = literal_column(str(segments[0][1]))
        else:
            minutes = case(
                *[
                    (c.c.created_at >= moment, literal_column(str(mins)))
                    for moment, mins in reversed(segments[1:])
                ],
                else_=literal_column(str(segments[0][1])),
            )
        local = func.datetime(c.c.created_at, func.printf("%+d minutes", minutes))
        self.hour = func.substr(local, 1, 13)


# ----------------------------------------------------------------------------------------------- report
def report(
    connection: Connection,
    filters: ConversationFilter,
    since: date | None = None,
    until: date | None = None,
    tz: str = "UTC",
) -> dict[str, Any]:
    """The analytics object of spec/analytics.md for conversations created in local days since..until."""
    from chatsync.errors import UsageError
    from chatsync.timeutil import check_day

    for bound in (since, until):
        if bound is not None:
            check_day(bound)
    if since and until and (until - since).days > MAX_WINDOW_DAYS:
        raise UsageError("the report window is longer than 20 years: narrow --since/--until")
    start, end = local_window(since, until, tz)
    filters = replace(filters, since=None, until=None, created_from=start, created_before=end)
    where = conditions(filters, connection.dialect.name)
    scope = and_(true(), *where)

    def count_if(condition: Any) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    outcome = c.c.wa_outcome
    totals = (
        connection.execute(
            select(
                func.count().label("conversations"),
                func.coalesce(func.sum(c.c.message_count), 0).label("messages"),
                func.coalesce(func.sum(c.c.user_messages), 0).label("user_messages"),
                func.coalesce(func.sum(c.c.assistant_messages), 0).label("assistant_messages"),
                func.count(func.distinct(func.coalesce(c.c.whatsapp_number, c.c.customer))).label("users"),
                count_if(func.coalesce(c.c.whatsapp_number, c.c.customer).is_not(None)).label("keyed"),
                count_if(c.c.user_messages >= 2).label("engaged"),
                func.avg(c.c.message_count).label("mean_messages"),
                count_if(c.c.response_steps > 0).label("with_steps"),
                count_if(c.c.response_seconds.is_not(None)).label("with_pairs"),
                count_if(c.c.first_response_seconds.is_not(None)).label("with_first"),
                count_if(c.c.unanswered.is_(True)).label("unanswered"),
                count_if(outcome != "no_prompt").label("prompted"),
                count_if(outcome.in_(("captured", "not_found", "ambiguous"))).label("replied"),
                count_if(outcome == "captured").label("captured"),
                count_if(c.c.whatsapp_source == "manual").label("manual"),
                count_if(c.c.whatsapp_source == "form").label("from_form"),
                count_if(c.c.whatsapp_number.is_not(None)).label("with_number"),
                *[count_if(outcome == o).label(f"missed_{o}") for o in MISSED],
            ).where(scope)
        )
        .one()
        ._mapping
    )
    n = totals["conversations"]

    lengths = connection.execute(
        select(c.c.message_count, func.count())
        .where(scope)
        .group_by(c.c.message_count)
        .order_by(c.c.message_count)
    ).all()
    histogram = {
        label: sum(count for value, count in lengths if value >= lo and (hi is None or value <= hi))
        for label, lo, hi in LENGTH_BUCKETS
    }

    pairs = _response_pairs(connection, where)
    first = _distribution(
        connection,
        c.c.first_response_seconds,
        c,
        and_(true(), *where, c.c.first_response_seconds.is_not(None)),
    )

    # One scan by (local day, hour) gives both the daily series and the weekday × hour grid.
    local = _LocalTime(connection, tz, where)
    by_hour = connection.execute(
        select(local.hour, func.count(), func.coalesce(func.sum(c.c.message_count), 0))
        .where(scope)
        .group_by(local.hour)
    ).all()
    daily: dict[str, tuple[int, int]] = {}
    grid = [[0] * 24 for _ in range(7)]
    for key, count, messages in by_hour:
        text_key = key.isoformat(sep=" ") if isinstance(key, datetime) else str(key)
        local_day, hour = text_key[:10], int(text_key[11:13])
        seen, total = daily.get(local_day, (0, 0))
        daily[local_day] = (seen + count, total + int(messages))
        grid[date.fromisoformat(local_day).weekday()][hour] += count

    return {
        "window": {
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
            "timezone": tz,
        },
        "conversations": n,
        "messages": int(totals["messages"]),
        "user_messages": int(totals["user_messages"]),
        "assistant_messages": int(totals["assistant_messages"]),
        "users": totals["users"],
        "users_coverage": _rate(totals["keyed"], n),
        "engagement_rate": _rate(totals["engaged"], n),
        "messages_per_conversation": {
            "mean": _round2(totals["mean_messages"]),
            "median": _round2(percentile_from_distribution(lengths, 0.5)),
        },
        "length_histogram": histogram,
        "response_time_seconds": {
            "mean": _round2(pairs["mean"]),
            "median": _round2(pairs["median"]),
            "p90": _round2(pairs["p90"]),
            "pairs": pairs["count"],
            "coverage": _rate(totals["with_pairs"], totals["with_steps"]),
        },
        "first_response_time_seconds": {
            "mean": _round2(first["mean"]),
            "median": _round2(first["median"]),
            "p90": _round2(first["p90"]),
            "coverage": _rate(totals["with_first"], totals["with_steps"]),
        },
        "unanswered_rate": _rate(totals["unanswered"], n),
        "by_source": _grouped(connection, func.coalesce(c.c.source, "Unspecified"), scope),
        "by_country": _grouped(connection, func.coalesce(c.c.country, "Unknown"), scope),
        "by_phone_region": _grouped(
            connection,
            func.coalesce(c.c.whatsapp_region, "Unknown"),
            and_(scope, c.c.whatsapp_number.is_not(None)),
        ),
        "by_day": _days(daily, since, until),
        "by_weekday_hour": grid,
        "whatsapp": {
            "prompted": totals["prompted"],
            "replied": totals["replied"],
            "captured": totals["captured"],
            "capture_rate": _rate(totals["captured"], totals["prompted"]),
            "manual": totals["manual"],
            "from_form": totals["from_form"],
            "with_number": totals["with_number"],
            "missed": {o: totals[f"missed_{o}"] for o in MISSED},
        },
    }


def _grouped(connection: Connection, key: Any, scope: Any) -> dict[str, int]:
    rows = connection.execute(
        select(key.label("key"), func.count().label("n"))
        .where(scope)
        .group_by(key)
        .order_by(func.count().desc(), key)
    ).all()
    return {str(k): n for k, n in rows}


def _days(found: dict[str, tuple[int, int]], since: date | None, until: date | None) -> list[dict[str, Any]]:
    """One row per day of the window, including days with no conversations."""
    if not found and (since is None or until is None):
        return []
    first = since or date.fromisoformat(min(found))
    last = until or date.fromisoformat(max(found))
    out = []
    day = first
    while day <= last:
        count, messages = found.get(day.isoformat(), (0, 0))
        out.append({"date": day.isoformat(), "conversations": count, "messages": messages})
        day += timedelta(days=1)
    return out


def _distribution(connection: Connection, value: Any, source: Any, scope: Any) -> dict[str, Any]:
    """Count, mean, median and p90 of a column from its GROUP BY distribution.

    Response times are stored rounded to the millisecond, so grouping loses nothing: the percentiles
    are exactly percentile_cont's, and one query serves both databases.
    """
    rows = connection.execute(
        select(value.label("v"), func.count())
        .select_from(source)
        .where(scope)
        .group_by(value)
        .order_by(value)
    ).all()
    distribution = [(float(v), n) for v, n in rows]
    count = sum(n for _, n in distribution)
    return {
        "count": count,
        "mean": sum(v * n for v, n in distribution) / count if count else None,
        "median": percentile_from_distribution(distribution, 0.5),
        "p90": percentile_from_distribution(distribution, 0.9),
    }


def _response_pairs(connection: Connection, where: list[ColumnElement[bool]]) -> dict[str, Any]:
    """Every timed user→assistant step of the set, unnested from the per-conversation arrays."""
    scope = and_(true(), *where, c.c.response_seconds.is_not(None))
    if connection.dialect.name == "postgresql":
        pairs = func.jsonb_array_elements_text(c.c.response_seconds).table_valued("value").alias("pair")
        source = c.join(pairs, text("true"))
    else:
        pairs = func.json_each(c.c.response_seconds).table_valued("value").alias("pair")
        source = c.join(pairs, text("1=1"))
    return _distribution(connection, func.cast(pairs.c.value, _float()), source, scope)


def _float() -> Any:
    from sqlalchemy import Float

    return Float()
