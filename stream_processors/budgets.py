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

from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any

from pydantic import ValidationError

from agentledger.schemas import (
    Alert,
    AlertKind,
    BudgetPolicy,
    CallFields,
    CallStatus,
    ControlAction,
    ControlCommand,
    Period,
    Severity,
    Threshold,
    format_usd,
    nano_to_usd,
    subtree_scope,
    usd_to_nano,
)
from agentledger.schemas.policy import CALENDAR_PERIODS, duration_ms

from .periods import (
    DAY_MS,
    PeriodWindow,
    parse_period_key,
    period_window,
    rolling_slot_ms,
    rolling_window,
    slot_start,
)
from .tracking import (
    BURN_SLOTS_PER_WINDOW,
    CONCURRENCY_HOLD_MS,
    EMPTY_PLAN,
    INTERVALS_KEPT,
    SPAWN_AGENTS_KEPT,
    Activity,
    BucketPlan,
    over_cap_until,
    peak_in_flight,
    spawn_findings,
)

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
    "forecast",
    "format_usd",
    "matching_policies",
    "policy_specificity",
    "policy_window",
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


_PERIOD_WORDS = {
    Period.DAY: "daily",
    Period.WEEK: "weekly",
    Period.MONTH: "monthly",
    Period.ROLLING: "rolling",
    Period.RUN: "per-run",
}


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
    #: Rolling and burn-rate slots: ``"<slot_ms>:<slot_start_ms>"`` -> nano-USD.
    slots: Mapping[str, int] = field(default_factory=dict)
    #: Workflow runs per idle gap: idle_ms -> (first event ms, last event ms, nano-USD).
    runs: Mapping[int, tuple[int, int, int]] = field(default_factory=dict)
    #: Recent calls ``(start_ms, end_ms)`` (pool states with a concurrency cap), oldest first.
    intervals: tuple[tuple[int, int], ...] = ()
    #: Agents seen (workflow states with spawn limits): agent -> (parent, depth, first ms).
    agents: Mapping[str, tuple[str | None, int, int]] = field(default_factory=dict)
    #: Spend on retries (attempt 2 and later) per calendar period key (agent states only).
    retry_spend: Mapping[str, int] = field(default_factory=dict)
    #: Subtree scopes a command published from this (workflow) state stands for.
    subtrees: tuple[str, ...] = ()
    #: Allowances per budget instance (allowances.py): budget key -> (start ms, end ms or
    #: None, {holder: (granted, confirmed, expires ms)}), amounts cumulative in nano-USD.
    leases: Mapping[str, tuple[int, int | None, Mapping[str, tuple[int, int, int]]]] = field(
        default_factory=dict
    )
    #: Per holder: (last request seq applied, when, the allowances partition it follows).
    holders: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)

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

    @cached_property
    def slot_series(self) -> Mapping[int, list[tuple[int, int]]]:
        """The slots parsed and sorted per slot length: ``{slot_ms: [(start_ms, nano)]}``.
        Kept on the (immutable) state, since one evaluation reads them several times."""
        series: dict[int, list[tuple[int, int]]] = {}
        for key, nano in self.slots.items():
            slot, _, start = key.partition(":")
            series.setdefault(int(slot), []).append((int(start), nano))
        for items in series.values():
            items.sort()
        return series

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
            "slots": dict(self.slots),
            "runs": {str(idle): list(run) for idle, run in sorted(self.runs.items())},
            "intervals": [list(pair) for pair in self.intervals],
            "agents": {a: [p, d, t] for a, (p, d, t) in self.agents.items()},
            "retry_spend": dict(sorted(self.retry_spend.items())),
            **({"subtrees": list(self.subtrees)} if self.subtrees else {}),
            **_leases_to_json(self.leases, self.holders),
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
            **_tracked_from_json(data),
            **_leases_from_json(data),
        )


def _leases_to_json(
    leases: Mapping[str, tuple[int, int | None, Mapping[str, tuple[int, int, int]]]],
    holders: Mapping[str, tuple[int, int, int]],
) -> dict[str, Any]:
    if not leases and not holders:
        return {}
    return {
        "leases": {
            key: [start, end, {h: list(v) for h, v in held.items()}]
            for key, (start, end, held) in leases.items()
        },
        "holders": {h: list(v) for h, v in holders.items()},
    }


