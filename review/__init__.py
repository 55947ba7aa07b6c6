"""The read path: what people and tools ask of the history the sink writes.

`QueryClient` reaches the sink's read-only SQL endpoint (or a ClickHouse server directly);
`build_review` (spenders, reasons, remaps, escalations, budget forecasts) and `render_html`
are the review; `spend_by_agent_model` the CLI's spend table; `routing_stats` the router's
evidence. Nothing here writes, and importing it loads neither clickhouse-connect nor chDB.
"""

from .escalation import Escalations, escalations, model_ranks
from .forecast import BudgetForecast, BudgetLine, forecast_budgets
from .insights import Review, build_review, key_model_stats
from .query import QueryClient, QueryError, QueryResult, SinkNotRunningError
from .review_html import render_html
from .spend import SpendRow, spend_by_agent_model
from .stats_query import routing_stats

__all__ = [
    "BudgetForecast",
    "BudgetLine",
    "Escalations",
    "QueryClient",
    "QueryError",
    "QueryResult",
    "Review",
    "SinkNotRunningError",
    "SpendRow",
    "build_review",
    "escalations",
    "forecast_budgets",
    "key_model_stats",
    "model_ranks",
    "render_html",
    "routing_stats",
    "spend_by_agent_model",
]
