"""TaskStats: what one (agent or model, task type) pair costs, how fast and how often it
succeeds, as summed by the processor over the calls of one calls-topic partition.

A record is a partial aggregate: one per calls partition, so each is written by the one worker
that owns that partition, and readers add the partials up (``summarize``). Every field is a sum,
a count, a max/min or a histogram, so adding partials is exact and order-free.

Latency is kept in a log-bucket histogram (a DDSketch-style sketch with a fixed growth factor
of 1.1): bucket ``i >= 1`` holds latencies in ``(1.1^(i-2), 1.1^(i-1)]`` ms and bucket 0 holds
0 ms. A quantile read from it is within 4.8% of the true value (the nearest-rank quantile of
the same calls), its size is bounded (about 170 buckets up to 10^7 ms) and merging is adding
counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .events import Identifier

__all__ = [
    "LATENCY_GAMMA",
    "LATENCY_RELATIVE_ERROR",
    "STATS_VERSION",
    "StatsSummary",
    "Subject",
    "TaskStats",
    "bucket_value",
    "latency_bucket",
    "sketch_quantile",
    "stats_group",
    "summarize",
]

STATS_VERSION: Literal[1] = 1
LATENCY_GAMMA = 1.1
_LOG_GAMMA = math.log(LATENCY_GAMMA)
# The relative error bound of a quantile read from the sketch, (gamma - 1) / (gamma + 1).
LATENCY_RELATIVE_ERROR = (LATENCY_GAMMA - 1) / (LATENCY_GAMMA + 1)

Subject = Annotated[
    str,
    Field(
        min_length=3,
        max_length=210,
        pattern=r"^(agent|model):[A-Za-z0-9._:/@+\-]+$",
        description="'agent:<agent_id>' or 'model:<used_model>'",
    ),
]


def latency_bucket(latency_ms: int) -> int:
    """The sketch bucket of one latency."""
    if latency_ms <= 0:
        return 0
    return 1 + math.ceil(math.log(latency_ms) / _LOG_GAMMA - 1e-9)


def bucket_value(bucket: int) -> int:
    """The latency a bucket stands for: the point of least relative error in its range."""
    if bucket <= 0:
        return 0
    upper = LATENCY_GAMMA ** (bucket - 1)
    return max(1, round(2 * upper / (1 + LATENCY_GAMMA)))


def sketch_quantile(buckets: Mapping[int, int], q: Fraction) -> int | None:
    """The nearest-rank ``q`` quantile of the latencies in ``buckets`` (None when empty)."""
    total = sum(buckets.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(buckets):
        seen += buckets[bucket]
        if seen >= rank:
            return bucket_value(bucket)
    raise AssertionError("unreachable: rank <= total")


class TaskStats(BaseModel):
    """One partial aggregate, the value of the stats topic under ``key``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = STATS_VERSION
    subject: Subject
    task_type: Identifier | None = Field(description="null: calls without a task type")
    source_partition: int = Field(ge=0, description="the calls partition these calls came from")
    source_offset: int = Field(
        ge=0, description="the highest calls offset counted; a replay at or below is skipped"
    )
    calls: int = Field(ge=0, description="every attempt, failed ones included")
    successes: int = Field(ge=0, description="calls with status ok")
    priced_calls: int = Field(ge=0, description="calls with a known price")
    cost_nano_usd: int = Field(ge=0, description="exact cost of the priced calls, 1e-9 USD")
    latency_ms_buckets: dict[int, int] = Field(
        default_factory=dict, description="log-bucket sketch, growth 1.1: bucket -> calls"
    )
    first_event_time_ms: int = Field(ge=0)
    last_event_time_ms: int = Field(ge=0, description="freshness: the newest call's event time")
    updated_at_ms: int = Field(ge=0, description="when the processor published this value")

    @property
    def key(self) -> str:
        return f"{self.subject}|{self.task_type or ''}|{self.source_partition}"


def stats_group(subject: str, task_type: str | None) -> str:
    """The key of a (subject, task type) pair, the partials of which add up to its stats."""
    return f"{subject}|{task_type or ''}"


@dataclass(frozen=True)
class StatsSummary:
    """The partials of one (subject, task type) added up, with the derived figures."""

    subject: str
    task_type: str | None
    calls: int
    successes: int
    priced_calls: int
    cost_nano_usd: int
    latency_ms_buckets: Mapping[int, int]
    last_event_time_ms: int
    partitions: int

    @property
    def samples(self) -> int:
        return self.calls

    @property
    def success_rate(self) -> Fraction | None:
        return Fraction(self.successes, self.calls) if self.calls else None

    @property
    def cost_per_call_nano(self) -> Fraction | None:
        """Mean cost of a priced call, exact."""
        if not self.priced_calls:
            return None
        return Fraction(self.cost_nano_usd, self.priced_calls)

    @property
    def cost_per_success_nano(self) -> Fraction | None:
        """What one successful call costs with the failed attempts it took: the mean call cost
        times calls per success (unpriced calls counted at the mean of the priced ones)."""
        per_call = self.cost_per_call_nano
        if per_call is None or not self.successes:
            return None
        return per_call * self.calls / self.successes

    @property
    def p50_ms(self) -> int | None:
        return sketch_quantile(self.latency_ms_buckets, Fraction(1, 2))

    @property
    def p95_ms(self) -> int | None:
        return sketch_quantile(self.latency_ms_buckets, Fraction(95, 100))

    def as_dict(self) -> dict[str, object]:
        """The figures a decision or a report shows, money as exact-to-the-pico USD strings."""
        rate = self.success_rate
        return {
            "subject": self.subject,
            "task_type": self.task_type,
            "samples": self.samples,
            "successes": self.successes,
            "success_rate": None if rate is None else str(_decimal(rate, 4)),
            "cost_per_call_usd": _usd(self.cost_per_call_nano),
            "cost_per_success_usd": _usd(self.cost_per_success_nano),
            "cost_nano_usd": self.cost_nano_usd,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "last_event_time_ms": self.last_event_time_ms,
        }


def _decimal(value: Fraction, places: int) -> Decimal:
    return (Decimal(value.numerator) / Decimal(value.denominator)).quantize(
        Decimal(1).scaleb(-places)
    )


def _usd(nano: Fraction | None) -> str | None:
    # Twelve places: a mean cost per call can fall between two whole nano-USD.
    return None if nano is None else str(_decimal(nano / 1_000_000_000, 12))


def summarize(partials: Iterable[TaskStats]) -> StatsSummary | None:
    """Add up the partials of one (subject, task type); None when there are none."""
    items = list(partials)
    if not items:
        return None
    first = items[0]
    if any((p.subject, p.task_type) != (first.subject, first.task_type) for p in items):
        raise ValueError("summarize() adds up the partials of one (subject, task type) only")
    buckets: dict[int, int] = {}
    for partial in items:
        for bucket, count in partial.latency_ms_buckets.items():
            buckets[bucket] = buckets.get(bucket, 0) + count
    return StatsSummary(
        subject=first.subject,
        task_type=first.task_type,
        calls=sum(p.calls for p in items),
        successes=sum(p.successes for p in items),
        priced_calls=sum(p.priced_calls for p in items),
        cost_nano_usd=sum(p.cost_nano_usd for p in items),
        latency_ms_buckets=buckets,
        last_event_time_ms=max(p.last_event_time_ms for p in items),
        partitions=len(items),
    )
