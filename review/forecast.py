"""Spend at the end of each budget's period, projected from the period so far.

Budgets come in as data (`BudgetLine`: scope, period bounds, limit), so the sink needs no
policy parsing and no Kafka: the CLI reads the policies topic and turns each budgeted policy
into lines (agentledger/review_report.py). The projection is the period's average burn rate so
far carried to its end, the same rule as the processor's forecast detector:
`forecast = spent * (end - start) / (as_of - start)`, in integer nano-USD (floor). A period
already over forecasts what was spent. A glob scope (`agent:*`) gives one line per matching key
that spent in the period and has no exact budget of its own for the same period.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

__all__ = ["SCOPE_DIMENSIONS", "BudgetForecast", "BudgetLine", "SpendByKey", "forecast_budgets"]

# (review dimension, since_ms, until_ms) -> spend per key of that dimension in the window.
SpendByKey = Callable[[str, int, int], dict[str, int]]

# Scope kind -> the review dimension whose keys are that kind's ids.
SCOPE_DIMENSIONS = {
    "agent": "agent",
    "pool": "pool",
    "workflow": "workflow",
    "task_type": "task_type",
}


@dataclass(frozen=True)
class BudgetLine:
    scope: str  # "<kind>:<id or glob>"
    period: str  # a label: day, week, month, rolling:24h
    start_ms: int
    end_ms: int
    limit_nano_usd: int

    def __post_init__(self) -> None:
        kind, _, name = self.scope.partition(":")
        if kind not in SCOPE_DIMENSIONS or not name:
            raise ValueError(
                f"budget scope must be <{'|'.join(SCOPE_DIMENSIONS)}>:<id>, got {self.scope!r}"
            )
        if self.end_ms <= self.start_ms:
            raise ValueError(f"budget period must end after it starts, got {self}")
        if self.limit_nano_usd <= 0:
            raise ValueError(f"limit_nano_usd must be positive, got {self.limit_nano_usd}")


@dataclass(frozen=True)
class BudgetForecast:
    scope: str
    period: str
    start_ms: int
    end_ms: int
    as_of_ms: int
    limit_nano_usd: int
    spent_nano_usd: int
    forecast_nano_usd: int

    @property
    def over(self) -> bool:
        return self.forecast_nano_usd > self.limit_nano_usd

    def percent(self, nano: int) -> float:
        return 100 * nano / self.limit_nano_usd


def _project(spent: int, start_ms: int, end_ms: int, as_of_ms: int) -> int:
    if as_of_ms >= end_ms or spent == 0:
        return spent
    elapsed = max(as_of_ms - start_ms, 1)
    return spent * (end_ms - start_ms) // elapsed


def forecast_budgets(
    spend_by_key: SpendByKey, budgets: list[BudgetLine], as_of_ms: int
) -> list[BudgetForecast]:
    """One forecast per budget line (globs expanded), sorted by forecast share of the limit,
    highest first. Spend is [period start, min(as_of, period end)) of event time, from the
    rollups when the bounds fall on a grain (as the CLI's do), else from `calls` (that is
    `spend_by_key`'s business: insights.spend_by_key)."""
    spend: dict[tuple[str, int, int], dict[str, int]] = {}
    for line in budgets:
        kind = line.scope.split(":", 1)[0]
        until = min(as_of_ms, line.end_ms)
        window = (kind, line.start_ms, until)
        if window not in spend:
            spend[window] = (
                spend_by_key(SCOPE_DIMENSIONS[kind], line.start_ms, until)
                if until > line.start_ms
                else {}
            )
    exact = {(line.scope, line.period) for line in budgets if not _is_glob(line.scope)}
    forecasts = []
    for line in budgets:
        kind, name = line.scope.split(":", 1)
        totals = spend[(kind, line.start_ms, min(as_of_ms, line.end_ms))]
        if _is_glob(name):
            scopes = [
                (f"{kind}:{key}", cost)
                for key, cost in sorted(totals.items())
                if key and fnmatchcase(key, name) and (f"{kind}:{key}", line.period) not in exact
            ]
        else:
            scopes = [(line.scope, totals.get(name, 0))]
        for scope, spent in scopes:
            forecasts.append(
                BudgetForecast(
                    scope=scope,
                    period=line.period,
                    start_ms=line.start_ms,
                    end_ms=line.end_ms,
                    as_of_ms=as_of_ms,
                    limit_nano_usd=line.limit_nano_usd,
                    spent_nano_usd=spent,
                    forecast_nano_usd=_project(spent, line.start_ms, line.end_ms, as_of_ms),
                )
            )
    return sorted(
        forecasts,
        key=lambda f: (-f.forecast_nano_usd * 10**6 // f.limit_nano_usd, f.scope, f.period),
    )


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")
