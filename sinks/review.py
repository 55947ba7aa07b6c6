"""The review query: spend per agent and model over an event-time window."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from agentledger.schemas import nano_to_usd

from .query import QueryClient

__all__ = ["SPEND_BY_AGENT_MODEL_SQL", "SpendRow", "spend_by_agent_model"]

# sum() over Int64 wraps silently on overflow in ClickHouse, so money is summed as Int128.
SPEND_BY_AGENT_MODEL_SQL = """
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
GROUP BY agent_id, used_model
ORDER BY cost_nano_usd DESC, agent_id, used_model
"""


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


def spend_by_agent_model(client: QueryClient, since_ms: int, until_ms: int) -> list[SpendRow]:
    """Calls with since_ms <= event time < until_ms (UTC ms), most expensive first."""
    if since_ms < 0 or until_ms < since_ms:
        raise ValueError(f"need 0 <= since_ms <= until_ms, got {since_ms} and {until_ms}")
    result = client.query(SPEND_BY_AGENT_MODEL_SQL, {"since_ms": since_ms, "until_ms": until_ms})
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