def _leases_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    leases_raw = data.get("leases", {})
    holders_raw = data.get("holders", {})
    if not isinstance(leases_raw, dict) or not isinstance(holders_raw, dict):
        raise ValueError("spend state fields 'leases' and 'holders' must be JSON objects")
    leases: dict[str, tuple[int, int | None, dict[str, tuple[int, int, int]]]] = {}
    for key, entry in leases_raw.items():
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], dict)):
            raise ValueError(f"spend state field 'leases.{key}' must be [start, end, holders]")
        start = _int(entry[0], f"leases.{key}.start")
        end = None if entry[1] is None else _int(entry[1], f"leases.{key}.end")
        held = {}
        for holder, numbers in entry[2].items():
            if not (isinstance(numbers, list) and len(numbers) == 3):
                raise ValueError(
                    f"spend state field 'leases.{key}.{holder}' must be "
                    "[granted, confirmed, expires_ms]"
                )
            g, c, e = (_int(n, f"leases.{key}.{holder}") for n in numbers)
            held[str(holder)] = (g, c, e)
        leases[str(key)] = (start, end, held)
    holders = {}
    for holder, numbers in holders_raw.items():
        if not (isinstance(numbers, list) and len(numbers) == 3):
            raise ValueError(
                f"spend state field 'holders.{holder}' must be [seq, at_ms, partition]"
            )
        seq, at, partition = (_int(n, f"holders.{holder}") for n in numbers)
        holders[str(holder)] = (seq, at, partition)
    return {"leases": leases, "holders": holders}


def _tracked_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    slots_raw = data.get("slots", {})
    if not isinstance(slots_raw, dict):
        raise ValueError("spend state field 'slots' must map '<slot_ms>:<start_ms>' to nano-USD")
    slots = {str(k): _int(v, f"slots.{k}") for k, v in slots_raw.items()}
    runs_raw = data.get("runs", {})
    if not isinstance(runs_raw, dict) or not all(
        isinstance(r, list) and len(r) == 3 for r in runs_raw.values()
    ):
        raise ValueError("spend state field 'runs' must map idle ms to [start, last, nano-USD]")
    runs = {
        int(idle): (
            _int(r[0], f"runs.{idle}"),
            _int(r[1], f"runs.{idle}"),
            _int(r[2], f"runs.{idle}"),
        )
        for idle, r in runs_raw.items()
    }
    intervals_raw = data.get("intervals", [])
    if not isinstance(intervals_raw, list) or not all(
        isinstance(pair, list) and len(pair) == 2 for pair in intervals_raw
    ):
        raise ValueError("spend state field 'intervals' must be a list of [start_ms, end_ms]")
    intervals = tuple(
        (_int(a, "intervals.start"), _int(b, "intervals.end")) for a, b in intervals_raw
    )
    agents_raw = data.get("agents", {})
    if not isinstance(agents_raw, dict) or not all(
        isinstance(v, list) and len(v) == 3 and (v[0] is None or isinstance(v[0], str))
        for v in agents_raw.values()
    ):
        raise ValueError("spend state field 'agents' must map agent to [parent, depth, first]")
    agents = {
        str(a): (v[0], _int(v[1], f"agents.{a}"), _int(v[2], f"agents.{a}"))
        for a, v in agents_raw.items()
    }
    retry_raw = data.get("retry_spend", {})
    if not isinstance(retry_raw, dict):
        raise ValueError("spend state field 'retry_spend' must map period key to nano-USD")
    retry_spend = {}
    for key, nano in retry_raw.items():
        parse_period_key(key)
        retry_spend[key] = _int(nano, f"retry_spend.{key}")
    subtrees = data.get("subtrees", [])
    if not isinstance(subtrees, list) or not all(isinstance(s, str) for s in subtrees):
        raise ValueError("spend state field 'subtrees' must be a list of subtree scopes")
    return {
        "slots": slots,
        "runs": runs,
        "intervals": intervals,
        "agents": agents,
        "retry_spend": retry_spend,
        "subtrees": tuple(subtrees),
    }


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
    plan: BucketPlan = EMPTY_PLAN,
    activity: Activity | None = None,
) -> SpendState:
    """Count one cost (read at source ``partition``/``offset``) in the periods of its time.

    Returns ``state`` itself for a replayed offset or an event id counted already, so both
    are no-ops. Every cost counts toward every UTC calendar period kind, so a policy
    published later, of any calendar period, sees the spend made before it arrived; what
    ``plan`` asks for (zones, rolling slots, workflow runs, call intervals, spawn trees) is
    kept from when the plan asks for it. ``state_partition`` is where the state lives when
    that differs from the source partition (the scopes hop). ``activity`` says who made the
    call and for how long (forwarded to pool and workflow scopes).
    """
    if state.delivery(event_id, partition, offset) is not Delivery.NEW:
        return state
    periods = _add_to_periods(state.periods, plan, event_time_ms, cost_nano_usd, now_ms)
    tracked = _track_more(state, plan, activity, event_time_ms, cost_nano_usd, now_ms)
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
        **tracked,
    )


