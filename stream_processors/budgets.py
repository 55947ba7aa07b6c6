"""The processor's pure core: spend state per agent, applying events, deciding commands.

Nothing here touches faust or Kafka, so every rule is unit-tested with an injected clock.

Exactness rests on two facts kept in one state value (one changelog message, so one atomic
write): the highest source offset applied per partition, and the spend per period. A replayed
event, whose offset is at or below the applied one, changes nothing.

Outputs are idempotent too: :func:`decide` derives the wanted command from the state and the
policies, and compares it with the last command published (also kept in the state), so a crash
between the state write and the publish is repaired by the next decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any

from pydantic import ValidationError

from agentledger.schemas import (
    Alert,
    AlertKind,
    BudgetPolicy,
    CallEvent,
    CallStatus,
    ControlAction,
    ControlCommand,
    Period,
    Severity,
    Threshold,
    nano_to_usd,
)

from .periods import DAY_MS, PeriodWindow, parse_period_key, period_window

__all__ = [
    "KEEP_PERIODS_MS",
    "RECENT_IDS",
    "Crossing",
    "Decision",
    "Delivery",
    "SpendState",
    "apply_cost",
    "apply_event",
    "crossings",
    "decide",
    "evaluate",
    "format_usd",
    "matching_policies",
    "policy_specificity",
    "spend_report",
]

# Buckets that ended this long before now are dropped from the live state: no budget period
# reaches back that far, and the full history lives in ClickHouse.
KEEP_PERIODS_MS = 35 * DAY_MS
# Event ids remembered per state value, to count an event delivered twice (the same bytes
# produced twice, at two offsets) once. Bounded because the whole value is rewritten to the
# changelog on every event; a duplicate arriving more than this many events of the same key
# later is counted again.
RECENT_IDS = 128
# Failed attempts remembered per task, and tasks remembered per agent, for the retry-loop
# detector (a max_failures above FAILURES_PER_TASK cannot fire).
FAILURES_PER_TASK = 64
FAILING_TASKS = 32


class Delivery(StrEnum):
    """What one record at one source offset is, relative to a state."""

    NEW = "new"  # count it
    REPLAY = "replay"  # this very record was counted already (offset at or below applied)
    DUPLICATE = "duplicate"  # another record with the same event id was counted


_PERIOD_WORDS = {Period.DAY: "daily", Period.WEEK: "weekly", Period.MONTH: "monthly"}


@dataclass(frozen=True)
class SpendState:
    """Everything the processor knows about one agent, stored as one table value."""

    applied: Mapping[int, int] = field(default_factory=dict)
    periods: Mapping[str, int] = field(default_factory=dict)
    last_command: ControlCommand | None = None
    partition: int | None = None
    #: Recently counted event ids (hex) and the source offset each was counted at, oldest first.
    recent: Mapping[str, int] = field(default_factory=dict)
    #: Threshold crossings already alerted (:attr:`Crossing.key`), for the current periods.
    alerted: tuple[str, ...] = ()
    #: Event times of recent failed attempts per task id (agent states only), oldest first.
    failures: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def already_applied(self, partition: int, offset: int) -> bool:
        done = self.applied.get(partition)
        return done is not None and offset <= done

    def delivery(self, event_id: str | None, partition: int, offset: int) -> Delivery:
        seen_at = self.recent.get(event_id) if event_id is not None else None
        if seen_at is not None and seen_at != offset:
            return Delivery.DUPLICATE
        if self.already_applied(partition, offset):
            return Delivery.REPLAY
        return Delivery.NEW

    def spend(self, window: PeriodWindow) -> int:
        return self.periods.get(window.key, 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "applied": {str(p): o for p, o in sorted(self.applied.items())},
            "periods": dict(sorted(self.periods.items())),
            "last_command": (
                self.last_command.model_dump(mode="json") if self.last_command else None
            ),
            "partition": self.partition,
            # A list, not an object: the order says which ids to forget first.
            "recent": [[event_id, offset] for event_id, offset in self.recent.items()],
            "alerted": list(self.alerted),
            "failures": {task: list(times) for task, times in self.failures.items()},
        }

    @classmethod
    def from_json(cls, data: Any) -> SpendState:
        """Rebuild a state from :meth:`to_json`; raise ValueError naming a malformed field."""
        if not isinstance(data, dict):
            raise ValueError(f"spend state must be a JSON object, got {type(data).__name__}")
        applied_raw = data.get("applied", {})
        periods_raw = data.get("periods", {})
        if not isinstance(applied_raw, dict):
            raise ValueError("spend state field 'applied' must map partition to offset")
        if not isinstance(periods_raw, dict):
            raise ValueError("spend state field 'periods' must map period key to nano-USD")
        try:
            applied = {int(p): _int(o, f"applied.{p}") for p, o in applied_raw.items()}
        except ValueError as exc:
            raise ValueError(f"spend state field 'applied': {exc}") from None
        periods: dict[str, int] = {}
        for key, nano in periods_raw.items():
            parse_period_key(key)
            periods[key] = _int(nano, f"periods.{key}")
        raw_command = data.get("last_command")
        try:
            command = ControlCommand.model_validate(raw_command) if raw_command else None
        except ValidationError as exc:
            raise ValueError(f"spend state field 'last_command': {exc}") from None
        partition = data.get("partition")
        if partition is not None:
            partition = _int(partition, "partition")
        recent_raw = data.get("recent", [])
        if not isinstance(recent_raw, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
            for pair in recent_raw
        ):
            raise ValueError("spend state field 'recent' must be a list of [event_id, offset]")
        recent = {pair[0]: _int(pair[1], f"recent.{pair[0]}") for pair in recent_raw}
        alerted = data.get("alerted", [])
        if not isinstance(alerted, list) or not all(isinstance(k, str) for k in alerted):
            raise ValueError("spend state field 'alerted' must be a list of strings")
        failures_raw = data.get("failures", {})
        if not isinstance(failures_raw, dict) or not all(
            isinstance(times, list) for times in failures_raw.values()
        ):
            raise ValueError("spend state field 'failures' must map task id to a list of times")
        failures = {
            str(task): tuple(_int(t, f"failures.{task}") for t in times)
            for task, times in failures_raw.items()
        }
        return cls(
            failures=failures,
            applied=applied,
            periods=periods,
            last_command=command,
            partition=partition,
            recent=recent,
            alerted=tuple(alerted),
        )


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def apply_cost(
    state: SpendState,
    *,
    event_id: str | None,
    event_time_ms: int,
    cost_nano_usd: int,
    partition: int,
    offset: int,
    now_ms: int,
    state_partition: int | None = None,
) -> SpendState:
    """Count one cost (read at source ``partition``/``offset``) in the periods of its time.

    Returns ``state`` itself for a replayed offset or an event id counted already, so both
    are no-ops. Every cost counts toward every period kind, so a policy published later, of
    any period, sees the spend made before it arrived. ``state_partition`` is where the
    state lives when that differs from the source partition (the scopes hop).
    """
    if state.delivery(event_id, partition, offset) is not Delivery.NEW:
        return state
    periods = dict(state.periods)
    for period in Period:
        key = period_window(period, event_time_ms).key
        periods[key] = periods.get(key, 0) + cost_nano_usd
    horizon = now_ms - KEEP_PERIODS_MS
    periods = {k: v for k, v in periods.items() if parse_period_key(k).end_ms > horizon}
    applied = {**state.applied, partition: offset}
    recent = dict(state.recent)
    if event_id is not None:
        recent[event_id] = offset
        while len(recent) > RECENT_IDS:
            del recent[next(iter(recent))]
    return replace(
        state,
        applied=applied,
        periods=periods,
        partition=partition if state_partition is None else state_partition,
        recent=recent,
    )


def apply_event(
    state: SpendState, event: CallEvent, partition: int, offset: int, *, now_ms: int
) -> SpendState:
    """Count ``event`` (read at ``partition``/``offset``); see :func:`apply_cost`. A failed
    attempt on a task is also remembered for the retry-loop detector."""
    counted = apply_cost(
        state,
        event_id=event.event_id.hex,
        event_time_ms=event.event_time_ms,
        cost_nano_usd=event.cost_nano_usd,
        partition=partition,
        offset=offset,
        now_ms=now_ms,
    )
    if counted is state or event.status is CallStatus.OK or event.task_id is None:
        return counted
    failures = dict(counted.failures)
    times = failures.pop(event.task_id, ())  # re-inserted last: the most recent task
    failures[event.task_id] = tuple(sorted((*times, event.event_time_ms)))[-FAILURES_PER_TASK:]
    while len(failures) > FAILING_TASKS:
        del failures[next(iter(failures))]
    return replace(counted, failures=failures)


def policy_specificity(pattern: str) -> int:
    """How specific a scope pattern is: the number of its literal (non-wildcard) characters.

    ``agent:*`` (every agent) is the least specific agent pattern, so it is the default.
    """
    return sum(1 for ch in pattern if ch not in "*?")


def _is_glob(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


def matching_policies(policies: Iterable[BudgetPolicy], scope: str) -> list[BudgetPolicy]:
    """The policies that govern ``scope``: at most one per period, ordered by period.

    Per period, a policy naming the scope exactly wins; otherwise the matching glob with the
    most literal characters (``agent:researcher-*`` before ``agent:*``); a tie goes to the
    alphabetically first pattern, so every worker picks the same one.
    """
    best: dict[Period, BudgetPolicy] = {}
    for policy in policies:
        pattern = policy.scope
        if pattern != scope and not (_is_glob(pattern) and fnmatchcase(scope, pattern)):
            continue
        current = best.get(policy.period)
        if current is None or _rank(policy, scope) < _rank(current, scope):
            best[policy.period] = policy
    return sorted(best.values(), key=lambda p: p.period.value)


def _rank(policy: BudgetPolicy, scope: str) -> tuple[int, int, str]:
    exact = 0 if policy.scope == scope else 1
    return (exact, -policy_specificity(policy.scope), policy.scope)


def format_usd(nano: int) -> str:
    """Dollars for people: cents always, more digits only when they are not zero."""
    amount = nano_to_usd(nano).normalize()
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        amount = amount.quantize(Decimal("0.01"))
    return f"${amount:,f}"


# Which command wins when thresholds of several periods (or several thresholds) are crossed:
# the one that restrains the agent most.
_SEVERITY = {
    ControlAction.ROUTE: 1,
    ControlAction.THROTTLE: 2,
    ControlAction.REFUSE_NEW_WORK: 3,
    ControlAction.STOP: 4,
}
_ACTION_WORDS = {
    "alert": "alert",
    "refuse_new_work": "refuse new work",
    "throttle": "throttle",
    "route": "route",
    "stop": "stop",
}


@dataclass(frozen=True)
class Crossing:
    """One threshold of one policy that the current period's spend has reached."""

    policy: BudgetPolicy
    threshold: Threshold
    window: PeriodWindow
    spend: int
    limit: int
    kind: AlertKind = AlertKind.THRESHOLD
    task_id: str | None = None  # retry loops: the task, and ``spend`` counts its failures

    @property
    def key(self) -> str:
        """Names the crossing in the state, so its alert is raised once per period."""
        if self.kind is AlertKind.RETRY_LOOP:
            return f"{self.policy.key}|retry|{self.task_id}"
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


