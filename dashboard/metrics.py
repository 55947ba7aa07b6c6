"""The dashboard's Prometheus metrics (``GET /metrics``, bearer token unless metrics_open):
pages streaming, operator commands, and how fresh the snapshot it serves is."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["DashboardMetrics"]


class _Freshness(Collector):
    def __init__(
        self, snapshot: Callable[[], tuple[int, dict[str, Any]]], clock: Callable[[], int]
    ):
        self._snapshot = snapshot
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        version, snapshot = self._snapshot()
        yield GaugeMetricFamily(
            "agentledger_dashboard_snapshot_version",
            "moves whenever the snapshot's content changes",
            value=version,
        )
        taken = snapshot.get("now_ms")
        if isinstance(taken, int):
            yield GaugeMetricFamily(
                "agentledger_dashboard_snapshot_age_seconds",
                "how old the snapshot served to the pages is",
                value=max(self._clock() - taken, 0) / 1000,
            )


class DashboardMetrics:
    def __init__(
        self,
        snapshot: Callable[[], tuple[int, dict[str, Any]]],
        clock: Callable[[], int],
    ) -> None:
        self.registry = CollectorRegistry()
        self.streams = Gauge(
            "agentledger_dashboard_sse_clients",
            "pages connected to /api/events",
            registry=self.registry,
        )
        self.commands = Counter(
            "agentledger_dashboard_operator_commands",
            "operator commands received, by action and outcome (published, refused, failed)",
            ["action", "outcome"],
            registry=self.registry,
        )
        self.registry.register(_Freshness(snapshot, clock))
