"""Counting one event into a spend state: the per-event reference rules.

:func:`apply_cost` (every scope) and :func:`apply_event` (agents: also retries and failures)
return a new immutable state per event. fold.py applies the same rules to a whole batch in
place, and its tests compare the two on random batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from agentledger.schemas import CallFields, CallStatus, id_hex
from agentledger.schemas.policy import CALENDAR_PERIODS

from .periods import DAY_MS, parse_period_key, period_window, slot_start
from .state import Delivery, SpendState
from .tracking import (
    CONCURRENCY_HOLD_MS,
    EMPTY_PLAN,
    INTERVALS_KEPT,
    SPAWN_AGENTS_KEPT,
    Activity,
    BucketPlan,
)

__all__ = [
    "FAILING_TASKS",
    "FAILURES_PER_TASK",
    "FUTURE_TOLERANCE_MS",
    "KEEP_PERIODS_MS",
    "RECENT_IDS",
    "apply_cost",
    "apply_event",
    "run_with",
    "slot_alive",
]

# Events stamped further than this into the future are dead-lettered: a skewed or forged clock
# must not pre-spend a budget period that has not started.
FUTURE_TOLERANCE_MS = 5 * 60 * 1000
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
            slots = {k: v for k, v in slots.items() if slot_alive(k, keeps, now_ms)}
        changed["slots"] = slots
    if plan.run_idles:
        runs = dict(state.runs)
        for idle in plan.run_idles:
            runs[idle] = run_with(runs.get(idle), idle, event_time_ms, cost)
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


def slot_alive(key: str, keeps: Mapping[int, int], now_ms: int) -> bool:
    slot_text, _, start_text = key.partition(":")
    slot, start = int(slot_text), int(start_text)
    keep = keeps.get(slot)
    return keep is not None and start + slot > now_ms - keep - slot


def run_with(
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
        event_id=id_hex(event.event_id),
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