@dataclass(frozen=True)
class Decision:
    """What the state calls for now: a command to publish (None: what stands is right), the
    alerts to raise, and the crossings alerted so far (to keep in the state)."""

    command: ControlCommand | None
    alerts: tuple[Alert, ...]
    alerted: tuple[str, ...]


def crossings(
    state: SpendState, policies: Iterable[BudgetPolicy], scope: str, now_ms: int
) -> list[Crossing]:
    """Every threshold reached in the current period of each policy that governs ``scope``.

    Reached means spend >= at_percent% of the limit, compared exactly in integers.
    """
    found = []
    for policy in matching_policies(policies, scope):
        window = period_window(policy.period, now_ms)
        spend = state.spend(window)
        limit = policy.limit_nano_usd
        for threshold in policy.effective_thresholds:
            # at_percent has at most 2 decimals: compare spend * 10_000 with limit * pct * 100.
            if spend * 10_000 >= limit * int(threshold.at_percent * 100):
                found.append(Crossing(policy, threshold, window, spend, limit))
        if policy.spike is not None:
            # Spike: the shorter window's spend against the policy's own (longer) limit.
            short = period_window(policy.spike.window, now_ms)
            burst = state.spend(short)
            if burst * 10_000 >= limit * int(policy.spike.at_percent * 100):
                found.append(
                    Crossing(
                        policy,
                        policy.spike.as_threshold(),
                        short,
                        burst,
                        limit,
                        AlertKind.SPIKE,
                    )
                )
        if policy.retry_loop is not None:
            found.extend(_retry_loops(state, policy, now_ms))
    return found


