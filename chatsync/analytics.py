"""The metrics of docs/metrics.md as aggregate SQL over stored columns; one implementation, two renderers.

Per-conversation figures (message counts, response times, the WhatsApp outcome) are computed at sync
time, and every write keeps rollups of them (chatsync.store.rollups), so a report is a handful of
aggregate queries and no conversation is loaded into Python. The rollups answer what they can: counters
by UTC hour for any window in a whole-hour zone, distributions and users for all time; the rest is
aggregated from the conversations in the window. Medians and p90 come from exact value counts
(response times are stored to the millisecond), interpolating like percentile_cont.

SQLite has no time zones, so local days and hours come from the zone's UTC offsets over the data's span,
written into the query as a CASE over offset segments: still one SQL query, exact across DST changes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, and_, case, false, func, literal_column, select, text, true
from sqlalchemy.sql import ColumnElement

from chatsync.store.leads import count_leads
from chatsync.store.queries import ConversationFilter, conditions
from chatsync.store.rollups import REPLIED, TAKEN_OVER
from chatsync.store.tables import ROLLUP_COUNTERS, report_hours, report_users, report_values
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
STATUSES = ("ongoing", "ended", TAKEN_OVER, "paused")  # Chatbase's conversation statuses (API v2)
# What the daily series adds up per local hour: conversation and message counts, and the answers' feedback.
HOUR_SERIES = (
    "conversations",
    "messages",
    "answers_feedback_known",
    "answers_rated_up",
    "answers_rated_down",
)
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
@dataclass
class Hourly:
    """The figures that add up hour by hour: what the hour rollup holds."""

    totals: dict[str, int]  # ROLLUP_COUNTERS summed over the set
    hours: list[tuple[str, list[int]]]  # (local "YYYY-MM-DD HH", HOUR_SERIES summed over that hour)
    by_source: dict[str, int]


@dataclass
class Spread:
    """Distributions and distinct users: exact only from value counts or from the conversations."""

    users: int
    lengths: list[tuple[int, int]]  # (message count, conversations), ascending
    pairs: list[tuple[float, int]]  # (seconds, steps), ascending
    first: list[tuple[float, int]]
    by_country: dict[str, int]
    by_phone_region: dict[str, int]
    by_status: dict[str, int]  # conversations per Chatbase status, of those that carry one


def report(
    connection: Connection,
    filters: ConversationFilter,
    since: date | None = None,
    until: date | None = None,
    tz: str = "UTC",
) -> dict[str, Any]:
    """The analytics object of docs/metrics.md for conversations created in local days since..until.

    The rollups answer whatever they can for a filter by chatbot and source: the hourly figures for any
    window in a zone whose offsets are whole hours, the distributions and users for all time. The rest
    is aggregated from the conversations, and the tests hold both to the same figures.
    """
    from chatsync.errors import UsageError
    from chatsync.timeutil import check_day

    for bound in (since, until):
        if bound is not None:
            check_day(bound)
    if since and until and (until - since).days > MAX_WINDOW_DAYS:
        raise UsageError("the report window is longer than 20 years: narrow --since/--until")
    start, end = local_window(since, until, tz)
    window = replace(filters, since=None, until=None, created_from=start, created_before=end)
    where = conditions(window, connection.dialect.name)
    covered = rollups_cover(filters)
    hourly = _hourly_from_rollups(connection, filters, tz, start, end) if covered else None
    if hourly is None:
        hourly = _hourly_from_conversations(connection, tz, where)
    if covered and start is None and end is None:
        spread = _spread_from_rollups(connection, filters)
    else:
        spread = _spread_from_conversations(connection, where)
    leads = count_leads(connection, filters, start, end)
    return _assemble(hourly, spread, leads, since, until, tz)


def rollups_cover(filters: ConversationFilter) -> bool:
    """Whether the rollups can answer for this filter: they know chatbot, source and hour, nothing more."""
    return filters == ConversationFilter(
        chatbot_ids=filters.chatbot_ids,
        sources=filters.sources,
        visible_chatbot_ids=filters.visible_chatbot_ids,
    )


def _assemble(
    h: Hourly, s: Spread, leads: int | None, since: date | None, until: date | None, tz: str
) -> dict[str, Any]:
    t = h.totals
    n = t["conversations"]
    daily: dict[str, list[int]] = {}
    grid = [[0] * 24 for _ in range(7)]
    for key, sums in h.hours:
        local_day, hour = key[:10], int(key[11:13])
        day = daily.get(local_day)
        daily[local_day] = sums if day is None else [a + b for a, b in zip(day, sums, strict=True)]
        grid[date.fromisoformat(local_day).weekday()][hour] += sums[0]
    pairs, first = _summary(s.pairs), _summary(s.first)
    answers = t["answers_feedback_known"] if t["with_feedback"] else None
    return {
        "window": {
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
            "timezone": tz,
        },
        "conversations": n,
        "messages": t["messages"],
        "user_messages": t["user_messages"],
        "assistant_messages": t["assistant_messages"],
        "users": s.users,
        "users_coverage": _rate(t["keyed"], n),
        "engagement_rate": _rate(t["engaged"], n),
        "messages_per_conversation": {
            "mean": _round2(t["messages"] / n if n else None),
            "median": _round2(percentile_from_distribution(s.lengths, 0.5)),
        },
        "length_histogram": {
            label: sum(count for value, count in s.lengths if value >= lo and (hi is None or value <= hi))
            for label, lo, hi in LENGTH_BUCKETS
        },
        "response_time_seconds": {
            "mean": _round2(pairs["mean"]),
            "median": _round2(pairs["median"]),
            "p90": _round2(pairs["p90"]),
            "pairs": pairs["count"],
            "coverage": _rate(t["with_pairs"], t["with_steps"]),
        },
        "first_response_time_seconds": {
            "mean": _round2(first["mean"]),
            "median": _round2(first["median"]),
            "p90": _round2(first["p90"]),
            "coverage": _rate(t["with_first"], t["with_steps"]),
        },
        "unanswered_rate": _rate(t["unanswered"], n),
        "feedback": {
            "answers": answers,
            "rated_up": t["answers_rated_up"] if answers is not None else None,
            "rated_down": t["answers_rated_down"] if answers is not None else None,
            "rated_up_share": _rate(t["answers_rated_up"], answers or 0),
            "rated_down_share": _rate(t["answers_rated_down"], answers or 0),
            "coverage": _rate(t["with_feedback"], n),
        },
        "takeover_rate": _rate(t["taken_over"], t["with_status"]),
        "status_coverage": _rate(t["with_status"], n),
        "by_status": _statuses(s.by_status) if t["with_status"] else None,
        "by_source": h.by_source,
        "by_country": s.by_country,
        "by_phone_region": s.by_phone_region,
        "by_day": _days(daily, since, until),
        "by_weekday_hour": grid,
        "whatsapp": {
            "prompted": t["prompted"],
            "replied": t["replied"],
            "captured": t["captured"],
            "capture_rate": _rate(t["captured"], t["prompted"]),
            "manual": t["manual"],
            "from_form": t["from_form"],
            "from_channel": t["from_channel"],
            "from_lead": t["from_lead"],
            "with_number": t["with_number"],
            "missed": {o: t[f"missed_{o}"] for o in MISSED},
            "leads": leads,
        },
    }


def _statuses(counts: dict[str, int]) -> dict[str, int]:
    """Chatbase's four statuses in their order (0 where none has it), then any other status it sent."""
    return {
        **{status: counts.get(status, 0) for status in STATUSES},
        **_ranked((k, n) for k, n in counts.items() if k not in STATUSES),
    }


