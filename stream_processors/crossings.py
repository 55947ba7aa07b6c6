"""Crossings: a threshold of a policy that the current period's spend has reached, or a
detector that fired (detectors.py); the current period of a policy and the exact integer
rules they are judged by. decisions.py turns crossings into commands and alerts.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from agentledger.schemas import AlertKind, BudgetPolicy, ControlAction, Period, Threshold

from .periods import PeriodWindow, period_window, rolling_slot_ms, rolling_window
from .state import SpendState

__all__ = [
    "PERIOD_WORDS",
    "Crossing",
    "percent_used",
    "policy_window",
    "reached",
    "slot_items",
    "slot_sum",
    "threshold_crossings",
]

PERIOD_WORDS = {
    Period.DAY: "daily",
    Period.WEEK: "weekly",
    Period.MONTH: "monthly",
    Period.ROLLING: "rolling",
    Period.RUN: "per-run",
}


# Which command wins when thresholds of several periods (or several thresholds) are crossed:
# the one that restrains the agent most.
_SEVERITY = {
    ControlAction.ROUTE: 1,
    ControlAction.THROTTLE: 2,
    ControlAction.REFUSE_NEW_WORK: 3,
    ControlAction.STOP: 4,
}


@dataclass(frozen=True)
class Crossing:
    """One threshold of one policy that the current period's spend has reached, or one
    detector that fired (then ``message`` says what happened)."""

    policy: BudgetPolicy
    threshold: Threshold
    window: PeriodWindow
    spend: int
    limit: int
    kind: AlertKind = AlertKind.THRESHOLD
    task_id: str | None = None  # retry loops: the task, and ``spend`` counts its failures
    #: Detectors: what fired (part of the key), the alert text and its details.
    label: str = ""
    message: str = ""
    details: Mapping[str, str | int] = field(default_factory=dict)
    #: The command carries no period start (the window slides), or stands until lifted.
    sliding: bool = False
    open_ended: bool = False
    #: The (subtree) scope the action is for, when not the evaluated scope itself.
    target: str | None = None

    @property
    def key(self) -> str:
        """Names the crossing in the state, so its alert is raised once per period (once per
        continuous stretch for sliding windows and detectors)."""
        if self.label:
            return f"{self.policy.key}|{self.label}"
        if self.kind is AlertKind.RETRY_LOOP:
            return f"{self.policy.key}|retry|{self.task_id}"
        if self.policy.period is Period.ROLLING and self.kind is AlertKind.THRESHOLD:
            return f"{self.policy.key}|{self.threshold.at_percent}"
        spike = "|spike" if self.kind is AlertKind.SPIKE else ""
        return f"{self.policy.key}|{self.window.start_ms}|{self.threshold.at_percent}{spike}"

    def rank(self) -> tuple[int, int, int, int, Decimal]:
        action = self.threshold.control_action
        severity = _SEVERITY[action] if action is not None else 0
        # Among throttles the smallest concurrency is the tightest.
        concurrency = self.threshold.params.get("concurrency", 0)
        tight = -concurrency if isinstance(concurrency, int) else 0
        return (
            severity,
            tight,
            self.window.end_ms,
            self.window.start_ms,
            self.threshold.at_percent,
        )


def slot_sum(state: SpendState, slot: int, start: int, end: int) -> int:
    """Spend in the slots of length ``slot`` that start in ``[start, end)``."""
    return sum(nano for _, nano in slot_items(state, slot, start, end))


def slot_items(state: SpendState, slot: int, start: int, end: int) -> list[tuple[int, int]]:
    """The slots of length ``slot`` that start in ``[start, end)``, oldest first."""
    items = state.slot_series.get(slot, [])
    low = bisect_left(items, (start, -1))
    high = bisect_left(items, (end, -1))
    return items[low:high]


def policy_window(
    state: SpendState, policy: BudgetPolicy, now_ms: int
) -> tuple[PeriodWindow, int] | None:
    """The policy's current period and the spend in it; None for a workflow with no run in
    progress (its last run ended ``idle`` ago) or a policy without a limit."""
    if not policy.budgeted:
        return None
    if policy.period is Period.ROLLING:
        window = rolling_window(policy.window_ms, now_ms)
        slot = rolling_slot_ms(policy.window_ms)
        return window, slot_sum(state, slot, window.start_ms, window.end_ms)
    if policy.period is Period.RUN:
        run = state.runs.get(policy.window_ms)
        if run is None or now_ms >= run[1] + policy.window_ms:
            return None
        return PeriodWindow(Period.RUN, run[0], run[1] + policy.window_ms), run[2]
    window = period_window(policy.period, now_ms, policy.timezone)
    return window, state.spend(window)


def reached(spend: int, limit: int, percent: Decimal) -> bool:
    # at_percent has at most 2 decimals: compare spend * 10_000 with limit * pct * 100.
    return spend * 10_000 >= limit * int(percent * 100)


def _rolling_lapse(
    state: SpendState, policy: BudgetPolicy, window: PeriodWindow, threshold: Threshold
) -> int:
    """When a crossed rolling threshold lapses if nothing more is spent: the moment enough of
    the oldest slots have slid out of the window."""
    slot = rolling_slot_ms(policy.window_ms)
    items = slot_items(state, slot, window.start_ms, window.end_ms)
    remaining = sum(nano for _, nano in items)
    limit = policy.limit_nano_usd
    for at, nano in items:
        remaining -= nano
        if not reached(remaining, limit, threshold.at_percent):
            return at + policy.window_ms
    return window.end_ms


def threshold_crossings(
    state: SpendState, policy: BudgetPolicy, window: PeriodWindow, spend: int, now_ms: int
) -> list[Crossing]:
    limit = policy.limit_nano_usd
    found = []
    for threshold in policy.effective_thresholds:
        if not reached(spend, limit, threshold.at_percent):
            continue
        if policy.period is Period.ROLLING:
            lapse = _rolling_lapse(state, policy, window, threshold)
            shown = PeriodWindow(Period.ROLLING, window.start_ms, lapse)
            found.append(Crossing(policy, threshold, shown, spend, limit, sliding=True))
        else:
            found.append(Crossing(policy, threshold, window, spend, limit))
    return found


def percent_used(spend: int, limit: int) -> str:
    """Percent of the limit spent, two decimals, rounded down (exact integer arithmetic)."""
    hundredths = spend * 10_000 // limit
    return f"{hundredths // 100}.{hundredths % 100:02d}"
