"""The sink's Prometheus metrics (``GET /metrics`` on its HTTP API), read from ``SinkStats``
at scrape time: the worker's loop only keeps the plain counters it kept already, plus one
histogram observation per insert (one per batch chunk, never per row)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .worker import SinkStats

__all__ = ["INSERT_BUCKETS", "SinkCollector", "insert_histogram", "sink_registry"]

INSERT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def insert_histogram() -> Histogram:
    """Not registered anywhere: the collector below yields it with the rest."""
    return Histogram(
        "agentledger_sink_insert_seconds",
        "one acknowledged ClickHouse insert (a batch's rows of one topic and month)",
        buckets=INSERT_BUCKETS,
        registry=None,
    )


class SinkCollector(Collector):
    def __init__(self, stats: SinkStats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self.stats
        yield CounterMetricFamily(
            "agentledger_sink_rows_inserted",
            "rows inserted into ClickHouse and acknowledged",
            value=s.rows_inserted,
        )
        yield CounterMetricFamily(
            "agentledger_sink_duplicates_skipped",
            "records whose event id was stored already (spool replays, exporter retries)",
            value=s.duplicates_skipped,
        )
        yield CounterMetricFamily(
            "agentledger_sink_batches", "batches inserted and committed", value=s.batches
        )
        dlq = CounterMetricFamily(
            "agentledger_dlq_records",
            "records dead-lettered by this worker, by reason class",
            labels=["reason"],
        )
        dlq.add_metric(["invalid_record"], s.invalid)
        yield dlq
        lag = GaugeMetricFamily(
            "agentledger_consumer_lag_records",
            "records in the partition not yet inserted by this worker (end offset minus "
            "position; refreshed at most every 2 s)",
            labels=["topic", "partition"],
        )
        for (topic, partition), records in sorted(s.lag_by_partition.items()):
            lag.add_metric([topic, str(partition)], records)
        yield lag
        queryable = GaugeMetricFamily(
            "agentledger_sink_queryable_lag_seconds",
            "broker append -> insert acknowledged, over every row since start",
            labels=["quantile"],
        )
        for q in (0.5, 0.99):
            ms = s.lag_ms.quantile_ms(q)
            if ms is not None:
                queryable.add_metric([str(q)], ms / 1000)
        yield queryable
        if s.last_commit_ms is not None:
            yield GaugeMetricFamily(
                "agentledger_sink_last_commit_timestamp_seconds",
                "unix time of the last offset commit",
                value=s.last_commit_ms / 1000,
            )
        yield GaugeMetricFamily(
            "agentledger_sink_retrying",
            "1 while an insert or commit is being retried (ClickHouse or Kafka unavailable)",
            value=1 if s.retrying else 0,
        )
        yield from s.insert_seconds.collect()


def sink_registry(stats: SinkStats) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SinkCollector(stats))
    return registry