def _retry_loops(state: SpendState, policy: BudgetPolicy, now_ms: int) -> list[Crossing]:
    rule = policy.retry_loop
    assert rule is not None
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


def _reason(scope: str, top: Crossing) -> str:
    word = _PERIOD_WORDS[top.policy.period]
    text = f"{scope} spent {format_usd(top.spend)} of {format_usd(top.limit)} {word} budget"
    threshold = top.threshold
    if top.kind is AlertKind.RETRY_LOOP:
        return _retry_message(scope, top)
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


def _alert(scope: str, crossing: Crossing, now_ms: int) -> Alert:
    threshold = crossing.threshold
    word = _PERIOD_WORDS[crossing.policy.period]
    if crossing.kind is AlertKind.RETRY_LOOP:
        return Alert(
            kind=AlertKind.RETRY_LOOP,
            severity=Severity.CRITICAL if threshold.action == "stop" else Severity.WARNING,
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
        severity=Severity.CRITICAL if threshold.action == "stop" else Severity.WARNING,
        scope=scope,
        message=message,
        issued_at_ms=now_ms,
        period_start_ms=crossing.window.start_ms,
        spend_nano_usd=crossing.spend,
        limit_nano_usd=crossing.limit,
        action=threshold.action,
        details={"policy": crossing.policy.key, "at_percent": str(threshold.at_percent)},
    )


