"""The processor's Prometheus metrics (served on ``GET /metrics``).

Counted per batch, never per event, on the hot path: a batch's events are one ``inc(n)``. The
consumer lag comes from the end offsets librdkafka caches from the data plane's fetches (every
few seconds), so a scrape asks Kafka nothing. Dead-letter reasons are free text, so they are
counted by class (a bounded label set).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["ENFORCEMENT_BUCKETS", "ProcessorMetrics", "dlq_reason_class"]

ENFORCEMENT_BUCKETS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)

# (what the reason starts with or contains, its class), first match wins.
_REASON_CLASSES = (
    ("empty value", "empty"),
    ("not a valid CallEvent", "invalid_event"),
    ("in the future", "future_event"),
    ("policies record", "invalid_policy"),
    ("scope delta", "invalid_scope_delta"),
    ("AllowanceRequest", "invalid_allowance_request"),
)


def dlq_reason_class(reason: str) -> str:
    for marker, name in _REASON_CLASSES:
        if marker in reason:
            return name
    return "other"


class _Lag(Collector):
    """The latest lag snapshot per (topic, partition); revoked partitions leave the snapshot."""

    def __init__(self) -> None:
        self.plane: dict[tuple[str, int], int] = {}  # the data plane's (calls)

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "agentledger_consumer_lag_records",
            "records in the partition not yet processed by this worker (end offset minus the "
            "next offset to process), per input topic and partition",
            labels=["topic", "partition"],
        )
        for (topic, partition), lag in sorted(self.plane.items()):
            family.add_metric([topic, str(partition)], lag)
        yield family


class ProcessorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "agentledger_events_processed",
            "input records counted, per input topic (calls, or the scopes hop)",
            ["topic"],
            registry=r,
        )
        self.plane_replaced = Counter(
            "agentledger_data_plane_replaced",
            "data planes given up by the watchdog (a hung Kafka call, or a failure) and replaced",
            registry=r,
        )
        self.dlq = Counter(
            "agentledger_dlq_records",
            "records dead-lettered by this worker, by reason class",
            ["reason"],
            registry=r,
        )
        self.commands = Counter(
            "agentledger_commands_published",
            "signed control commands published, by action",
            ["action"],
            registry=r,
        )
        self.fast_commands = Counter(
            "agentledger_commands_sent_before_commit",
            "control commands also sent the moment they were decided, ahead of their "
            "transaction's copy",
            registry=r,
        )
        self.alerts = Counter(
            "agentledger_alerts_raised", "alerts published, by kind", ["kind"], registry=r
        )
        self.enforcement = Histogram(
            "agentledger_enforcement_latency_seconds",
            "event time of the newest event of the batch that led to a command -> the command "
            "published (wall clock)",
            buckets=ENFORCEMENT_BUCKETS,
            registry=r,
        )
        self.last_batch = Gauge(
            "agentledger_last_batch_timestamp_seconds",
            "unix time this worker last finished a batch of input records",
            registry=r,
        )
        self._lag = _Lag()
        r.register(self._lag)

    def batch_done(self, topic: str, counted: int, now_ms: int) -> None:
        if counted:
            self.events.labels(topic).inc(counted)
        self.last_batch.set(now_ms / 1000)

    def observe_plane_lag(self, lags: dict[tuple[str, int], int]) -> None:
        """The data plane's lag per calls partition (replaced whole: revoked ones leave)."""
        self._lag.plane = lags
