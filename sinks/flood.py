"""The sink's garbage-flood limit: stop, loudly, when most of a topic's records are invalid.

One bad record goes to the dlq and the stream goes on. But a broken producer (a schema change
deployed without the sink, a wrong serializer, another app writing to the topic) turns every
record into a dead letter, and a sink that quietly dead-letters a whole stream looks healthy
while history stops. So, per topic, over the last `window` records (at least; counted in whole
batches: a batch is judged as a whole, before anything of it is stored or dead-lettered), more
than `max_percent` invalid raises `DlqFlood`, which stops the sink with the counts and the first
reason. The batch stays uncommitted: nothing is lost, and once the producer is fixed (or the
limit raised) the sink resumes where it stopped. As arroyo's `max_invalid_ratio` does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["DlqFlood", "FloodGuard"]


class DlqFlood(RuntimeError):
    """Too many invalid records on one topic: a producer is broken; the sink stops."""


@dataclass
class FloodGuard:
    max_percent: int = 50
    window: int = 1_000
    # Per topic: (records, invalid) of the recent batches, oldest first, just covering window.
    _recent: dict[str, deque[tuple[int, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.max_percent <= 100 or self.window < 1:
            raise ValueError(
                f"flood limit needs 0 < max_percent <= 100 and window >= 1, got "
                f"{self.max_percent}% of {self.window}"
            )

    def check(self, topic: str, records: int, invalid: int, first_reason: str | None) -> None:
        """Count one batch's records of `topic`; raise DlqFlood when the limit is passed."""
        if records == 0:
            return
        recent = self._recent.setdefault(topic, deque())
        recent.append((records, invalid))
        total = sum(n for n, _ in recent)
        while len(recent) > 1 and total - recent[0][0] >= self.window:
            total -= recent.popleft()[0]
        bad = sum(b for _, b in recent)
        if total >= self.window and bad * 100 > self.max_percent * total:
            # Forget it: a restarted check (after the operator acted) starts afresh.
            del self._recent[topic]
            raise DlqFlood(
                f"{bad} of the last {total} records on {topic} are invalid "
                f"(limit {self.max_percent}% of {self.window}): a producer is writing records "
                f"the sink cannot store, so it stops instead of dead-lettering the stream. "
                f"First reason: {first_reason}. Nothing of this batch was stored or committed; "
                f"fix the producer (or raise AGENTLEDGER_SINK_DLQ_MAX_PERCENT) and restart."
            )