def evaluate(
    state: SpendState, policies: Mapping[str, BudgetPolicy], scope: str, now_ms: int
) -> Decision:
    """Derive the command and the alerts for ``scope`` from the state and the policies.

    The most restraining crossed threshold's action stands (stop > refuse_new_work >
    throttle > route; the smallest throttle; then the latest-ending period). It lapses
    (RESUME) when the period rolls over or the policy is raised or removed. Each crossing is
    alerted once per period. Unsigned: the caller signs.
    """
    found = crossings(state, policies.values(), scope, now_ms)
    previously = set(state.alerted)
    alerts = tuple(_alert(scope, c, now_ms) for c in found if c.key not in previously)
    alerted = tuple(sorted({c.key for c in found}))
    acting = [c for c in found if c.threshold.control_action is not None]
    last = state.last_command
    standing = last is not None and last.action is not ControlAction.RESUME
    if acting:
        top = max(acting, key=Crossing.rank)
        action = top.threshold.control_action
        assert action is not None  # filtered above
        command = ControlCommand(
            scope=scope,
            action=action,
            params=top.threshold.params,
            reason=_reason(scope, top),
            limit_nano_usd=top.limit,
            spend_nano_usd=top.spend,
            period_start_ms=top.window.start_ms,
            until_ms=top.window.end_ms,
            issued_at_ms=now_ms,
        )
        if _same_standing(last, command):
            return Decision(None, alerts, alerted)
        return Decision(command, alerts, alerted)
    if last is None or not standing:
        return Decision(None, alerts, alerted)
    if last.until_ms is not None and last.until_ms <= now_ms:
        why = f"{scope}: the budget period that was spent has ended; a new period started"
    else:
        why = f"{scope}: no budget threshold is crossed any more (policy raised or removed)"
    resume = ControlCommand(
        scope=scope, action=ControlAction.RESUME, reason=why, issued_at_ms=now_ms
    )
    return Decision(resume, alerts, alerted)


def decide(
    state: SpendState, policies: Mapping[str, BudgetPolicy], scope: str, now_ms: int
) -> ControlCommand | None:
    """The command to publish for ``scope`` now, or None when what stands is already right."""
    return evaluate(state, policies, scope, now_ms).command


def spend_report(
    state: SpendState | None, policies: Mapping[str, BudgetPolicy], scope: str, now_ms: int
) -> dict[str, Any]:
    """What /state/<scope> answers: spend and limit per current period, and what stands."""
    state = state or SpendState()
    periods = []
    governed = {p.period: p for p in matching_policies(policies.values(), scope)}
    for period in Period:
        window = period_window(period, now_ms)
        spend = state.spend(window)
        policy = governed.get(period)
        periods.append(
            {
                "period": period.value,
                "start_ms": window.start_ms,
                "end_ms": window.end_ms,
                "spend_nano_usd": spend,
                "spend_usd": f"{nano_to_usd(spend):f}",
                "limit_nano_usd": policy.limit_nano_usd if policy else None,
                "limit_usd": str(policy.limit_usd) if policy else None,
                "percent_used": _percent(spend, policy.limit_nano_usd) if policy else None,
                "policy": policy.scope if policy else None,
                "thresholds": (
                    [
                        {"at_percent": str(t.at_percent), "action": t.action}
                        for t in policy.effective_thresholds
                    ]
                    if policy
                    else []
                ),
            }
        )
    return {
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


def _percent(spend: int, limit: int) -> str:
    """Percent of the limit spent, two decimals, rounded down (exact integer arithmetic)."""
    hundredths = spend * 10_000 // limit
    return f"{hundredths // 100}.{hundredths % 100:02d}"