def _add_to_periods(
    buckets: Mapping[str, int], plan: BucketPlan, event_time_ms: int, cost: int, now_ms: int
) -> dict[str, int]:
    """``buckets`` with ``cost`` added to each calendar period (UTC and the plan's zones)."""
    periods = dict(buckets)
    grew = False
    for tz in ("UTC", *sorted(plan.zones)):
        for period in CALENDAR_PERIODS:
            key = period_window(period, event_time_ms, tz).key
            grew |= key not in periods
            periods[key] = periods.get(key, 0) + cost
    if grew:  # parsing every key is the costly part, and only a new key can push one out
        horizon = now_ms - KEEP_PERIODS_MS
        periods = {k: v for k, v in periods.items() if parse_period_key(k).end_ms > horizon}
    return periods


def _track_more(
    state: SpendState,
    plan: BucketPlan,
    activity: Activity | None,
    event_time_ms: int,
    cost: int,
    now_ms: int,
) -> dict[str, Any]:
    """The plan's trackers updated with one cost; only the fields that change."""
    changed: dict[str, Any] = {}
    if plan.slots:
        slots = dict(state.slots)
        grew = False
        for slot, keep in plan.slots:
            if event_time_ms <= now_ms - keep - slot:
                continue  # already outside every window that reads this slot size
            key = f"{slot}:{slot_start(event_time_ms, slot)}"
            grew |= key not in slots
            slots[key] = slots.get(key, 0) + cost
        if grew:
            keeps = dict(plan.slots)
            slots = {k: v for k, v in slots.items() if _slot_alive(k, keeps, now_ms)}
        changed["slots"] = slots
    if plan.run_idles:
        runs = dict(state.runs)
        for idle in plan.run_idles:
            runs[idle] = _run_with(runs.get(idle), idle, event_time_ms, cost)
        changed["runs"] = runs
    if plan.concurrency and activity is not None and activity.latency_ms is not None:
        horizon = now_ms - CONCURRENCY_HOLD_MS
        end = event_time_ms + activity.latency_ms
        kept = [pair for pair in state.intervals if pair[1] > horizon]
        if end > horizon:
            kept.append((event_time_ms, end))
        changed["intervals"] = tuple(kept[-INTERVALS_KEPT:])
    if plan.spawn and activity is not None and activity.agent_id is not None:
        seen = state.agents.get(activity.agent_id)
        if seen is None or event_time_ms < seen[2]:
            agents = dict(state.agents)
            agents[activity.agent_id] = (
                activity.parent_agent_id,
                activity.spawn_depth,
                event_time_ms,
            )
            while len(agents) > SPAWN_AGENTS_KEPT:
                del agents[min(agents, key=lambda a: agents[a][2])]
            changed["agents"] = agents
    return changed


def _slot_alive(key: str, keeps: Mapping[int, int], now_ms: int) -> bool:
    slot_text, _, start_text = key.partition(":")
    slot, start = int(slot_text), int(start_text)
    keep = keeps.get(slot)
    return keep is not None and start + slot > now_ms - keep - slot


def _run_with(
    run: tuple[int, int, int] | None, idle: int, time: int, cost: int
) -> tuple[int, int, int]:
    """A workflow's current run after one more event. A run is the workflow's events with no
    gap longer than ``idle``; an event older than the run (by more than ``idle``) belongs to
    an earlier run and is not counted in this one."""
    if run is None or time > run[1] + idle:
        return (time, time, cost)
    first, last, spend = run
    if time < first - idle:
        return run
    return (min(first, time), max(last, time), spend + cost)


def apply_event(
    state: SpendState,
    event: CallFields,
    partition: int,
    offset: int,
    *,
    now_ms: int,
    plan: BucketPlan = EMPTY_PLAN,
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
        plan=plan,
    )
    if counted is state:
        return counted
    if event.attempt > 1:
        retry_spend = _add_to_periods(
            counted.retry_spend, plan, event.event_time_ms, event.cost_nano_usd, now_ms
        )
        counted = replace(counted, retry_spend=retry_spend)
    if event.status is CallStatus.OK or event.task_id is None:
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
    best: dict[str, BudgetPolicy] = {}
    for policy in policies:
        pattern = policy.scope
        if pattern != scope and not (_is_glob(pattern) and fnmatchcase(scope, pattern)):
            continue
        current = best.get(policy.period_name)
        if current is None or _rank(policy, scope) < _rank(current, scope):
            best[policy.period_name] = policy
    return sorted(best.values(), key=lambda p: p.period_name)


def _rank(policy: BudgetPolicy, scope: str) -> tuple[int, int, str]:
    exact = 0 if policy.scope == scope else 1
    return (exact, -policy_specificity(policy.scope), policy.scope)


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


def _slot_sum(state: SpendState, slot: int, start: int, end: int) -> int:
    """Spend in the slots of length ``slot`` that start in ``[start, end)``."""
    return sum(nano for _, nano in _slot_items(state, slot, start, end))


