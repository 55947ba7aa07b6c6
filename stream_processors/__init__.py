"""Stream processors (faust): spend per budget scope and period, STOP/RESUME commands.

The pure core (periods, budgets, policies) imports no faust; ``build_app`` loads faust on
first use, so importing this package has no side effects and stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .budgets import (
    Delivery,
    SpendState,
    apply_cost,
    apply_event,
    decide,
    format_usd,
    matching_policies,
    policy_specificity,
    spend_report,
)
from .periods import DAY_MS, WEEK_MS, PeriodWindow, parse_period_key, period_window
from .policies import InvalidPolicy, PolicyBook, follow_policies
from .scopes import ScopeCost, forwarded_costs, scopes_topic_name

if TYPE_CHECKING:
    from .app import build_app

__all__ = [
    "DAY_MS",
    "WEEK_MS",
    "Delivery",
    "InvalidPolicy",
    "PeriodWindow",
    "PolicyBook",
    "ScopeCost",
    "SpendState",
    "apply_cost",
    "apply_event",
    "build_app",
    "decide",
    "follow_policies",
    "format_usd",
    "forwarded_costs",
    "matching_policies",
    "parse_period_key",
    "period_window",
    "policy_specificity",
    "scopes_topic_name",
    "spend_report",
]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from .app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
