"""Budget periods: day, ISO week (Monday) and month in UTC or an IANA zone, and rolling windows,
from event-time milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentledger.schemas import Period
from agentledger.schemas.policy import CALENDAR_PERIODS
from agentledger.stream_processors.periods import (
    DAY_MS,
    ROLLING_SLOTS,
    WEEK_MS,
    parse_period_key,
    period_window,
    rolling_slot_ms,
    rolling_window,
)


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def test_day_window_of_a_known_instant() -> None:
    window = period_window(Period.DAY, ms("2026-03-04T17:30:00.123"))
    assert window.start_ms == ms("2026-03-04T00:00:00")
    assert window.end_ms == ms("2026-03-05T00:00:00")
    assert window.key == f"day:{ms('2026-03-04T00:00:00')}"


def test_day_boundaries_are_start_inclusive_end_exclusive() -> None:
    midnight = ms("2026-03-05T00:00:00")
    assert period_window(Period.DAY, midnight).start_ms == midnight
    assert period_window(Period.DAY, midnight - 1).end_ms == midnight
    assert period_window(Period.DAY, midnight - 1).start_ms == midnight - DAY_MS


def test_week_starts_on_monday() -> None:
    # 2026-03-04 is a Wednesday; its ISO week runs Monday 2026-03-02 .. Monday 2026-03-09.
    window = period_window(Period.WEEK, ms("2026-03-04T12:00:00"))
    assert window.start_ms == ms("2026-03-02T00:00:00")
    assert window.end_ms == ms("2026-03-09T00:00:00")
    sunday_last_ms = ms("2026-03-09T00:00:00") - 1
    assert period_window(Period.WEEK, sunday_last_ms).start_ms == ms("2026-03-02T00:00:00")
    assert period_window(Period.WEEK, ms("2026-03-09T00:00:00")).start_ms == ms(
        "2026-03-09T00:00:00"
    )


def test_week_before_the_first_epoch_monday() -> None:
    # 1970-01-01 was a Thursday, so its week began on Monday 1969-12-29.
    window = period_window(Period.WEEK, 0)
    assert window.start_ms == ms("1969-12-29T00:00:00")


# datetime stops at year 9999, a little before the 48-bit limit of event_time_ms.
YEAR_10000_MS = 253_402_300_800_000


@given(
    st.integers(min_value=0, max_value=YEAR_10000_MS - WEEK_MS - 1),
    st.sampled_from(CALENDAR_PERIODS),
)
def test_every_instant_lies_in_its_window(ts: int, period: Period) -> None:
    window = period_window(period, ts)
    assert window.contains(ts)
    start = datetime.fromtimestamp(window.start_ms / 1000, tz=UTC)
    assert (start.hour, start.minute, start.second) == (0, 0, 0)
    if period is Period.MONTH:
        assert start.day == 1
        assert 28 * DAY_MS <= window.end_ms - window.start_ms <= 31 * DAY_MS
        following = period_window(Period.MONTH, window.end_ms)
        assert following.start_ms == window.end_ms
    else:
        assert window.end_ms - window.start_ms == (DAY_MS if period is Period.DAY else WEEK_MS)
    if period is Period.WEEK:
        assert start.isoweekday() == 1
    assert parse_period_key(window.key) == window


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("day", "must look like"),
        ("year:0", "kind must be day, week or month"),
        (f"month:{ms('2026-03-02T00:00:00')}", "not the start of a month"),
        ("day:abc", "integer milliseconds"),
        (f"day:{DAY_MS + 5}", "not the start of a day"),
        (f"week:{ms('2026-03-04T00:00:00')}", "not the start of a week"),
    ],
)
def test_bad_period_keys_are_named(key: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_period_key(key)


def test_month_windows_follow_the_calendar() -> None:
    feb = period_window(Period.MONTH, ms("2028-02-29T23:59:59"))
    assert (feb.start_ms, feb.end_ms) == (ms("2028-02-01T00:00:00"), ms("2028-03-01T00:00:00"))
    dec = period_window(Period.MONTH, ms("2026-12-31T12:00:00"))
    assert (dec.start_ms, dec.end_ms) == (ms("2026-12-01T00:00:00"), ms("2027-01-01T00:00:00"))
    before_epoch = period_window(Period.MONTH, -1)
    assert before_epoch.start_ms == ms("1969-12-01T00:00:00")


def test_month_beyond_year_9999_does_not_fail() -> None:
    # event_time_ms may reach 2**48 - 1 (year 10889), past what datetime can hold.
    window = period_window(Period.MONTH, (1 << 48) - 1)
    assert window.contains((1 << 48) - 1)
    assert parse_period_key(window.key) == window


ZONES = ["Europe/Paris", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu", "Pacific/Chatham"]


# Zoned periods use datetime, which ends at year 9999; beyond, boundaries fall back to UTC.
ZONED_MAX_MS = ms("9999-09-01T00:00:00")


@given(
    st.integers(min_value=0, max_value=ZONED_MAX_MS),
    st.sampled_from(CALENDAR_PERIODS),
    st.sampled_from(ZONES),
)
def test_zoned_periods_start_at_local_midnight(ts: int, period: Period, tz: str) -> None:
    window = period_window(period, ts, tz)
    assert window.contains(ts)
    zone = ZoneInfo(tz)
    start = datetime.fromtimestamp(window.start_ms / 1000, tz=zone)
    end = datetime.fromtimestamp(window.end_ms / 1000, tz=zone)
    # Local midnight, unless DST skipped it (then the first instant after the gap).
    assert start.time() <= datetime(2000, 1, 1, 1).time(), start
    assert end.date() > start.date()
    if period is Period.WEEK:
        assert start.isoweekday() == 1 and end.date() - start.date() == timedelta(days=7)
    if period is Period.MONTH:
        assert start.day == 1 and end.day == 1
    following = period_window(period, window.end_ms, tz)
    assert following.start_ms == window.end_ms
    assert parse_period_key(window.key) == window


def test_zoned_day_is_the_local_day_across_dst() -> None:
    paris = "Europe/Paris"
    # 2026-03-29: clocks go from 02:00 to 03:00 in Paris, so that day has 23 hours.
    window = period_window(Period.DAY, ms("2026-03-29T12:00:00"), paris)
    assert window.start_ms == ms("2026-03-28T23:00:00")
    assert window.end_ms == ms("2026-03-29T22:00:00")
    assert window.key == f"day@{paris}:{window.start_ms}"
    # 23:30 UTC on a Sunday is already Monday in Paris: a new ISO week there, not in UTC.
    sunday_late = ms("2026-03-01T23:30:00")
    assert period_window(Period.WEEK, sunday_late, paris).start_ms == sunday_late - 30 * 60_000
    assert period_window(Period.WEEK, sunday_late).start_ms == ms("2026-02-23T00:00:00")
    kolkata = period_window(Period.MONTH, ms("2026-02-28T19:00:00"), "Asia/Kolkata")
    assert kolkata.start_ms == ms("2026-02-28T18:30:00")  # March 1st, 00:00 at +05:30


def test_bad_zoned_keys_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="not a known timezone"):
        parse_period_key("day@Mars/Olympus:0")
    with pytest.raises(ValueError, match="kind must be day, week or month"):
        parse_period_key("rolling:0")


@given(st.integers(min_value=1, max_value=7 * 24 * 60), st.integers(0, YEAR_10000_MS))
def test_rolling_window_is_sixty_slots_ending_with_now(minutes: int, now: int) -> None:
    window_ms = minutes * 60_000
    slot = rolling_slot_ms(window_ms)
    assert slot * ROLLING_SLOTS == window_ms
    window = rolling_window(window_ms, now)
    assert window.end_ms - window.start_ms == window_ms
    assert window.end_ms - slot <= now < window.end_ms
    assert window.start_ms % slot == 0
