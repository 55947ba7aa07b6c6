"""Budget periods in UTC event time: a calendar day, an ISO week starting on Monday, or a
calendar month.

Periods are computed here rather than with faust's windowed tables, which expire windows by wall
clock and drop late events.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentledger.schemas import Period

__all__ = ["DAY_MS", "WEEK_MS", "PeriodWindow", "parse_period_key", "period_window"]

DAY_MS = 24 * 3600 * 1000
WEEK_MS = 7 * DAY_MS
# The unix epoch fell on a Thursday, so Mondays are 4 days off a multiple of a week.
_MONDAY_SHIFT_MS = 4 * DAY_MS


@dataclass(frozen=True)
class PeriodWindow:
    """One calendar period: ``start_ms`` inclusive, ``end_ms`` exclusive."""

    period: Period
    start_ms: int
    end_ms: int

    @property
    def key(self) -> str:
        """How the period is named in the spend state, e.g. ``day:1767225600000``."""
        return f"{self.period.value}:{self.start_ms}"

    def contains(self, ts_ms: int) -> bool:
        return self.start_ms <= ts_ms < self.end_ms


def period_window(period: Period, ts_ms: int) -> PeriodWindow:
    """The period of kind ``period`` that contains the UTC instant ``ts_ms``."""
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
    raise ValueError(f"period must be one of {[p.value for p in Period]}, got {period!r}")


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
    kind, sep, start_text = key.partition(":")
    if not sep:
        raise ValueError(f"period key must look like '<day|week|month>:<start_ms>', got {key!r}")
    try:
        period = Period(kind)
    except ValueError:
        raise ValueError(
            f"period key {key!r}: kind must be one of {[p.value for p in Period]}"
        ) from None
    try:
        start = int(start_text)
    except ValueError:
        raise ValueError(f"period key {key!r}: start must be integer milliseconds") from None
    window = period_window(period, start)
    if window.start_ms != start:
        raise ValueError(f"period key {key!r}: {start} is not the start of a {kind}")
    return window
