"""A batch of events folded into one key's spend state, with one copy of the state per batch.

:func:`counting.apply_event` and :func:`counting.apply_cost` return a new immutable state per
event, copying the period buckets, applied offsets and the recent event ids every time; at
batch rates those copies were most of the counting cost. :class:`SpendFold` copies the state's
containers once, updates them in place event by event with the same rules, and builds one
state at the end. Rules that prune (old buckets, old slots) depend on the batch's single
``now_ms``, so pruning once at the end leaves what pruning after each event would.

The per-event functions stay the reference: tests fold random batches both ways and compare.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from agentledger.schemas import CallFields, CallStatus
from agentledger.schemas.policy import CALENDAR_PERIODS

from .allowances import apply_lease_costs
from .counting import (
    FAILING_TASKS,
    FAILURES_PER_TASK,
    KEEP_PERIODS_MS,
    RECENT_IDS,
    run_with,
    slot_alive,
)
from .deltas import ScopeDelta
from .periods import parse_period_key, period_window, slot_start
from .state import Delivery, SpendState
from .tracking import (
    CONCURRENCY_HOLD_MS,
    EMPTY_PLAN,
    INTERVALS_KEPT,
    SPAWN_AGENTS_KEPT,
    Activity,
    BucketPlan,
)

__all__ = ["SpendFold"]


class SpendFold:
    """One key's state being counted into; :meth:`result` returns the state afterwards (the
    very input state when nothing was counted)."""

    def __init__(self, state: SpendState, *, now_ms: int, plan: BucketPlan = EMPTY_PLAN) -> None:
        self.state = state
        self.now_ms = now_ms
        self.plan = plan
        #: The zones of the calendar buckets, UTC first (deltas.period_keys takes the same).
        self.zones = ("UTC", *sorted(plan.zones))
        self._tracks = bool(plan.slots or plan.run_idles or plan.concurrency or plan.spawn)
        self._counted = False
        self._applied = dict(state.applied)
        self._recent = dict(state.recent)
        self._periods = dict(state.periods)
        self._periods_grew = False
        self._partition = state.partition
        # Copied on first use: most batches of most keys touch none of these.
        self._retry: dict[str, int] | None = None
        self._retry_grew = False
        self._failures: dict[str, tuple[int, ...]] | None = None
        self._slots: dict[str, int] | None = None
        self._slots_grew = False
        self._runs: dict[int, tuple[int, int, int]] | None = None
        self._intervals: list[tuple[int, int]] | None = None
        self._agents: dict[str, tuple[str | None, int, int]] | None = None
        # Costs of events made under an allowance, per holder (allowances.py).
        self._lease_costs: dict[str, list[tuple[int, int]]] | None = None

    def delivery(self, event_id: str | None, partition: int, offset: int) -> Delivery:
        """As :meth:`SpendState.delivery`, against what is counted so far."""
        seen_at = self._recent.get(event_id) if event_id is not None else None
        if seen_at is not None and seen_at != offset:
            return Delivery.DUPLICATE
        done = self._applied.get(partition)
        if done is not None and offset <= done:
            return Delivery.REPLAY
        return Delivery.NEW

    def add_event(
        self,
        event: CallFields,
        event_id: str,
        partition: int,
        offset: int,
        holder: str | None = None,
        period_keys: list[str] | None = None,
    ) -> Delivery:
        """Count ``event`` (a CallEvent or a CallRecord; ``event_id`` is its id as hex) as
        :func:`counting.apply_event` does; return what the record was (only NEW ones are
        counted). ``holder`` is the shim process whose allowance the call spent, if any;
        ``period_keys`` the event's calendar buckets when the caller has them
        (:func:`deltas.period_keys` with this fold's zones)."""
        # Positional and private: keyword calls were a tenth of the fold's time per event.
        delivery = self._add(
            event_id,
            event.event_time_ms,
            event.cost_nano_usd,
            partition,
            offset,
            None,
            None,
            holder,
            period_keys,
        )
        if delivery is not Delivery.NEW:
            return delivery
        if event.attempt > 1:
            if self._retry is None:
                self._retry = dict(self.state.retry_spend)
            self._retry_grew |= self._add_to_periods(
                self._retry, event.event_time_ms, event.cost_nano_usd, period_keys
            )
        if event.status is not CallStatus.OK and event.task_id is not None:
            if self._failures is None:
                self._failures = dict(self.state.failures)
            failures = self._failures
            times = failures.pop(event.task_id, ())  # re-inserted last: the most recent task
            merged = tuple(sorted((*times, event.event_time_ms)))[-FAILURES_PER_TASK:]
            failures[event.task_id] = merged
            while len(failures) > FAILING_TASKS:
                del failures[next(iter(failures))]
        return delivery

    def add_cost(
        self,
        *,
        event_id: str | None,
        event_time_ms: int,
        cost_nano_usd: int,
        partition: int,
        offset: int,
        state_partition: int | None = None,
        activity: Activity | None = None,
        holder: str | None = None,
        period_keys: list[str] | None = None,
    ) -> Delivery:
        """Count one cost as :func:`counting.apply_cost` does; return what the record was."""
        return self._add(
            event_id,
            event_time_ms,
            cost_nano_usd,
            partition,
            offset,
            state_partition,
            activity,
            holder,
            period_keys,
        )

    def _add(
        self,
        event_id: str | None,
        event_time_ms: int,
        cost_nano_usd: int,
        partition: int,
        offset: int,
        state_partition: int | None,
        activity: Activity | None,
        holder: str | None,
        period_keys: list[str] | None,
    ) -> Delivery:
        delivery = self.delivery(event_id, partition, offset)
        if delivery is not Delivery.NEW:
            return delivery
        self._counted = True
        if holder is not None and cost_nano_usd and self.state.leases:
            if self._lease_costs is None:
                self._lease_costs = {}
            self._lease_costs.setdefault(holder, []).append((event_time_ms, cost_nano_usd))
        self._periods_grew |= self._add_to_periods(
            self._periods, event_time_ms, cost_nano_usd, period_keys
        )
        if self._tracks:
            self._track_more(activity, event_time_ms, cost_nano_usd)
        self._applied[partition] = offset
        self._partition = partition if state_partition is None else state_partition
        if event_id is not None:
            recent = self._recent
            recent[event_id] = offset
            if len(recent) > RECENT_IDS:
                del recent[next(iter(recent))]
        return delivery

    def add_delta(self, delta: ScopeDelta, state_partition: int) -> Delivery:
        """Count a cycle's sum for this scope (deltas.py): what :meth:`add_cost` would leave
        after each of the delta's events, except the recent event ids (the agent's state
        already told duplicates apart). REPLAY when every offset it covers was applied."""
        applied = self._applied
        if all(offset <= applied.get(p, -1) for p, offset in delta.sources.items()):
            return Delivery.REPLAY
        self._counted = True
        for p, offset in delta.sources.items():
            if offset > applied.get(p, -1):
                applied[p] = offset
        self._partition = state_partition
        periods = self._periods
        for key, nano in delta.periods.items():
            had = periods.get(key)
            if had is None:
                self._periods_grew = True
                periods[key] = nano
            else:
                periods[key] = had + nano
        if delta.holders and self.state.leases:
            if self._lease_costs is None:
                self._lease_costs = {}
            for holder, items in delta.holders.items():
                self._lease_costs.setdefault(holder, []).extend(items)
        plan = self.plan
        if plan.slots and delta.slots:
            if self._slots is None:
                self._slots = dict(self.state.slots)
            slots = self._slots
            for key, nano in delta.slots.items():
                had = slots.get(key)
                if had is None:
                    self._slots_grew = True
                    slots[key] = nano
                else:
                    slots[key] = had + nano
        if plan.run_idles and delta.times:
            if self._runs is None:
                self._runs = dict(self.state.runs)
            for idle in plan.run_idles:
                run = self._runs.get(idle)
                for time, cost in delta.times:
                    run = run_with(run, idle, time, cost)
                if run is not None:
                    self._runs[idle] = run
        if plan.concurrency and delta.intervals:
            if self._intervals is None:
                self._intervals = list(self.state.intervals)
            self._intervals.extend(delta.intervals)
        if plan.spawn and delta.agents:
            if self._agents is None:
                self._agents = dict(self.state.agents)
            agents = self._agents
            for agent_id, (parent, depth, time) in delta.agents.items():
                seen = agents.get(agent_id)
                if seen is None or time < seen[2]:
                    agents[agent_id] = (parent, depth, time)
            while len(agents) > SPAWN_AGENTS_KEPT:
                del agents[min(agents, key=lambda a: agents[a][2])]
        return Delivery.NEW

    def _add_to_periods(
        self, buckets: dict[str, int], event_time_ms: int, cost: int, keys: list[str] | None
    ) -> bool:
        """Add ``cost`` to each calendar period of its time (``keys``, when known); True when a
        bucket was new."""
        if keys is None:
            keys = [
                period_window(period, event_time_ms, tz).key
                for tz in self.zones
                for period in CALENDAR_PERIODS
            ]
        grew = False
        for key in keys:
            nano = buckets.get(key)
            if nano is None:
                grew = True
                buckets[key] = cost
            else:
                buckets[key] = nano + cost
        return grew

    def _track_more(self, activity: Activity | None, event_time_ms: int, cost: int) -> None:
        plan, now_ms = self.plan, self.now_ms
        if plan.slots:
            if self._slots is None:
                self._slots = dict(self.state.slots)
            slots = self._slots
            for slot, keep in plan.slots:
                if event_time_ms <= now_ms - keep - slot:
                    continue  # already outside every window that reads this slot size
                key = f"{slot}:{slot_start(event_time_ms, slot)}"
                nano = slots.get(key)
                if nano is None:
                    self._slots_grew = True
                    slots[key] = cost
                else:
                    slots[key] = nano + cost
        if plan.run_idles:
            if self._runs is None:
                self._runs = dict(self.state.runs)
            for idle in plan.run_idles:
                self._runs[idle] = run_with(self._runs.get(idle), idle, event_time_ms, cost)
        if plan.concurrency and activity is not None and activity.latency_ms is not None:
            if self._intervals is None:
                self._intervals = list(self.state.intervals)
            # Filtered and trimmed once in result(): the horizon is the same for the batch.
            self._intervals.append((event_time_ms, event_time_ms + activity.latency_ms))
        if plan.spawn and activity is not None and activity.agent_id is not None:
            if self._agents is None:
                self._agents = dict(self.state.agents)
            agents = self._agents
            seen = agents.get(activity.agent_id)
            if seen is None or event_time_ms < seen[2]:
                agents[activity.agent_id] = (
                    activity.parent_agent_id,
                    activity.spawn_depth,
                    event_time_ms,
                )
                while len(agents) > SPAWN_AGENTS_KEPT:
                    del agents[min(agents, key=lambda a: agents[a][2])]

    def result(self) -> SpendState:
        if not self._counted:
            return self.state
        horizon = self.now_ms - KEEP_PERIODS_MS
        changed: dict[str, Any] = {
            "applied": self._applied,
            "periods": _pruned(self._periods, horizon) if self._periods_grew else self._periods,
            "partition": self._partition,
            "recent": self._recent,
        }
        if self._retry is not None:
            changed["retry_spend"] = (
                _pruned(self._retry, horizon) if self._retry_grew else self._retry
            )
        if self._failures is not None:
            changed["failures"] = self._failures
        if self._slots is not None:
            slots = self._slots
            if self._slots_grew:
                keeps = dict(self.plan.slots)
                slots = {k: v for k, v in slots.items() if slot_alive(k, keeps, self.now_ms)}
            changed["slots"] = slots
        if self._runs is not None:
            changed["runs"] = self._runs
        if self._intervals is not None:
            hold = self.now_ms - CONCURRENCY_HOLD_MS
            kept = [pair for pair in self._intervals if pair[1] > hold]
            changed["intervals"] = tuple(kept[-INTERVALS_KEPT:])
        if self._agents is not None:
            changed["agents"] = self._agents
        counted = replace(self.state, **changed)
        if self._lease_costs is not None:
            counted = apply_lease_costs(counted, self._lease_costs)
        return counted


def _pruned(buckets: dict[str, int], horizon: int) -> dict[str, int]:
    return {k: v for k, v in buckets.items() if parse_period_key(k).end_ms > horizon}
