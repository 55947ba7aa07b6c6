"""Kafka-to-queryable lag of the sink's rows: broker append time -> insert acknowledged.

The calls topic uses LogAppendTime, so a record's Kafka timestamp is when the broker took it;
the worker records, per inserted row, how long after that its insert was acknowledged (the
row is queryable from then on). Kept as a histogram of 10 ms buckets, so p99 over millions of
rows costs a dict, not a list.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable

__all__ = ["BUCKET_MS", "LagHistogram"]

BUCKET_MS = 10


class LagHistogram:
    """Thread-safe: the worker adds, the health endpoint reads."""

    def __init__(self) -> None:
        self._buckets: Counter[int] = Counter()
        self._count = 0
        self._max = 0
        self._lock = threading.Lock()

    def add(self, acknowledged_ms: int, appended_ms: Iterable[int]) -> None:
        # A broker clock ahead of ours would give negative lags: those count as 0.
        times = appended_ms if isinstance(appended_ms, list) else list(appended_ms)
        if not times:
            return
        # Counted in C; a negative lag's bucket is negative, folded into bucket 0 after.
        buckets = Counter([(acknowledged_ms - t) // BUCKET_MS for t in times])
        for bucket in [b for b in buckets if b < 0]:
            buckets[0] += buckets.pop(bucket)
        with self._lock:
            self._buckets.update(buckets)
            self._count += len(times)
            self._max = max(self._max, acknowledged_ms - min(times))

    @property
    def count(self) -> int:
        return self._count

    def quantile_ms(self, q: float) -> int | None:
        """The upper edge of the bucket holding quantile `q` (so never an underestimate, and at
        most BUCKET_MS - 1 ms over), capped at the largest lag seen; None before any row."""
        if not 0 < q <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {q}")
        with self._lock:
            if not self._count:
                return None
            rank = q * self._count
            seen = 0
            for bucket in sorted(self._buckets):
                seen += self._buckets[bucket]
                if seen >= rank:
                    return min((bucket + 1) * BUCKET_MS - 1, self._max)
            return self._max

    def as_json(self) -> dict[str, int | None]:
        return {
            "lag_rows": self._count,
            "lag_p50_ms": self.quantile_ms(0.5),
            "lag_p99_ms": self.quantile_ms(0.99),
            "lag_max_ms": self._max if self._count else None,
        }
