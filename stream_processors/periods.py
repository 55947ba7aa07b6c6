"""Budget periods in event time: a calendar day, an ISO week starting on Monday, or a calendar
month, in UTC or in an IANA timezone (boundaries at that zone's local midnights, still stored as
UTC milliseconds); and rolling windows kept as 60 slots of window/60.

Periods are computed here rather than with faust's windowed tables, which expire windows by wall
clock and drop late events.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cached_property, lru_cache
from zoneinfo import ZoneInfo

from agentledger.schemas import Period

__all__ = [
    "DAY_MS",
    "ROLLING_SLOTS",
    "WEEK_MS",
    "PeriodWindow",
    "parse_period_key",
    "period_window",
    "rolling_slot_ms",
    "rolling_window",
    "slot_start",
]

DAY_MS = 24 * 3600 * 1000
WEEK_MS = 7 * DAY_MS
# The unix epoch fell on a Thursday, so Mondays are 4 days off a multiple of a week.
_MONDAY_SHIFT_MS = 4 * DAY_MS
# A rolling window is summed from this many slots of window/ROLLING_SLOTS each, so it slides
# in steps of 1/60 of its length (24h: 24-minute steps) with bounded state.
ROLLING_SLOTS = 60
# datetime cannot represent instants outside years 1..9999; zoned periods there fall back to
# UTC boundaries.
_ZONED_MAX_MS = int(datetime(9999, 11, 30, tzinfo=UTC).timestamp()) * 1000
_ZONED_MIN_MS = int(datetime(2, 1, 1, tzinfo=UTC).timestamp()) * 1000


@dataclass(frozen=True)
class PeriodWindow:
    """One period: ``start_ms`` inclusive, ``end_ms`` exclusive, in UTC milliseconds.

    ``tz`` names the zone whose midnights bound a calendar period.
    """

    period: Period
    start_ms: int
    end_ms: int
    tz: str = "UTC"

    @cached_property  # built for every bucket of every event: worth keeping
    def key(self) -> str:
        """How the period is named in the spend state: ``day:1767225600000`` in UTC,
        ``day@Europe/Paris:1767222000000`` in another zone."""
        zone = "" if self.tz == "UTC" else f"@{self.tz}"
        return f"{self.period.value}{zone}:{self.start_ms}"

    def contains(self, ts_ms: int) -> bool:
        return self.start_ms <= ts_ms < self.end_ms


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _local_midnight_ms(day: date, zone: ZoneInfo) -> int:
    # fold=0: where DST skips midnight the day starts at the transition instant itself.
    return int(datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()) * 1000


def _zoned_window(period: Period, ts_ms: int, tz: str) -> PeriodWindow:
    zone = _zone(tz)
    local = datetime.fromtimestamp(ts_ms // 1000, tz=zone).date()
    if period is Period.DAY:
        first, last = local, local + timedelta(days=1)
    elif period is Period.WEEK:
        first = local - timedelta(days=local.weekday())
        last = first + timedelta(days=7)
    else:
        first = local.replace(day=1)
        last = (first + timedelta(days=32)).replace(day=1)
    return PeriodWindow(period, _local_midnight_ms(first, zone), _local_midnight_ms(last, zone), tz)


# The last window computed per (period, zone): events mostly fall in the current period, and
# computing a zoned window (datetime and zoneinfo) was most of the cost of counting an event.
_LAST: dict[tuple[Period, str], PeriodWindow] = {}


def period_window(period: Period, ts_ms: int, tz: str = "UTC") -> PeriodWindow:
    """The calendar period of kind ``period`` in zone ``tz`` that contains the instant
    ``ts_ms``."""
    last = _LAST.get((period, tz))
    if last is not None and last.start_ms <= ts_ms < last.end_ms:
        return last
    window = _period_window(period, ts_ms, tz)
    if len(_LAST) > 256:  # zones come from policies, so few; bound it anyway
        _LAST.clear()
    _LAST[(period, tz)] = window
    return window


def _period_window(period: Period, ts_ms: int, tz: str) -> PeriodWindow:
    if tz != "UTC" and period in (Period.DAY, Period.WEEK, Period.MONTH):
        if _ZONED_MIN_MS <= ts_ms < _ZONED_MAX_MS:
            return _zoned_window(period, ts_ms, tz)
        utc = period_window(period, ts_ms)
        return PeriodWindow(period, utc.start_ms, utc.end_ms, tz)
    if period is Period.DAY:
        start = ts_ms - ts_ms % DAY_MS
        return PeriodWindow(period, start, start + DAY_MS)
    if period is Period.WEEK:
        start = ts_ms - (ts_ms - _MONDAY_SHIFT_MS) % WEEK_MS
        return PeriodWindow(period, start, start + WEEK_MS)
    if period is Period.MONTH:
        year, month, _ = _civil_from_days(ts_ms // DAY_MS)
        start = _days_from_civil(year, month, 1) * DAY_MS
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        return PeriodWindow(period, start, _days_from_civil(year, month, 1) * DAY_MS)
    raise ValueError(f"period must be day, week or month, got {period!r}")


def rolling_slot_ms(window_ms: int) -> int:
    """The slot length of a rolling window (whole minutes, so the slot is whole seconds)."""
    return max(window_ms // ROLLING_SLOTS, 1)


def slot_start(ts_ms: int, slot_ms: int) -> int:
    return ts_ms - ts_ms % slot_ms


def rolling_window(window_ms: int, now_ms: int) -> PeriodWindow:
    """The rolling window at ``now_ms``: the ROLLING_SLOTS slots up to and including the one
    holding ``now_ms``, i.e. ``[end - window, end)`` with ``end`` the current slot's end."""
    slot = rolling_slot_ms(window_ms)
    end = slot_start(now_ms, slot) + slot
    return PeriodWindow(Period.ROLLING, end - slot * ROLLING_SLOTS, end)


# Proleptic Gregorian calendar arithmetic (H. Hinnant's algorithms), because datetime stops
# at year 9999 and event times may legally lie beyond it.
def _days_from_civil(year: int, month: int, day: int) -> int:
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(days: int) -> tuple[int, int, int]:
    days += 719468
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + (3 if mp < 10 else -9)
    return yoe + era * 400 + (month <= 2), month, day


def parse_period_key(key: str) -> PeriodWindow:
    """Invert :attr:`PeriodWindow.key`; raise ValueError naming what is wrong."""
    head, sep, start_text = key.rpartition(":")
    if not sep:
        raise ValueError(
            f"period key must look like '<day|week|month>[@zone]:<start_ms>', got {key!r}"
        )
    kind, _, tz = head.partition("@")
    try:
        period = Period(kind)
    except ValueError:
        period = None
    if period not in (Period.DAY, Period.WEEK, Period.MONTH):
        raise ValueError(f"period key {key!r}: kind must be day, week or month")
    if tz:
        try:
            _zone(tz)
        except (ValueError, KeyError):
            raise ValueError(f"period key {key!r}: {tz!r} is not a known timezone") from None
    try:
        start = int(start_text)
    except ValueError:
        raise ValueError(f"period key {key!r}: start must be integer milliseconds") from None
    assert period is not None
    window = period_window(period, start, tz or "UTC")
    if window.start_ms != start:
        raise ValueError(f"period key {key!r}: {start} is not the start of a {kind}")
    return window
