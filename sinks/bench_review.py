"""Benchmark the review queries: `python -m agentledger.sinks.bench_review --calls 10000000`.

Generates the calls inside ClickHouse (INSERT ... SELECT FROM numbers(), through the rollups'
materialized views like a sink insert) in a fresh chDB directory, then times the review parts
over a 30-day window aligned to the day (so they read the rollups), median of --runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from typing import Any

from .database import ClickHouse
from .insights import build_review, key_model_stats
from .migrations import apply_migrations
from .query import QueryClient
from .results import QueryResult
from .review import spend_by_agent_model

DAY = 86_400_000
START = 1_735_689_600_000  # 2025-01-01T00:00:00Z

_GENERATE = """
INSERT INTO calls
SELECT 1, generateUUIDv4(number),
    fromUnixTimestamp64Milli(toInt64({start:Int64} + (number * 2592000000) / {n:UInt64}), 'UTC'),
    concat('agent-', toString(number % 200)), concat('pool-', toString(number % 7)),
    concat('wf-', toString(number % 5000)), NULL, toUInt16(number % 4),
    ['code', 'prose', 'search', 'plan'][number % 4 + 1], concat('task-', toString(number % 100000)),
    'openai', 'gpt-4o', ['gpt-4o', 'gpt-4o-mini', 'o3'][number % 3 + 1],
    100 + number % 1000, 10 + number % 300, 0, 0, toInt64(1000 + number % 100000), true,
    'bench', toUInt32(50 + number % 2000), if(number % 17 = 0, 'error', 'ok'),
    toUInt16(1 + number % 3 = 3), NULL, 'bench.calls', 0, number, now64(3, 'UTC')
FROM numbers({n:UInt64})
"""


class _Local(QueryClient):
    def __init__(self, db: ClickHouse) -> None:
        self.db = db

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        return self.db.readonly_query(sql, parameters)


_CPU_MS: list[float] = []


def _median_ms(action: Any, runs: int) -> float:
    """Median wall ms of `runs` calls; the median CPU ms (this process: chDB runs in it) is
    kept in _CPU_MS, since on a shared machine the wall figure swings with the other load."""
    times, cpu = [], []
    for _ in range(runs):
        started, cpu_started = time.perf_counter(), time.process_time()
        action()
        times.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - cpu_started) * 1000)
    _CPU_MS.append(statistics.median(cpu))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="agentledger-bench-") as tmp:
        db = ClickHouse.open(f"chdb://{tmp}/ch")
        try:
            apply_migrations(db)
            started = time.perf_counter()
            db.command(_GENERATE, {"start": START, "n": args.calls})
            load_s = time.perf_counter() - started
            client = _Local(db)
            since, until = START, START + 30 * DAY
            rollup_ms = _median_ms(
                lambda: key_model_stats(client, "agent", since, until), args.runs
            )
            sums_ms = _median_ms(
                lambda: key_model_stats(client, "agent", since, until, latency=False), args.runs
            )
            review_ms = _median_ms(lambda: build_review(client, since, until), args.runs)
            table_ms = _median_ms(lambda: spend_by_agent_model(client, since, until), args.runs)
            rows = db.readonly_query("SELECT count() FROM calls").rows[0][0]
            print(
                f"calls={rows} generated+rolled up in {load_s:.1f}s; "
                f"spenders/model stats via rollups: {rollup_ms:.0f} ms with the p50 latency "
                f"merge, {sums_ms:.0f} ms without; "
                f"full review (rollups, spawn/task and escalation reads of calls for the top "
                f"spenders, spend series): {review_ms:.0f} ms; spend per agent and model table: "
                f"{table_ms:.0f} ms (medians of {args.runs})"
            )
            print("CPU ms, same order: " + ", ".join(f"{ms:.0f}" for ms in _CPU_MS))
        finally:
            db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
