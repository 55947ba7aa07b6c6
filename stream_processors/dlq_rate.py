"""A high dead-letter rate raises an alert: bad input is counted per worker over a sliding
minute, and more than the limit raises one ``dlq_rate`` Alert (scope ``processor:dlq``), then
at most one more per cooldown while the rate stays high.

Per worker and in memory: a restart starts counting afresh, which can only delay an alert.
"""

from __future__ import annotations

from collections import deque

from agentledger.config import Settings
from agentledger.schemas import Alert, AlertKind, Severity

__all__ = ["DLQ_ALERT_SCOPE", "DlqRate"]

DLQ_ALERT_SCOPE = "processor:dlq"


class DlqRate:
    """Counts dead letters in the last ``window_ms`` (wall clock, injected by the caller)."""

    def __init__(
        self,
        *,
        max_per_window: int = 100,
        window_ms: int = 60_000,
        cooldown_ms: int = 600_000,
    ) -> None:
        if max_per_window < 1 or window_ms < 1 or cooldown_ms < 0:
            raise ValueError("max_per_window and window_ms must be >= 1, cooldown_ms >= 0")
        self.max_per_window = max_per_window
        self.window_ms = window_ms
        self.cooldown_ms = cooldown_ms
        # Only the newest max_per_window + 1 times matter to tell whether the limit is passed.
        self._times: deque[int] = deque(maxlen=max_per_window + 1)
        self._alerted_at: int | None = None
        self.total = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> DlqRate:
        """The limits from ``AGENTLEDGER_DLQ_ALERT_MAX``, ``_WINDOW_S`` and ``_COOLDOWN_S``."""
        return cls(
            max_per_window=settings.dlq_alert_max,
            window_ms=settings.dlq_alert_window_s * 1000,
            cooldown_ms=settings.dlq_alert_cooldown_s * 1000,
        )

    def record(self, now_ms: int, reason: str) -> Alert | None:
        """Count one dead letter; return the alert to raise, if the rate is now too high."""
        self.total += 1
        self._times.append(now_ms)
        full = len(self._times) > self.max_per_window
        if not full or self._times[0] <= now_ms - self.window_ms:
            return None
        if self._alerted_at is not None and now_ms < self._alerted_at + self.cooldown_ms:
            return None
        self._alerted_at = now_ms
        seconds = self.window_ms // 1000
        return Alert(
            kind=AlertKind.DLQ_RATE,
            severity=Severity.WARNING,
            scope=DLQ_ALERT_SCOPE,
            message=(
                f"more than {self.max_per_window} records dead-lettered within {seconds}s "
                f"by this processor ({self.total} since it started); latest reason: "
                f"{reason[:300]}"
            ),
            issued_at_ms=now_ms,
            details={
                "max_per_window": self.max_per_window,
                "window_ms": self.window_ms,
                "total": self.total,
            },
        )
