"""The decision step: from a scope's spend state and the policies governing it, the command
to publish and the alerts to raise.

Outputs are idempotent: :func:`evaluate` derives the wanted command from the state and the
policies, and compares it with the last command published (kept in the state too), so a crash
between the state write and the publish is repaired by the next decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from agentledger.schemas import (
    Alert,
    AlertKind,
    BudgetPolicy,
    ControlAction,
    ControlCommand,
    Period,
    Severity,
    format_usd,
)

from .crossings import PERIOD_WORDS, Crossing, policy_window, threshold_crossings
from .detectors import (
    burn_rate_crossings,
    capacity_crossings,
    forecast_crossings,
    retry_loop_crossings,
    retry_share_crossings,
    spawn_crossings,
    spike_crossings,
)
from .precedence import matching_policies
from .state import SpendState

__all__ = ["Decision", "crossings", "decide", "evaluate"]

_ACTION_WORDS = {
    "alert": "alert",
    "refuse_new_work": "refuse new work",
    "throttle": "throttle",
    "route": "route",
    "stop": "stop",
}


@dataclass(frozen=True)
class Decision:
    """What the state calls for now: a command to publish (None: what stands is right), the
    alerts to raise, and the crossings alerted so far (to keep in the state); plus commands
    for subtrees of a workflow and the subtree scopes that stand after them (to keep)."""

    command: ControlCommand | None
    alerts: tuple[Alert, ...]
    alerted: tuple[str, ...]
    subtree_commands: tuple[ControlCommand, ...] = ()
    subtrees: tuple[str, ...] = ()


def crossings(
    state: SpendState,
    policies: Iterable[BudgetPolicy],
    scope: str,
    now_ms: int,
    governing: Sequence[BudgetPolicy] | None = None,
) -> list[Crossing]:
    """Every threshold reached in the current period of each policy that governs ``scope``,
    and every detector of those policies that fires now. ``governing`` is
    ``matching_policies(policies, scope)`` when the caller has it already.

    Reached means spend >= at_percent% of the limit, compared exactly in integers.
    """
    found: list[Crossing] = []
    if governing is None:
        governing = matching_policies(policies, scope)
    for policy in governing:
        current = policy_window(state, policy, now_ms)
        if current is not None:
            window, spend = current
            found.extend(threshold_crossings(state, policy, window, spend, now_ms))
        if policy.spike is not None and policy.budgeted:
            found.extend(spike_crossings(state, policy, now_ms))
        if policy.retry_loop is not None:
            found.extend(retry_loop_crossings(state, policy, now_ms))
            if policy.retry_loop.max_retry_cost_percent is not None:
                found.extend(retry_share_crossings(state, policy, scope, now_ms))
        if policy.forecast is not None and current is not None:
            found.extend(forecast_crossings(policy, scope, *current, now_ms))
        if policy.burn_rate is not None:
            found.extend(burn_rate_crossings(state, policy, scope, now_ms))
        if policy.max_concurrency is not None:
            found.extend(capacity_crossings(state, policy, scope, now_ms))
        if policy.spawn is not None:
            found.extend(spawn_crossings(state, policy, scope))
    return found


def _period_text(policy: BudgetPolicy) -> str:
    if policy.period is Period.ROLLING:
        return f"rolling {policy.window}"
    word = PERIOD_WORDS[policy.period]
    if policy.timezone != "UTC":
        return f"{word} ({policy.timezone})"
    return word


def _reason(scope: str, top: Crossing) -> str:
    if top.message:
        return top.message
    if top.kind is AlertKind.RETRY_LOOP:
        return _retry_message(scope, top)
    word = _period_text(top.policy)
    text = f"{scope} spent {format_usd(top.spend)} of {format_usd(top.limit)} {word} budget"
    threshold = top.threshold
    if top.kind is AlertKind.SPIKE:
        text = (
            f"{scope} spent {format_usd(top.spend)} in one {top.window.period.value}, "
            f"{threshold.at_percent}% or more of its {format_usd(top.limit)} {word} budget (spike)"
        )
    if threshold.action == "stop" and threshold.at_percent == 100:
        return text  # the plain v1 budget
    kind, _, arg = threshold.action.partition(":")
    what = _ACTION_WORDS[kind] + (f" {arg}" if arg else "")
    if kind == "route":
        what = f"route {threshold.from_model} to {arg}"
    return f"{text}; at {threshold.at_percent}%: {what}"


def _same_standing(last: ControlCommand | None, wanted: ControlCommand) -> bool:
    return (
        last is not None
        and last.action is wanted.action
        and last.params == wanted.params
        and last.period_start_ms == wanted.period_start_ms
        and last.until_ms == wanted.until_ms
        and last.limit_nano_usd == wanted.limit_nano_usd
    )


def _retry_message(scope: str, crossing: Crossing) -> str:
    rule = crossing.policy.retry_loop
    assert rule is not None
    return (
        f"{scope}: {crossing.spend} failed attempts on task {crossing.task_id} within "
        f"{rule.window_s}s (more than {rule.max_failures}); action: {rule.action}"
    )


def _severity(action: str) -> Severity:
    return Severity.CRITICAL if action == "stop" else Severity.WARNING


def _alert(scope: str, crossing: Crossing, now_ms: int) -> Alert:
    threshold = crossing.threshold
    word = _period_text(crossing.policy)
    if crossing.kind is AlertKind.RETRY_LOOP and not crossing.message:
        return Alert(
            kind=AlertKind.RETRY_LOOP,
            severity=_severity(threshold.action),
            scope=scope,
            message=_retry_message(scope, crossing),
            issued_at_ms=now_ms,
            action=threshold.action,
            details={
                "policy": crossing.policy.key,
                "task_id": crossing.task_id or "",
                "failures": crossing.spend,
                "max_failures": crossing.limit,
            },
        )
    if crossing.message:
        money = crossing.kind in (AlertKind.FORECAST, AlertKind.BURN_RATE)
        return Alert(
            kind=crossing.kind,
            severity=_severity(threshold.action),
            scope=scope,
            message=crossing.message,
            issued_at_ms=now_ms,
            period_start_ms=None if crossing.sliding else crossing.window.start_ms,
            spend_nano_usd=crossing.spend if money else None,
            limit_nano_usd=crossing.limit if money else None,
            action=threshold.action,
            details={"policy": crossing.policy.key, **crossing.details},
        )
    if crossing.kind is AlertKind.SPIKE:
        message = (
            f"{scope} spent {format_usd(crossing.spend)} in one "
            f"{crossing.window.period.value}: {threshold.at_percent}% or more of its "
            f"{format_usd(crossing.limit)} {word} budget; action: {threshold.action}"
        )
    else:
        message = (
            f"{scope} reached {threshold.at_percent}% of its {word} budget: spent "
            f"{format_usd(crossing.spend)} of {format_usd(crossing.limit)}; "
            f"action: {threshold.action}"
        )
    return Alert(
        kind=crossing.kind,
        severity=_severity(threshold.action),
        scope=scope,
        message=message,
        issued_at_ms=now_ms,
        period_start_ms=None if crossing.sliding else crossing.window.start_ms,
        spend_nano_usd=crossing.spend,
        limit_nano_usd=crossing.limit,
        action=threshold.action,
        details={"policy": crossing.policy.key, "at_percent": str(threshold.at_percent)},
    )


def evaluate(
    state: SpendState,
    policies: Mapping[str, BudgetPolicy],
    scope: str,
    now_ms: int,
    governing: Sequence[BudgetPolicy] | None = None,
) -> Decision:
    """Derive the command and the alerts for ``scope`` from the state and the policies.

    The most restraining crossed threshold's action stands (stop > refuse_new_work >
    throttle > route; the smallest throttle; then the latest-ending period). It lapses
    (RESUME) when the period rolls over (a rolling window slides below the threshold, a
    workflow run ends) or the policy is raised or removed. Each crossing is alerted once per
    period. Unsigned: the caller signs. ``governing``: as for :func:`crossings`.
    """
    found = crossings(state, policies.values(), scope, now_ms, governing)
    previously = set(state.alerted)
    alerts = tuple(_alert(scope, c, now_ms) for c in found if c.key not in previously)
    alerted = tuple(sorted({c.key for c in found}))
    subtrees = _subtree_decision(state, found, scope, now_ms)
    acting = [c for c in found if c.threshold.control_action is not None and c.target is None]
    last = state.last_command
    standing = last is not None and last.action is not ControlAction.RESUME
    if acting:
        top = max(acting, key=Crossing.rank)
        action = top.threshold.control_action
        assert action is not None  # filtered above
        money = top.kind not in (
            AlertKind.CAPACITY,
            AlertKind.SPAWN_EXPLOSION,
            AlertKind.RETRY_LOOP,
        )
        command = ControlCommand(
            scope=scope,
            action=action,
            params=top.threshold.params,
            reason=_reason(scope, top),
            limit_nano_usd=top.limit if money else None,
            spend_nano_usd=top.spend if money else None,
            period_start_ms=None if top.sliding or top.open_ended else top.window.start_ms,
            until_ms=None if top.open_ended else top.window.end_ms,
            issued_at_ms=now_ms,
        )
        if _same_standing(last, command):
            return Decision(None, alerts, alerted, *subtrees)
        return Decision(command, alerts, alerted, *subtrees)
    if last is None or not standing:
        return Decision(None, alerts, alerted, *subtrees)
    if last.until_ms is not None and last.until_ms <= now_ms:
        why = f"{scope}: the budget period that was spent has ended; a new period started"
    else:
        why = f"{scope}: no budget threshold is crossed any more (policy raised or removed)"
    resume = ControlCommand(
        scope=scope, action=ControlAction.RESUME, reason=why, issued_at_ms=now_ms
    )
    return Decision(resume, alerts, alerted, *subtrees)


def _subtree_decision(
    state: SpendState, found: list[Crossing], scope: str, now_ms: int
) -> tuple[tuple[ControlCommand, ...], tuple[str, ...]]:
    """Commands for the subtrees that crossings target and that have none standing yet, and
    RESUMEs for those that no crossing targets any more; then the subtrees that stand."""
    wanted: dict[str, Crossing] = {}
    for crossing in found:
        target = crossing.target
        if target is None or crossing.threshold.control_action is None:
            continue
        if target not in wanted or crossing.rank() > wanted[target].rank():
            wanted[target] = crossing
    if not wanted and not state.subtrees:
        return (), ()
    commands = []
    for target, crossing in sorted(wanted.items()):
        if target in state.subtrees:
            continue  # open-ended: what stands is right until the crossing goes away
        action = crossing.threshold.control_action
        assert action is not None  # filtered above
        commands.append(
            ControlCommand(
                schema_version=2,
                scope=target,
                action=action,
                params=crossing.threshold.params,
                reason=_reason(scope, crossing),
                issued_at_ms=now_ms,
            )
        )
    for target in state.subtrees:
        if target not in wanted:
            commands.append(
                ControlCommand(
                    schema_version=2,
                    scope=target,
                    action=ControlAction.RESUME,
                    reason=f"{scope}: {target} is no longer over a spawn limit "
                    "(policy raised or removed)",
                    issued_at_ms=now_ms,
                )
            )
    return tuple(commands), tuple(sorted(wanted))


def decide(
    state: SpendState, policies: Mapping[str, BudgetPolicy], scope: str, now_ms: int
) -> ControlCommand | None:
    """The command to publish for ``scope`` now, or None when what stands is already right."""
    return evaluate(state, policies, scope, now_ms).command
