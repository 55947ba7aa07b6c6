"""Benchmark the review queries: `python -m bench.bench_review --calls 10000000`.

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

from agentledger.review.escalation import ESCALATION_SOURCES, escalations, model_ranks
from agentledger.review.insights import build_review, key_model_stats, spend_by_key
from agentledger.review.query import QueryClient
from agentledger.review.spend import spend_by_agent_model
from agentledger.sinks.database import ClickHouse
from agentledger.sinks.migrations import apply_migrations
from agentledger.sinks.results import QueryResult

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
    parser.add_argument(
        "--db",
        help="chDB directory to keep: generated into when it holds no calls, else reused as it "
        "is (pending migrations applied and timed), so a 10M database is generated once",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="agentledger-bench-") as tmp:
        db = ClickHouse.open(f"chdb://{args.db or tmp + '/ch'}")
        try:
            started, cpu_started = time.perf_counter(), time.process_time()
            applied = apply_migrations(db)
            if applied and args.db:
                print(
                    f"migrations {applied}: {time.perf_counter() - started:.1f}s wall, "
                    f"{time.process_time() - cpu_started:.1f}s CPU"
                )
            started = time.perf_counter()
            stored = db.readonly_query("SELECT count() FROM calls").rows[0][0]
            if stored == 0:
                db.command(_GENERATE, {"start": START, "n": args.calls})
            elif stored != args.calls:
                raise SystemExit(f"--db holds {stored} calls, not --calls {args.calls}")
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
            # The review's escalation query alone, for its 10 top agents, from task_calls (what
            # the review reads) and from calls (the reference), back to back.
            prev = 2 * since - until
            stats = key_model_stats(client, "agent", prev, until, latency=False)
            spend = spend_by_key(client, "agent", since, until)
            top = sorted(spend, key=lambda k: (-spend[k], k))[:10]
            ranks = model_ranks(
                {
                    m: (
                        sum(s.cost_nano_usd for s in stats if s.model == m),
                        sum(s.tokens for s in stats if s.model == m),
                    )
                    for m in {s.model for s in stats}
                }
            )
            escalation_ms = {
                source: _median_ms(
                    lambda source=source: escalations(
                        client, "agent_id", prev, since, until, top, ranks, source
                    ),
                    args.runs,
                )
                for source in ESCALATION_SOURCES
            }
            rows = db.readonly_query("SELECT count() FROM calls").rows[0][0]
            print(
                f"calls={rows} generated+rolled up in {load_s:.1f}s; "
                f"spenders/model stats via rollups: {rollup_ms:.0f} ms with the p50 latency "
                f"merge, {sums_ms:.0f} ms without; "
                f"full review (rollups, spawn/task read of calls and escalation read of "
                f"task_calls for the top spenders, spend series): {review_ms:.0f} ms; "
                f"spend per agent and model table: "
                f"{table_ms:.0f} ms; escalations of the top 10 from "
                + ", ".join(f"{src}: {ms:.0f} ms" for src, ms in escalation_ms.items())
                + f" (medians of {args.runs})"
            )
            print("CPU ms, same order: " + ", ".join(f"{ms:.0f}" for ms in _CPU_MS))
        finally:
            db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
