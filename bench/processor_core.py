"""The data plane's own work per calls event, without Kafka: CPU time of one cycle's counting.

The bench events and policies of `bench.processor_bench` go through `DataPlane._count` (parse,
routing stats, counting folded per agent, the agent's decision, the per-scope deltas) and
`DataPlane._apply_deltas` (the second hop), in cycles of `--batch` records, timed with
`time.process_time`. Kafka's share (consume, produce, commit) is what `bench.processor_bench`
adds on top. `--profile` prints cProfile's top functions.

    AGENTLEDGER_TRACES=../shared/data .venv/bin/python -m bench.processor_core --batch 2500
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from typing import Any

from agentledger.config import Settings
from agentledger.schemas import BudgetPolicy
from agentledger.stream_processors.data_plane import DataPlane, DataPlaneTopics, _Cycle
from agentledger.stream_processors.deltas import encode_delta
from agentledger.stream_processors.metrics import ProcessorMetrics
from agentledger.stream_processors.policies import PolicyBook
from agentledger.stream_processors.stats import StatsAggregator

from .pipeline import _payloads
from .processor_bench import BENCH_POLICIES

__all__ = ["main", "measure"]


class _Message:
    """What the data plane reads of a confluent-kafka Message."""

    __slots__ = ("_key", "_offset", "_partition", "_topic", "_value")

    def __init__(self, topic: str, key: bytes, value: bytes, partition: int, offset: int) -> None:
        self._topic, self._key, self._value = topic, key, value
        self._partition, self._offset = partition, offset

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def headers(self) -> None:
        return None

    def error(self) -> None:
        return None


class _NoKafka:
    """Stands in for the clients the measured steps never call."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the measured steps must not use Kafka ({name})")


def _book() -> PolicyBook:
    book = PolicyBook()
    for raw in BENCH_POLICIES["budgets"]:
        policy = BudgetPolicy.model_validate(raw)
        reason = book.apply(policy.key.encode(), policy.model_dump_json().encode())
        if reason is not None:
            raise RuntimeError(reason)
    book.ready.set()
    return book


def measure(count: int, batch: int, profile: bool = False) -> dict[str, Any]:
    payloads = _payloads(count)
    now = time.time_ns() // 1_000_000
    topics = DataPlaneTopics(
        calls="calls",
        requests="requests",
        changelog="changelog",
        scopes="scopes",
        scope_changelog="scope-changelog",
        control="control",
        alerts="alerts",
        allowances="allowances",
        dlq="dlq",
        stats="stats",
    )
    plane = DataPlane(
        Settings(),
        topics=topics,
        partitions=1,
        book=_book(),
        clock=lambda: now,
        metrics=ProcessorMetrics(),
        new_consumer=_NoKafka,
        new_requests_consumer=_NoKafka,
        new_restore_consumer=_NoKafka,
        new_producer=_NoKafka,
        stats=StatsAggregator(lambda: now),
        future_tolerance_ms=60_000,
        allowance_ttl_ms=60_000,
    )
    messages = [_Message("calls", k, v, 0, i) for i, (k, v) in enumerate(payloads)]
    spent = {"count": 0.0, "encode_deltas": 0.0, "second_hop": 0.0}
    deltas = 0
    profiler = cProfile.Profile() if profile else None
    clock = time.process_time
    if profiler is not None:
        profiler.enable()
    for start in range(0, count, batch):
        cycle = _Cycle()
        t0 = clock()
        plane._count(cycle, messages[start : start + batch], now)
        t1 = clock()
        records = [
            _Message("scopes", scope.encode(), encode_delta(delta), 0, start + i)
            for i, (scope, delta) in enumerate(cycle.deltas.items())
        ]
        t2 = clock()
        plane.states.update(cycle.states)
        hop = _Cycle()
        plane._apply_deltas(hop, records, now)
        plane.scope_states.update(hop.scope_states)
        t3 = clock()
        deltas += len(records)
        spent["count"] += t1 - t0
        spent["encode_deltas"] += t2 - t1
        spent["second_hop"] += t3 - t2
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    result: dict[str, Any] = {
        "events": count,
        "batch": batch,
        "agents": len(plane.states),
        "scopes": len(plane.scope_states),
        "deltas": deltas,
    }
    result.update({f"{k}_us_per_event": round(1e6 * v / count, 2) for k, v in spent.items()})
    result["total_us_per_event"] = round(1e6 * sum(spent.values()) / count, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=2_500)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.events, args.batch, args.profile), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