def _ranked(counts: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Most first, then by name: the same order whichever database or path produced the counts."""
    return dict(sorted(((str(k), int(n)) for k, n in counts if n), key=lambda kv: (-kv[1], kv[0])))


# ----------------------------------------------------------------------------------------- from rollups
def _rollup_scope(table: Any, filters: ConversationFilter) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if filters.visible_chatbot_ids is not None:
        visible = filters.visible_chatbot_ids
        where.append(table.c.chatbot_id.in_(visible) if visible else false())
    if filters.chatbot_ids:
        where.append(table.c.chatbot_id.in_(filters.chatbot_ids))
    if filters.sources:
        where.append(
            table.c.source.in_([*filters.sources, *([""] if "Unspecified" in filters.sources else [])])
        )
    return where


def _hourly_from_rollups(
    connection: Connection,
    filters: ConversationFilter,
    tz: str,
    start: datetime | None,
    end: datetime | None,
) -> Hourly | None:
    """Counters, local hours and sources from the hour rollup; None where UTC hours straddle local hours.

    Zones whose offsets are whole hours (nearly all) start every local day and hour on a UTC hour, so
    whole rollup hours make up any window exactly. India, Nepal or Newfoundland do not.
    """
    h = report_hours
    scope = _rollup_scope(h, filters)
    if start is not None:
        scope.append(h.c.hour >= start)
    if end is not None:
        scope.append(h.c.hour < end)
    rows = connection.execute(
        select(h.c.hour, *[func.sum(h.c[k]) for k in HOUR_SERIES])
        .where(*scope, h.c.conversations > 0)
        .group_by(h.c.hour)
    ).all()
    moments = [as_utc(row[0]) for row in rows]
    if moments or (start and end):
        first, last = start or min(moments), end or max(moments) + timedelta(hours=1)
        if any(minutes % 60 or moment.minute for moment, minutes in offset_segments(tz, first, last)):
            return None
    totals = (
        connection.execute(
            select(*[func.coalesce(func.sum(h.c[k]), 0).label(k) for k in ROLLUP_COUNTERS]).where(*scope)
        )
        .one()
        ._mapping
    )
    sources = connection.execute(
        select(h.c.source, func.sum(h.c.conversations)).where(*scope).group_by(h.c.source)
    ).all()
    zone = ZoneInfo(tz)
    return Hourly(
        totals={k: int(v) for k, v in totals.items()},
        hours=[
            (moment.astimezone(zone).strftime("%Y-%m-%d %H"), list(map(int, row[1:])))
            for moment, row in zip(moments, rows, strict=True)
        ],
        by_source=_ranked((source or "Unspecified", n) for source, n in sources),
    )


def _spread_from_rollups(connection: Connection, filters: ConversationFilter) -> Spread:
    """All-time distributions and users from their rollups: thousands of rows, not every conversation."""
    keys = (
        select(report_users.c.user_key)
        .where(*_rollup_scope(report_users, filters), report_users.c.n > 0)
        .group_by(report_users.c.user_key)
        .subquery()
    )
    values: dict[str, list[tuple[str, int]]] = {}
    for metric, value, n in connection.execute(
        select(report_values.c.metric, report_values.c.value, func.sum(report_values.c.n))
        .where(*_rollup_scope(report_values, filters))
        .group_by(report_values.c.metric, report_values.c.value)
    ):
        values.setdefault(metric, []).append((value, int(n)))

    def numeric(metric: str, kind: type) -> list[Any]:
        return sorted((kind(v), n) for v, n in values.get(metric, []) if n)

    return Spread(
        users=connection.execute(select(func.count()).select_from(keys)).scalar_one(),
        lengths=numeric("length", int),
        pairs=numeric("response", float),
        first=numeric("first_response", float),
        by_country=_ranked(values.get("country", [])),
        by_phone_region=_ranked(values.get("region", [])),
        by_status=_ranked(values.get("status", [])),
    )


# ------------------------------------------------------------------------------------ from conversations
def _hourly_from_conversations(connection: Connection, tz: str, where: list[ColumnElement[bool]]) -> Hourly:
    """Counters per source in one GROUP BY, and local hours in another."""

    def count_if(condition: Any) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    outcome = c.c.wa_outcome
    counted = {
        "conversations": func.count(),
        "messages": func.coalesce(func.sum(c.c.message_count), 0),
        "user_messages": func.coalesce(func.sum(c.c.user_messages), 0),
        "assistant_messages": func.coalesce(func.sum(c.c.assistant_messages), 0),
        "keyed": count_if(func.coalesce(c.c.whatsapp_number, c.c.customer).is_not(None)),
        "engaged": count_if(c.c.user_messages >= 2),
        "with_steps": count_if(c.c.response_steps > 0),
        "with_pairs": count_if(c.c.response_seconds.is_not(None)),
        "with_first": count_if(c.c.first_response_seconds.is_not(None)),
        "unanswered": count_if(c.c.unanswered.is_(True)),
        "prompted": count_if(outcome != "no_prompt"),
        "replied": count_if(outcome.in_(REPLIED)),
        "captured": count_if(outcome == "captured"),
        "manual": count_if(c.c.whatsapp_source == "manual"),
        "from_form": count_if(c.c.whatsapp_source == "form"),
        "with_number": count_if(c.c.whatsapp_number.is_not(None)),
        "from_channel": count_if(c.c.whatsapp_source == "channel"),
        "from_lead": count_if(c.c.whatsapp_source == "lead"),
        **{f"missed_{o}": count_if(outcome == o) for o in MISSED},
        "with_status": count_if(c.c.status.is_not(None)),
        "taken_over": count_if(c.c.status == TAKEN_OVER),
        "with_feedback": count_if(c.c.answers_feedback_known.is_not(None)),
        "answers_feedback_known": func.coalesce(func.sum(c.c.answers_feedback_known), 0),
        "answers_rated_up": func.coalesce(func.sum(c.c.answers_rated_up), 0),
        "answers_rated_down": func.coalesce(func.sum(c.c.answers_rated_down), 0),
    }
    source = func.coalesce(c.c.source, "Unspecified")
    per_source = connection.execute(
        select(source, *[v.label(k) for k, v in counted.items()]).where(*where).group_by(source)
    ).all()
    totals = {k: sum(int(row._mapping[k]) for row in per_source) for k in ROLLUP_COUNTERS}
    return Hourly(
        totals=totals,
        hours=_conversation_hours(connection, tz, where),
        by_source=_ranked((row[0], row._mapping["conversations"]) for row in per_source),
    )


def _spread_from_conversations(connection: Connection, where: list[ColumnElement[bool]]) -> Spread:
    """Distributions and users of any set, as aggregate SQL over the conversations' stored columns."""
    scope = and_(true(), *where)
    # One GROUP BY over the low-cardinality columns; each breakdown is one of its marginals.
    region = case((c.c.whatsapp_number.is_not(None), func.coalesce(c.c.whatsapp_region, "Unknown")))
    dimensions = [c.c.message_count, func.coalesce(c.c.country, "Unknown"), region, c.c.status]
    lengths: Counter[int] = Counter()
    countries: Counter[str] = Counter()
    regions: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    cells = connection.execute(select(*dimensions, func.count()).where(scope).group_by(*dimensions)).all()
    for cell in cells:
        length, country, phone_region, status, count = cell[0], cell[1], cell[2], cell[3], cell[-1]
        lengths[int(length)] += count
        countries[country] += count
        if phone_region is not None:
            regions[phone_region] += count
        if status is not None:
            statuses[status] += count
    key = func.coalesce(c.c.whatsapp_number, c.c.customer)
    keys = select(key.label("k")).where(scope, key.is_not(None)).group_by(key).subquery()
    return Spread(
        users=connection.execute(select(func.count()).select_from(keys)).scalar_one(),
        lengths=sorted(lengths.items()),
        pairs=_response_pairs(connection, where),
        first=_distribution(
            connection,
            c.c.first_response_seconds,
            c,
            and_(scope, c.c.first_response_seconds.is_not(None)),
        ),
        by_country=_ranked(countries.items()),
        by_phone_region=_ranked(regions.items()),
        by_status=_ranked(statuses.items()),
    )


def _conversation_hours(
    connection: Connection, tz: str, where: list[ColumnElement[bool]]
) -> list[tuple[str, list[int]]]:
    """(local hour, HOUR_SERIES) in one GROUP BY; feeds the daily series and the grid."""
    local = _LocalTime(connection, tz, where)
    sums = {
        "conversations": func.count(),
        "messages": func.coalesce(func.sum(c.c.message_count), 0),
        **{k: func.coalesce(func.sum(c.c[k]), 0) for k in HOUR_SERIES[2:]},
    }
    rows = connection.execute(
        select(local.hour, *[sums[k] for k in HOUR_SERIES]).where(and_(true(), *where)).group_by(local.hour)
    ).all()
    out = []
    for row in rows:
        key = row[0]
        text_key = key.isoformat(sep=" ") if isinstance(key, datetime) else str(key)
        out.append((text_key[:13], [int(v) for v in row[1:]]))
    return out


def _days(found: dict[str, list[int]], since: date | None, until: date | None) -> list[dict[str, Any]]:
    """One row per day of the window, including days with no conversations (HOUR_SERIES per day)."""
    if not found and (since is None or until is None):
        return []
    first = since or date.fromisoformat(min(found))
    last = until or date.fromisoformat(max(found))
    out = []
    day = first
    while day <= last:
        count, messages, answers, up, down = found.get(day.isoformat(), [0] * len(HOUR_SERIES))
        out.append(
            {
                "date": day.isoformat(),
                "conversations": count,
                "messages": messages,
                "rated_up_share": _rate(up, answers),
                "rated_down_share": _rate(down, answers),
            }
        )
        day += timedelta(days=1)
    return out


def _distribution(connection: Connection, value: Any, source: Any, scope: Any) -> list[tuple[float, int]]:
    """A column's values with their counts, ascending, from one GROUP BY.

    Response times are stored rounded to the millisecond, so grouping loses nothing: percentiles over
    the distribution are exactly percentile_cont's, and one query serves both databases.
    """
    rows = connection.execute(
        select(value.label("v"), func.count())
        .select_from(source)
        .where(scope)
        .group_by(value)
        .order_by(value)
    ).all()
    return [(float(v), int(n)) for v, n in rows]


def _summary(distribution: list[tuple[float, int]]) -> dict[str, Any]:
    """Count, mean, median and p90 of a distribution."""
    count = sum(n for _, n in distribution)
    return {
        "count": count,
        "mean": sum(v * n for v, n in distribution) / count if count else None,
        "median": percentile_from_distribution(distribution, 0.5),
        "p90": percentile_from_distribution(distribution, 0.9),
    }


def _response_pairs(connection: Connection, where: list[ColumnElement[bool]]) -> list[tuple[float, int]]:
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
