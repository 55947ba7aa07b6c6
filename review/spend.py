"""The review query: spend per agent and model over an event-time window."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from agentledger.schemas import nano_to_usd

from .query import QueryClient

__all__ = [
    "SPEND_BY_AGENT_MODEL_IN_WORKFLOW_SQL",
    "SPEND_BY_AGENT_MODEL_SQL",
    "SpendRow",
    "spend_by_agent_model",
]

# sum() over Int64 wraps silently on overflow in ClickHouse, so money is summed as Int128.
_TEMPLATE = """
SELECT
    agent_id,
    used_model,
    count() AS calls,
    countIf(status != 'ok') AS failures,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd
FROM calls
WHERE event_time >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')
  AND event_time < fromUnixTimestamp64Milli({until_ms:Int64}, 'UTC')
  %s
GROUP BY agent_id, used_model
ORDER BY cost_nano_usd DESC, agent_id, used_model
"""


# Two fixed statements rather than SQL assembled from input: the filter's value is a parameter.
SPEND_BY_AGENT_MODEL_SQL = _TEMPLATE % ""
SPEND_BY_AGENT_MODEL_IN_WORKFLOW_SQL = _TEMPLATE % "AND workflow_id = {workflow_id:String}"

# The same numbers from a rollup (calls_by_<grain>), for windows whose bounds fall on its grain:
# a few thousand pre-summed rows instead of every call (money sums are Int128 there already).
_ROLLUP_TEMPLATE = """
SELECT agent_id, used_model, sum(calls) AS n, sum(failures), sum(input_tokens),
    sum(output_tokens), sum(cost_nano_usd) AS cost_nano_usd
FROM calls_by_%s
WHERE bucket >= toDateTime(intDiv({since_ms:Int64}, 1000), 'UTC')
  AND bucket < toDateTime(intDiv({until_ms:Int64}, 1000), 'UTC')
GROUP BY agent_id, used_model
ORDER BY cost_nano_usd DESC, agent_id, used_model
"""
_GRAIN_MS = (("day", 86_400_000), ("hour", 3_600_000), ("minute", 60_000))


@dataclass(frozen=True)
class SpendRow:
    agent_id: str
    used_model: str
    calls: int
    failures: int
    input_tokens: int
    output_tokens: int
    cost_nano_usd: int
    cost_usd: Decimal


def spend_by_agent_model(
    client: QueryClient,
    since_ms: int,
    until_ms: int,
    workflow_id: str | None = None,
    *,
    use_rollups: bool = True,
) -> list[SpendRow]:
    """Calls with since_ms <= event time < until_ms (UTC ms), optionally of one workflow, most
    expensive first. From the coarsest rollup the bounds fall on, else from `calls`."""
    if since_ms < 0 or until_ms < since_ms:
        raise ValueError(f"need 0 <= since_ms <= until_ms, got {since_ms} and {until_ms}")
    parameters: dict[str, object] = {"since_ms": since_ms, "until_ms": until_ms}
    sql = SPEND_BY_AGENT_MODEL_SQL
    for grain, step in _GRAIN_MS if use_rollups and workflow_id is None else ():
        if since_ms % step == 0 and until_ms % step == 0:
            sql = _ROLLUP_TEMPLATE % grain
            break
    if workflow_id is not None:
        sql = SPEND_BY_AGENT_MODEL_IN_WORKFLOW_SQL
        parameters["workflow_id"] = workflow_id
    result = client.query(sql, parameters)
    rows = []
    for agent_id, model, calls, failures, tokens_in, tokens_out, cost in result.rows:
        nano = int(cost)
        rows.append(
            SpendRow(
                str(agent_id),
                str(model),
                int(calls),
                int(failures),
                int(tokens_in),
                int(tokens_out),
                nano,
                nano_to_usd(nano),
            )
        )
    return rows
