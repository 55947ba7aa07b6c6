"""Budget periods in UTC event time: a calendar day, or an ISO week starting on Monday.

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
    raise ValueError(f"period must be one of {[p.value for p in Period]}, got {period!r}")


def parse_period_key(key: str) -> PeriodWindow:
    """Invert :attr:`PeriodWindow.key`; raise ValueError naming what is wrong."""
    kind, sep, start_text = key.partition(":")
    if not sep:
        raise ValueError(f"period key must look like '<day|week>:<start_ms>', got {key!r}")
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
