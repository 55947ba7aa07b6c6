"""The shim's opt-in Prometheus exporter (``agentledger[metrics]``).

```python
from agentledger.producers.metrics import serve_metrics
server = serve_metrics(ledger, port=9464)  # GET http://127.0.0.1:9464/metrics
```

Nothing here runs per call: the collector reads the counters the ledger, its transport and its
control listener keep anyway, when Prometheus scrapes. Without ``serve_metrics`` (or
``shim_registry``) prometheus-client is never imported.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from agentledger.metrics import MetricsServer

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = ["REFUSAL_REASONS", "serve_metrics", "shim_registry"]

# ledger.stats key -> the reason label of agentledger_shim_refusals_total
REFUSAL_REASONS = {
    "refused": "stop",
    "refused_new_work": "new_work",
    "throttle_timeouts": "throttle_timeout",
    "refused_local": "local_reservation",
    "refused_fail_closed": "fail_closed",
}


class _ShimCollector(Collector):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterable[Metric]:
        stats = dict(self.ledger.stats)
        yield CounterMetricFamily(
            "agentledger_shim_calls", "call events emitted by this process", value=stats["events"]
        )
        refusals = CounterMetricFamily(
            "agentledger_shim_refusals", "calls or tasks refused, by reason", labels=["reason"]
        )
        for key, reason in REFUSAL_REASONS.items():
            refusals.add_metric([reason], stats.get(key, 0))
        yield refusals
        yield CounterMetricFamily(
            "agentledger_shim_unpriced_calls",
            "calls of a model with no known price",
            value=stats["unpriced"],
        )
        transport = getattr(self.ledger.transport, "stats", None)
        if transport is not None:
            yield CounterMetricFamily(
                "agentledger_shim_spooled_events",
                "events written to the local spool (broker down, queue full, failed delivery)",
                value=transport.spooled,
            )
            yield CounterMetricFamily(
                "agentledger_shim_replayed_events",
                "spooled events delivered later",
                value=transport.replayed,
            )
            yield CounterMetricFamily(
                "agentledger_shim_dropped_events",
                "events neither queued nor spooled",
                value=transport.dropped,
            )
            yield CounterMetricFamily(
                "agentledger_shim_delivery_errors",
                "deliveries librdkafka reported failed",
                value=transport.delivery_errors,
            )
        verification = CounterMetricFamily(
            "agentledger_shim_control_commands",
            "control commands read, by verification outcome (accepted, rejected_unsigned, "
            "rejected_forged, rejected_replayed, rejected_invalid)",
            labels=["outcome"],
        )
        for outcome, count in sorted(self.ledger.control.metrics.items()):
            verification.add_metric([outcome], count)
        yield verification


def shim_registry(ledger: Ledger) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_ShimCollector(ledger))
    return registry


def serve_metrics(ledger: Ledger, port: int = 9464, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``ledger``'s metrics on ``GET /metrics`` (bearer token: the ledger's API token,
    unless ``AGENTLEDGER_METRICS_OPEN``). Close it with ``.close()``."""
    return MetricsServer(shim_registry(ledger), ledger.settings, host, port)
