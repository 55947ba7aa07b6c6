"""Escalation failures: tasks that moved to a pricier model and what that bought.

Defined from what every call carries (task_id, attempt, used_model, status, cost), within one
key of the review (an agent, pool, ...), ordering a task's calls by (attempt, event time):
- an **escalation** is a call whose model is pricier (cost per token in the window, ranked in
  Python with exact fractions) than the model of the task's previous call;
- a **failed escalation**: the previous call failed and the escalated call failed too: the
  pricier model did not rescue the task, its cost bought nothing;
- a **needless escalation**: the previous call succeeded, yet the task moved to a pricier
  model (a quality re-check or a blanket retry policy): the cheaper answer was there.
The costs reported are those of the escalated calls. Read from `calls` (the rollups do not keep
per-task order), only for the keys shown, and for both windows in one query.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from .query import QueryClient

__all__ = ["Escalations", "escalations", "model_ranks"]


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


_SQL = """
SELECT key, now, countIf(esc),
    countIf(esc AND prev_status != 'ok' AND status != 'ok'),
    sumIf(cost, esc AND prev_status != 'ok' AND status != 'ok'),
    countIf(esc AND prev_status = 'ok'),
    sumIf(cost, esc AND prev_status = 'ok')
FROM (
    SELECT key, now, status, cost, prev_status, rank > 0 AND prev_rank > 0 AND rank > prev_rank
        AS esc
    FROM (
        SELECT {key} AS key,
            event_time >= fromUnixTimestamp64Milli({{since_ms:Int64}}, 'UTC') AS now,
            status, toInt128(cost_nano_usd) AS cost,
            {{ranks:Array(UInt32)}}[indexOf({{models:Array(String)}}, used_model)] AS rank,
            lagInFrame(rank) OVER task AS prev_rank,
            lagInFrame(status) OVER task AS prev_status,
            row_number() OVER task AS n
        FROM calls
        WHERE event_time >= fromUnixTimestamp64Milli({{prev_since_ms:Int64}}, 'UTC')
          AND event_time < fromUnixTimestamp64Milli({{until_ms:Int64}}, 'UTC')
          AND task_id IS NOT NULL AND {key} IN {{keys:Array(String)}}
        WINDOW task AS (PARTITION BY key, task_id ORDER BY attempt, event_time, event_id
            ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
    )
    WHERE n > 1
)
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
) -> tuple[dict[str, Escalations], dict[str, Escalations]]:
    """Per key: escalations in [since, until) and in [prev_since, since). `key_expression` must
    be one of insights.DIMENSIONS' raw expressions (it is interpolated)."""
    if not keys or len(ranks) < 2:
        return {}, {}
    models = sorted(ranks)
    result = client.query(
        _SQL.format(key=key_expression),
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
