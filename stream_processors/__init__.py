"""Stream processors: spend per budget scope and period, STOP/RESUME commands (a batch data
plane on confluent-kafka, hosted by a faust worker).

The pure core (state, counting, crossings, detectors, decisions, report, periods, policies)
imports no faust; ``build_app`` loads faust on
first use, so importing this package has no side effects and stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agentledger.schemas import format_usd

from .counting import apply_cost, apply_event
from .decisions import decide
from .periods import DAY_MS, WEEK_MS, PeriodWindow, parse_period_key, period_window
from .policies import InvalidPolicy, PolicyBook, follow_policies
from .precedence import matching_policies, policy_specificity
from .report import spend_report
from .scopes import scopes_topic_name
from .state import Delivery, SpendState

if TYPE_CHECKING:
    from .app import build_app

__all__ = [
    "DAY_MS",
    "WEEK_MS",
    "Delivery",
    "InvalidPolicy",
    "PeriodWindow",
    "PolicyBook",
    "SpendState",
    "apply_cost",
    "apply_event",
    "build_app",
    "decide",
    "follow_policies",
    "format_usd",
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
