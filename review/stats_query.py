"""Routing stats from ClickHouse: the figures the processor keeps on the stats topic, per
(agent or model, task type), recomputed over any time range of the ``calls`` table.

The latency buckets are computed in SQL with the sketch's own formula (schemas/stats.py), so
p50 and p95 read from here equal the processor's for the same calls; counts and the exact
nano-USD sum are plain aggregates. Every value reaches ClickHouse as a query parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from agentledger.schemas import StatsSummary
from agentledger.schemas.stats import LATENCY_GAMMA
from agentledger.sinks.results import QueryResult

__all__ = ["ROUTING_STATS_SQL", "routing_stats"]

Run = Callable[[str, dict[str, Any]], QueryResult]

# Our own column names, never user input: the subject kind picks one of them.
_SUBJECT_COLUMNS = {"agent": "agent_id", "model": "used_model"}

ROUTING_STATS_SQL = """
SELECT
    subject,
    task_type,
    sum(n) AS calls,
    sum(ok) AS successes,
    sum(priced_n) AS priced_calls,
    toString(sum(cost)) AS cost_nano_usd,
    max(last_ms) AS last_event_time_ms,
    groupArray((bucket, n)) AS latency_ms_buckets
FROM
(
    SELECT
        {column} AS subject,
        task_type,
        if(latency_ms = 0, 0,
           1 + toInt64(ceil(log(latency_ms) / log({{gamma:Float64}}) - 1e-9))) AS bucket,
        count() AS n,
        countIf(status = 'ok') AS ok,
        countIf(priced) AS priced_n,
        sumIf(toInt128(cost_nano_usd), priced) AS cost,
        toInt64(toUnixTimestamp64Milli(max(event_time))) AS last_ms
    FROM calls
    WHERE event_time >= fromUnixTimestamp64Milli({{since_ms:Int64}}, 'UTC')
      AND event_time < fromUnixTimestamp64Milli({{until_ms:Int64}}, 'UTC')
      {filters}
    GROUP BY subject, task_type, bucket
)
GROUP BY subject, task_type
ORDER BY subject, task_type
"""


def routing_stats(
    run: Run,
    *,
    by: Literal["agent", "model"] = "agent",
    since_ms: int = 0,
    until_ms: int = (1 << 48) - 1,
    task_type: str | None = None,
    ids: Sequence[str] | None = None,
) -> list[StatsSummary]:
    """Stats per (``by``, task type) of the calls with event time in ``[since_ms, until_ms)``.

    ``run`` executes parameterised SQL: ``QueryClient.query`` or ``ClickHouse.readonly_query``.
    ``task_type`` and ``ids`` narrow the result; None means every task type / subject.
    """
    column = _SUBJECT_COLUMNS.get(by)
    if column is None:
        raise ValueError(f"by must be 'agent' or 'model', got {by!r}")
    if not 0 <= since_ms <= until_ms < 1 << 48:
        raise ValueError(
            f"need 0 <= since_ms <= until_ms < 2^48 (UTC ms), got {since_ms} and {until_ms}"
        )
    parameters: dict[str, Any] = {
        "gamma": LATENCY_GAMMA,
        "since_ms": since_ms,
        "until_ms": until_ms,
    }
    filters = []
    if task_type is not None:
        filters.append("AND task_type = {task_type:String}")
        parameters["task_type"] = task_type
    if ids is not None:
        filters.append(f"AND {column} IN {{ids:Array(String)}}")
        parameters["ids"] = list(ids)
    sql = ROUTING_STATS_SQL.format(column=column, filters="\n      ".join(filters))
    result = run(sql, parameters)
    return [_summary(by, row) for row in result.rows]


def _summary(by: str, row: list[Any]) -> StatsSummary:
    subject, task_type, calls, successes, priced, cost, last_ms, buckets = row
    return StatsSummary(
        subject=f"{by}:{subject}",
        task_type=task_type,
        calls=int(calls),
        successes=int(successes),
        priced_calls=int(priced),
        cost_nano_usd=int(cost),
        latency_ms_buckets={int(b): int(n) for b, n in buckets},
        last_event_time_ms=int(last_ms),
        partitions=1,
    )
