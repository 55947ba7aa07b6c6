"""The detectors: each judges one policy rule on a spend state and returns the crossings it
finds (none when it does not fire). Spike, forecast and burn rate read spend; the retry-loop
detectors read an agent's failures and retry spend; capacity reads a pool's call intervals,
spawn a workflow's agent tree. decisions.py gathers them with the threshold crossings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from agentledger.schemas import (
    AlertKind,
    BudgetPolicy,
    Period,
    Threshold,
    format_usd,
    subtree_scope,
    usd_to_nano,
)
from agentledger.schemas.policy import CALENDAR_PERIODS, duration_ms

from .crossings import PERIOD_WORDS, Crossing, percent_used, reached, slot_items, slot_sum
from .periods import PeriodWindow, period_window, slot_start
from .state import SpendState
from .tracking import (
    BURN_SLOTS_PER_WINDOW,
    CONCURRENCY_HOLD_MS,
    over_cap_until,
    peak_in_flight,
    spawn_findings,
)

__all__ = [
    "burn_rate_crossings",
    "capacity_crossings",
    "forecast",
    "forecast_crossings",
    "retry_loop_crossings",
    "retry_share_crossings",
    "spawn_crossings",
    "spike_crossings",
]


def spike_crossings(state: SpendState, policy: BudgetPolicy, now_ms: int) -> list[Crossing]:
    """Spend in the spike's shorter window against the policy's own (longer) limit."""
    rule = policy.spike
    assert rule is not None
    limit = policy.limit_nano_usd
    short = period_window(rule.window, now_ms, policy.timezone)
    burst = state.spend(short)
    if not reached(burst, limit, rule.at_percent):
        return []
    return [Crossing(policy, rule.as_threshold(), short, burst, limit, AlertKind.SPIKE)]


def forecast(spend: int, limit: int, start_ms: int, now_ms: int) -> tuple[int, int | None]:
    """The average burn rate since ``start_ms`` (nano-USD per hour, rounded down) and when
    the limit is exhausted at that rate (ms, rounded up; now when already exhausted; None
    when nothing was spent)."""
    elapsed = max(now_ms - start_ms, 1)
    rate = spend * 3_600_000 // elapsed
    if spend >= limit:
        return rate, now_ms
    if spend == 0:
        return rate, None
    return rate, now_ms + -(-(limit - spend) * elapsed // spend)


def forecast_crossings(
    policy: BudgetPolicy, scope: str, window: PeriodWindow, spend: int, now_ms: int
) -> list[Crossing]:
    rule = policy.forecast
    assert rule is not None
    if policy.period not in CALENDAR_PERIODS:
        return []  # a rolling window or a run has no fixed end to be exhausted before
    limit = policy.limit_nano_usd
    elapsed, length = now_ms - window.start_ms, window.end_ms - window.start_ms
    if elapsed * 100 < rule.min_elapsed_percent * length or spend >= limit:
        return []
    rate, exhausts = forecast(spend, limit, window.start_ms, now_ms)
    if exhausts is None or exhausts >= window.end_ms:
        return []
    word = PERIOD_WORDS[policy.period]
    message = (
        f"{scope} is projected to exhaust its {format_usd(limit)} {word} "
        f"budget at {_iso(exhausts)}, before the period ends at {_iso(window.end_ms)} "
        f"(spent {format_usd(spend)}, {format_usd(rate)}/h); action: {rule.action}"
    )
    return [
        Crossing(
            policy,
            rule.as_threshold(),
            window,
            spend,
            limit,
            AlertKind.FORECAST,
            label=f"{window.start_ms}|forecast",
            message=message,
            details={"exhausts_at_ms": exhausts, "burn_nano_usd_per_hour": rate},
        )
    ]


def _iso(ms: int) -> str:
    stamp = datetime.fromtimestamp(ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}Z"


def burn_rate_crossings(
    state: SpendState, policy: BudgetPolicy, scope: str, now_ms: int
) -> list[Crossing]:
    rule = policy.burn_rate
    assert rule is not None
    window = duration_ms(rule.window)
    baseline = duration_ms(rule.baseline)
    slot = window // BURN_SLOTS_PER_WINDOW
    end = slot_start(now_ms, slot) + slot
    recent = slot_items(state, slot, end - window, end)
    spend = sum(nano for _, nano in recent)
    before = slot_sum(state, slot, end - window - baseline, end - window)
    windows = baseline // window
    # Anomalous: spend * windows >= factor * before, exactly (factor has 2 decimals).
    factor = int(rule.factor * 100)
    if spend < usd_to_nano(rule.min_usd) or spend * windows * 100 < factor * before or not spend:
        return []
    average = before // windows
    message = (
        f"{scope} spent {format_usd(spend)} in the last {rule.window}, {rule.factor}x or more "
        f"its average of {format_usd(average)} per {rule.window} over the {rule.baseline} "
        f"before; action: {rule.action}"
    )
    # With nothing more spent, the burst has slid out of the window once its last slot has.
    lapse = recent[-1][0] + slot + window
    return [
        Crossing(
            policy,
            rule.as_threshold(),
            PeriodWindow(Period.ROLLING, end - window, lapse),
            spend,
            average,
            AlertKind.BURN_RATE,
            label="burn_rate",
            message=message,
            details={"window_spend_nano_usd": spend, "baseline_per_window_nano_usd": average},
            sliding=True,
        )
    ]


def capacity_crossings(
    state: SpendState, policy: BudgetPolicy, scope: str, now_ms: int
) -> list[Crossing]:
    cap = policy.max_concurrency
    assert cap is not None
    last_over = over_cap_until(state.intervals, cap)
    if last_over is None or now_ms >= last_over + CONCURRENCY_HOLD_MS:
        return []
    peak = peak_in_flight(state.intervals)
    message = (
        f"{scope} had {peak} calls in flight, more than its cap of {cap}; "
        f"action: throttle:{cap} until {CONCURRENCY_HOLD_MS // 1000}s after the last excess"
    )
    return [
        Crossing(
            policy,
            Threshold(at_percent=Decimal(100), action=f"throttle:{cap}"),
            PeriodWindow(policy.period, last_over, last_over + CONCURRENCY_HOLD_MS),
            peak,
            cap,
            AlertKind.CAPACITY,
            label="concurrency",
            message=message,
            details={"peak_in_flight": peak, "max_concurrency": cap},
            sliding=True,
        )
    ]


def spawn_crossings(state: SpendState, policy: BudgetPolicy, scope: str) -> list[Crossing]:
    rule = policy.spawn
    assert rule is not None
    words = {
        "children": "children of one parent",
        "depth": "spawn depth",
        "rate": "new agents within one minute",
    }
    workflow = scope.removeprefix("workflow:")
    found = []
    for finding in spawn_findings(
        state.agents,
        max_children=rule.max_children,
        max_depth=rule.max_depth,
        max_new_agents_per_minute=rule.max_new_agents_per_minute,
    ):
        # The subtree the offender spawned is acted on, so its siblings keep working; with
        # no single spawning agent to name, the whole workflow is.
        target = subtree_scope(workflow, finding.root) if finding.root is not None else None
        whom = (
            f" for {target} (every agent {finding.root} spawned, directly or not)"
            if target is not None
            else " for the whole workflow"
        )
        message = (
            f"{scope}: spawn explosion, {finding.value} {words[finding.what]} "
            f"(limit {finding.limit}; agent {finding.agent}); action: {rule.action}"
            + (whom if rule.action != "alert" else "")
        )
        first = min(t for _, _, t in state.agents.values())
        details: dict[str, str | int] = {"limit": finding.what, "agent": finding.agent}
        if target is not None:
            details["subtree"] = target
        found.append(
            Crossing(
                policy,
                rule.as_threshold(),
                PeriodWindow(policy.period, first, first),
                finding.value,
                finding.limit,
                AlertKind.SPAWN_EXPLOSION,
                label=f"spawn|{finding.what}" + (f"|{finding.root}" if finding.root else ""),
                message=message,
                details=details,
                open_ended=True,
                target=target,
            )
        )
    return found


def retry_share_crossings(
    state: SpendState, policy: BudgetPolicy, scope: str, now_ms: int
) -> list[Crossing]:
    rule = policy.retry_loop
    assert rule is not None and rule.max_retry_cost_percent is not None
    period = policy.period if policy.period in CALENDAR_PERIODS else Period.DAY
    window = period_window(period, now_ms, policy.timezone)
    total = state.spend(window)
    retries = state.retry_spend.get(window.key, 0)
    percent = rule.max_retry_cost_percent
    if not total or total < usd_to_nano(rule.min_spend_usd):
        return []
    if retries * 10_000 < total * int(percent * 100):
        return []
    message = (
        f"{scope}: retries cost {format_usd(retries)} of {format_usd(total)} spent this "
        f"{period.value} ({percent_used(retries, total)}%, limit {percent}%); action: {rule.action}"
    )
    return [
        Crossing(
            policy,
            rule.as_threshold(),
            window,
            retries,
            total,
            AlertKind.RETRY_LOOP,
            label=f"retry_share|{window.start_ms}",
            message=message,
            details={"retry_nano_usd": retries, "spend_nano_usd": total},
        )
    ]


def retry_loop_crossings(state: SpendState, policy: BudgetPolicy, now_ms: int) -> list[Crossing]:
    rule = policy.retry_loop
    assert rule is not None
    if rule.max_failures is None:
        return []
    window_ms = rule.window_s * 1000
    found = []
    for task_id, times in state.failures.items():
        if not times or now_ms >= times[-1] + window_ms:
            continue  # the loop, if any, ended a window ago
        recent = [t for t in times if t > times[-1] - window_ms]
        if len(recent) > rule.max_failures:
            window = PeriodWindow(policy.period, recent[0], times[-1] + window_ms)
            found.append(
                Crossing(
                    policy,
                    rule.as_threshold(),
                    window,
                    len(recent),
                    rule.max_failures,
                    AlertKind.RETRY_LOOP,
                    task_id,
                )
            )
    return found
