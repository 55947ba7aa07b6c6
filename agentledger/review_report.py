"""`agentledger review`: spend per agent and model for a period, most expensive first."""

from __future__ import annotations

from datetime import UTC, datetime

from agentledger.config import Settings
from agentledger.schemas import nano_to_usd
from agentledger.tables import render_table

__all__ = ["print_review", "review_table"]


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def review_table(
    settings: Settings, since_ms: int, until_ms: int, workflow_id: str | None = None
) -> str:
    from agentledger.sinks.query import QueryClient
    from agentledger.sinks.review import spend_by_agent_model

    client = QueryClient.from_settings(settings)
    try:
        rows = spend_by_agent_model(client, since_ms, until_ms, workflow_id=workflow_id)
    finally:
        client.close()
    total = sum(r.cost_nano_usd for r in rows)
    body = render_table(
        ["agent", "model", "calls", "failed", "input tok", "output tok", "cost (USD)", "share"],
        [
            [
                r.agent_id,
                r.used_model,
                r.calls,
                r.failures,
                r.input_tokens,
                r.output_tokens,
                r.cost_usd,
                f"{100 * r.cost_nano_usd / total:.1f}%" if total else "-",
            ]
            for r in rows
        ],
        right_align=[False, False, True, True, True, True, True, True],
    )
    scope = f" in workflow {workflow_id}" if workflow_id else ""
    header = f"spend per agent and model{scope}, {_utc(since_ms)} .. {_utc(until_ms)}"
    return f"{header}\n{body}\ntotal: ${nano_to_usd(total)} over {sum(r.calls for r in rows)} calls"


def print_review(
    settings: Settings, since_ms: int, until_ms: int, workflow_id: str | None = None
) -> None:
    print(review_table(settings, since_ms, until_ms, workflow_id))