def _slot_items(state: SpendState, slot: int, start: int, end: int) -> list[tuple[int, int]]:
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
        return window, _slot_sum(state, slot, window.start_ms, window.end_ms)
    if policy.period is Period.RUN:
        run = state.runs.get(policy.window_ms)
        if run is None or now_ms >= run[1] + policy.window_ms:
            return None
        return PeriodWindow(Period.RUN, run[0], run[1] + policy.window_ms), run[2]
    window = period_window(policy.period, now_ms, policy.timezone)
    return window, state.spend(window)


def _reached(spend: int, limit: int, percent: Decimal) -> bool:
    # at_percent has at most 2 decimals: compare spend * 10_000 with limit * pct * 100.
    return spend * 10_000 >= limit * int(percent * 100)


def _rolling_lapse(
    state: SpendState, policy: BudgetPolicy, window: PeriodWindow, threshold: Threshold
) -> int:
    """When a crossed rolling threshold lapses if nothing more is spent: the moment enough of
    the oldest slots have slid out of the window."""
    slot = rolling_slot_ms(policy.window_ms)
    items = _slot_items(state, slot, window.start_ms, window.end_ms)
    remaining = sum(nano for _, nano in items)
    limit = policy.limit_nano_usd
    for at, nano in items:
        remaining -= nano
        if not _reached(remaining, limit, threshold.at_percent):
            return at + policy.window_ms
    return window.end_ms


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
            found.extend(_threshold_crossings(state, policy, window, spend, now_ms))
        if policy.spike is not None and policy.budgeted:
            # Spike: the shorter window's spend against the policy's own (longer) limit.
            limit = policy.limit_nano_usd
            short = period_window(policy.spike.window, now_ms, policy.timezone)
            burst = state.spend(short)
            if _reached(burst, limit, policy.spike.at_percent):
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
            if policy.retry_loop.max_retry_cost_percent is not None:
                found.extend(_retry_share(state, policy, scope, now_ms))
        if policy.forecast is not None and current is not None:
            found.extend(_forecast_crossing(policy, scope, *current, now_ms))
        if policy.burn_rate is not None:
            found.extend(_burn_rate(state, policy, scope, now_ms))
        if policy.max_concurrency is not None:
            found.extend(_concurrency(state, policy, scope, now_ms))
        if policy.spawn is not None:
            found.extend(_spawn(state, policy, scope))
    return found


def _threshold_crossings(
    state: SpendState, policy: BudgetPolicy, window: PeriodWindow, spend: int, now_ms: int
) -> list[Crossing]:
    limit = policy.limit_nano_usd
    found = []
    for threshold in policy.effective_thresholds:
        if not _reached(spend, limit, threshold.at_percent):
            continue
        if policy.period is Period.ROLLING:
            lapse = _rolling_lapse(state, policy, window, threshold)
            shown = PeriodWindow(Period.ROLLING, window.start_ms, lapse)
            found.append(Crossing(policy, threshold, shown, spend, limit, sliding=True))
        else:
            found.append(Crossing(policy, threshold, window, spend, limit))
    return found


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


def _forecast_crossing(
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
    word = _PERIOD_WORDS[policy.period]
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


def _burn_rate(state: SpendState, policy: BudgetPolicy, scope: str, now_ms: int) -> list[Crossing]:
    rule = policy.burn_rate
    assert rule is not None
    window = duration_ms(rule.window)
    baseline = duration_ms(rule.baseline)
    slot = window // BURN_SLOTS_PER_WINDOW
    end = slot_start(now_ms, slot) + slot
    recent = _slot_items(state, slot, end - window, end)
    spend = sum(nano for _, nano in recent)
    before = _slot_sum(state, slot, end - window - baseline, end - window)
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


def _concurrency(
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


def _spawn(state: SpendState, policy: BudgetPolicy, scope: str) -> list[Crossing]:
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


def _retry_share(
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
        f"{period.value} ({_percent(retries, total)}%, limit {percent}%); action: {rule.action}"
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


def _retry_loops(state: SpendState, policy: BudgetPolicy, now_ms: int) -> list[Crossing]:
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


def _period_text(policy: BudgetPolicy) -> str:
    if policy.period is Period.ROLLING:
        return f"rolling {policy.window}"
    word = _PERIOD_WORDS[policy.period]
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
        "percent_used": _percent(spend, limit) if limit is not None else None,
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
    return report


def _percent(spend: int, limit: int) -> str:
    """Percent of the limit spent, two decimals, rounded down (exact integer arithmetic)."""
    hundredths = spend * 10_000 // limit
    return f"{hundredths // 100}.{hundredths % 100:02d}"
