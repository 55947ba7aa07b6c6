"""Burn rate and end-of-period forecast of one scope's spend, in exact integer nano-USD.

The rate comes from the dashboard's own recent samples of the live spend (what the processor
reports), so it follows a runaway within seconds. Before there are samples spanning
MIN_WINDOW_MS, the period's average rate so far stands in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = [
    "HOUR_MS",
    "MIN_WINDOW_MS",
    "RATE_WINDOW_MS",
    "Forecast",
    "SpendSamples",
    "forecast",
]

HOUR_MS = 3_600_000
RATE_WINDOW_MS = 5 * 60 * 1000  # the recent rate looks this far back
MIN_WINDOW_MS = 5_000  # shorter spans are too noisy to call a rate


@dataclass(frozen=True)
class Forecast:
    rate_nano_per_hour: int
    rate_source: str  # "recent" (samples) or "period" (average since the period began)
    projected_nano: int  # spend at the period's end if the rate holds
    exhausts_at_ms: int | None  # when the limit is reached at this rate, if within the period


class SpendSamples:
    """Recent (time, spend) samples of one scope's period; a new period starts afresh."""

    def __init__(self, window_ms: int = RATE_WINDOW_MS) -> None:
        self.window_ms = window_ms
        self._period_start: int | None = None
        self._samples: deque[tuple[int, int]] = deque()

    def add(self, now_ms: int, period_start_ms: int, spend_nano: int) -> None:
        if period_start_ms != self._period_start:
            self._period_start = period_start_ms
            self._samples.clear()
        if self._samples and now_ms <= self._samples[-1][0]:
            return  # a clock that did not move says nothing about a rate
        self._samples.append((now_ms, spend_nano))
        while len(self._samples) > 2 and self._samples[1][0] <= now_ms - self.window_ms:
            self._samples.popleft()

    def rate_nano_per_hour(self) -> int | None:
        """Spend per hour over the samples, or None when they span less than MIN_WINDOW_MS."""
        if len(self._samples) < 2:
            return None
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        if t1 - t0 < MIN_WINDOW_MS:
            return None
        return max(0, s1 - s0) * HOUR_MS // (t1 - t0)


def forecast(
    *,
    spend_nano: int,
    limit_nano: int | None,
    start_ms: int,
    end_ms: int,
    now_ms: int,
    recent_rate_nano_per_hour: int | None,
) -> Forecast:
    """Project the spend to the period's end at the recent rate (else the period's average)."""
    if end_ms <= start_ms:
        raise ValueError(f"period end_ms {end_ms} must be after start_ms {start_ms}")
    now_ms = min(max(now_ms, start_ms), end_ms)
    if recent_rate_nano_per_hour is not None:
        rate, source = max(0, recent_rate_nano_per_hour), "recent"
    else:
        elapsed = now_ms - start_ms
        rate = spend_nano * HOUR_MS // elapsed if elapsed > 0 else 0
        source = "period"
    remaining_ms = end_ms - now_ms
    projected = spend_nano + rate * remaining_ms // HOUR_MS
    exhausts: int | None = None
    if limit_nano is not None:
        if spend_nano >= limit_nano:
            exhausts = now_ms
        elif rate > 0:
            # Ceiling division: the first whole millisecond at which the limit is reached.
            at = now_ms + -(-(limit_nano - spend_nano) * HOUR_MS // rate)
            exhausts = at if at <= end_ms else None
    return Forecast(rate, source, projected, exhausts)
