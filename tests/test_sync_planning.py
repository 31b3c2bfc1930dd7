"""Which days a run fetches, and how they are grouped into windows."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from chatsync.sync import Window, days_to_fetch, plan_windows

D = date(2024, 5, 10)


def _at(day: date, hours: float) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(hours=hours)


def test_never_fetched_days_are_fetched() -> None:
    assert days_to_fetch(D, D + timedelta(days=2), {}, timedelta(days=3), False) == [
        D,
        D + timedelta(days=1),
        D + timedelta(days=2),
    ]


def test_a_day_settles_once_fetched_lookback_after_it_ended() -> None:
    lookback = timedelta(days=3)
    settled = {D: _at(D, 24 * 4 + 1)}  # fetched 3 days and an hour after the day ended
    recent = {D: _at(D, 24 * 2)}  # fetched only a day after it ended: it may still grow
    assert days_to_fetch(D, D, settled, lookback, False) == []
    assert days_to_fetch(D, D, recent, lookback, False) == [D]
    assert days_to_fetch(D, D, settled, lookback, True) == [D]  # --full


def test_windows_group_consecutive_days_only() -> None:
    days = [D, D + timedelta(days=1), D + timedelta(days=5)]
    assert plan_windows(days, parallel=1) == [
        Window(D, D + timedelta(days=1)),
        Window(D + timedelta(days=5), D + timedelta(days=5)),
    ]


def test_long_ranges_get_longer_windows_but_enough_of_them_to_overlap() -> None:
    days = [D + timedelta(days=i) for i in range(60)]
    windows = plan_windows(days, parallel=8)
    assert 8 <= len(windows) <= 16
    assert [d for w in windows for d in w.days] == days
    assert plan_windows([D + timedelta(days=i) for i in range(4)], parallel=8) == [
        Window(D + timedelta(days=i), D + timedelta(days=i)) for i in range(4)
    ]
