"""The live report of one scope (what ``GET /state/<scope>`` answers and ``agentledger spend``
prints): spend, limit, burn rate and forecast per current period, and what stands."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentledger.schemas import BudgetPolicy, Period, nano_to_usd
from agentledger.schemas.policy import CALENDAR_PERIODS

from .crossings import percent_used, policy_window
from .detectors import forecast
from .periods import PeriodWindow, period_window
from .precedence import matching_policies
from .state import SpendState
from .tracking import peak_in_flight

__all__ = ["spend_report"]


def _period_report(
    name: str,
    window: PeriodWindow | None,
    spend: int,
    policy: BudgetPolicy | None,
    now_ms: int,
) -> dict[str, Any]:
    limit = policy.limit_nano_usd if policy is not None and policy.budgeted else None
    start = window.start_ms if window is not None else None
    rate, exhausts = (
        forecast(spend, limit, start, now_ms)
        if limit is not None and start is not None
        else (None, None)
    )
    return {
        "period": name,
        "timezone": policy.timezone if policy is not None else "UTC",
        "start_ms": start,
        "end_ms": window.end_ms if window is not None else None,
        "spend_nano_usd": spend,
        "spend_usd": f"{nano_to_usd(spend):f}",
        "limit_nano_usd": limit,
        "limit_usd": str(policy.limit_usd) if limit is not None and policy else None,
        "percent_used": percent_used(spend, limit) if limit is not None else None,
        "policy": policy.scope if policy is not None else None,
        "thresholds": (
            [
                {"at_percent": str(t.at_percent), "action": t.action}
                for t in policy.effective_thresholds
            ]
            if policy is not None
            else []
        ),
        # Average rate over the period so far, and when the limit runs out at that rate.
        "burn_nano_usd_per_hour": rate,
        "exhausts_at_ms": exhausts,
        "exhausts_before_end": (
            exhausts is not None and window is not None and exhausts < window.end_ms
        ),
    }


def spend_report(
    state: SpendState | None, policies: Mapping[str, BudgetPolicy], scope: str, now_ms: int
) -> dict[str, Any]:
    """What /state/<scope> answers: spend, limit, burn rate and forecast per current period
    (day, week and month always, then each rolling window and run budget that governs the
    scope), and what stands."""
    state = state or SpendState()
    periods = []
    governed = {p.period_name: p for p in matching_policies(policies.values(), scope)}
    for period in CALENDAR_PERIODS:
        policy = governed.get(period.value)
        window = period_window(period, now_ms, policy.timezone if policy else "UTC")
        periods.append(_period_report(period.value, window, state.spend(window), policy, now_ms))
    for name, policy in sorted(governed.items()):
        if policy.period in (Period.ROLLING, Period.RUN) and policy.budgeted:
            current = policy_window(state, policy, now_ms)
            if current is None:
                periods.append(_period_report(name, None, 0, policy, now_ms))
            else:
                periods.append(_period_report(name, *current, policy, now_ms))
    report: dict[str, Any] = {
        "scope": scope,
        "now_ms": now_ms,
        "periods": periods,
        "buckets": dict(sorted(state.periods.items())),
        "last_command": (
            state.last_command.model_dump(mode="json") if state.last_command else None
        ),
        "applied_offsets": {str(p): o for p, o in sorted(state.applied.items())},
        "alerted": list(state.alerted),
    }
    if state.intervals:
        report["peak_in_flight"] = peak_in_flight(state.intervals)
    if state.agents:
        report["agents_seen"] = len(state.agents)
        report["max_spawn_depth"] = max(d for _, d, _ in state.agents.values())
    if state.subtrees:
        report["stopped_subtrees"] = list(state.subtrees)
    if state.leases:
        # Who holds what of each budget instance: granted, confirmed by the holder's counted
        # events, and when the allowance lapses unless renewed (the processor's view).
        report["allowances"] = {
            key: {
                holder: {
                    "granted_nano_usd": granted,
                    "confirmed_nano_usd": confirmed,
                    "expires_ms": expires,
                }
                for holder, (granted, confirmed, expires) in sorted(held.items())
            }
            for key, (_, _, held) in sorted(state.leases.items())
        }
    return report
