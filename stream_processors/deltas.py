"""The second hop's records: one scope's spend from one cycle of the data plane, summed.

The calls topic is keyed by agent, so a worker sees all of an agent's events but only part of
a pool's, a workflow's or a task type's. Each cycle the data plane sums what it counted per
such scope into a :class:`ScopeDelta` (the calendar buckets and rolling slots as sums; what
cannot be summed, such as workflow runs, concurrency intervals, spawned agents and allowance
holders' costs, only when a policy needs it) and writes one record per scope to
``<prefix>processor-scopes`` inside the cycle's transaction, on the partition of the scope's
state. The worker owning that partition folds it into the scope's state with
:meth:`SpendFold.add_delta` in a later cycle of its own, again in a transaction with the
offsets it read.

Exactness: a delta is visible to readers (read_committed) only with the calls offsets it
stands for, and applied only with the scopes offsets it came from, so each is counted once.
The delta still names the highest calls offset per calls partition it covers, and a delta
whose offsets were all applied already is skipped (a replay guard that costs one compare).

Why not per-event records, as before: at batch rates the second hop folding one record per
event and scope was ~40% of the processor's CPU (py-spy, P1), and a sum per cycle is a few
records per scope per second whatever the event rate.
"""

from __future__ import annotations

from typing import Any

import msgspec

from agentledger.schemas.policy import CALENDAR_PERIODS

from .periods import period_window, slot_start
from .tracking import EMPTY_PLAN, SPAWN_AGENTS_KEPT, Activity, BucketPlan

__all__ = [
    "DELTA_VERSION",
    "DeltaError",
    "ScopeDelta",
    "decode_delta",
    "encode_delta",
    "period_keys",
]

DELTA_VERSION = 1


class DeltaError(ValueError):
    """A scopes record that is not a valid delta; the message names the field."""


class _Wire(msgspec.Struct, forbid_unknown_fields=True):
    v: int
    scope: str
    src: list[tuple[int, int]]
    n: int
    last_ms: int
    periods: dict[str, int]
    slots: dict[str, int] = {}
    times: list[tuple[int, int]] | None = None
    intervals: list[tuple[int, int]] = []
    agents: dict[str, tuple[str | None, int, int]] = {}
    holders: dict[str, list[tuple[int, int]]] = {}


_ENCODE = msgspec.json.Encoder().encode
_DECODE = msgspec.json.Decoder(_Wire).decode


class ScopeDelta:
    """What one cycle counted for one scope, built event by event with :meth:`add`."""

    __slots__ = (
        "agents",
        "events",
        "holders",
        "intervals",
        "last_ms",
        "periods",
        "scope",
        "slots",
        "sources",
        "times",
    )

    def __init__(self, scope: str) -> None:
        self.scope = scope
        #: calls partition -> the highest offset counted in this delta.
        self.sources: dict[int, int] = {}
        self.events = 0
        self.last_ms = 0
        self.periods: dict[str, int] = {}
        self.slots: dict[str, int] = {}
        #: (event time, cost) in counting order, kept only when a policy tracks workflow runs.
        self.times: list[tuple[int, int]] | None = None
        self.intervals: list[tuple[int, int]] = []
        self.agents: dict[str, tuple[str | None, int, int]] = {}
        self.holders: dict[str, list[tuple[int, int]]] = {}

    def add(
        self,
        period_keys: list[str],
        event_time_ms: int,
        cost: int,
        partition: int,
        offset: int,
        now_ms: int,
        plan: BucketPlan = EMPTY_PLAN,
        activity: Activity | None = None,
        holder: str | None = None,
    ) -> None:
        """Count one event: ``period_keys`` are its calendar buckets (:func:`period_keys`)."""
        self.events += 1
        if offset > self.sources.get(partition, -1):
            self.sources[partition] = offset
        if event_time_ms > self.last_ms:
            self.last_ms = event_time_ms
        periods = self.periods
        for key in period_keys:
            periods[key] = periods.get(key, 0) + cost
        if holder is not None and cost:
            self.holders.setdefault(holder, []).append((event_time_ms, cost))
        if not (plan.slots or plan.run_idles or plan.concurrency or plan.spawn):
            return
        for slot, keep in plan.slots:
            if event_time_ms <= now_ms - keep - slot:
                continue  # outside every window that reads this slot size, as SpendFold does
            key = f"{slot}:{slot_start(event_time_ms, slot)}"
            self.slots[key] = self.slots.get(key, 0) + cost
        if plan.run_idles:
            if self.times is None:
                self.times = []
            self.times.append((event_time_ms, cost))
        if plan.concurrency and activity is not None and activity.latency_ms is not None:
            self.intervals.append((event_time_ms, event_time_ms + activity.latency_ms))
        if plan.spawn and activity is not None and activity.agent_id is not None:
            agents = self.agents
            seen = agents.get(activity.agent_id)
            if seen is None or event_time_ms < seen[2]:
                agents[activity.agent_id] = (
                    activity.parent_agent_id,
                    activity.spawn_depth,
                    event_time_ms,
                )
                while len(agents) > SPAWN_AGENTS_KEPT:
                    del agents[min(agents, key=lambda a: agents[a][2])]

    def merge(self, other: ScopeDelta, *, with_activity: bool = True) -> None:
        """Add ``other`` (summed for another scope set) to this one; ``with_activity=False``
        leaves out who made the calls (task types track no concurrency or spawns)."""
        self.events += other.events
        sources = self.sources
        for partition, offset in other.sources.items():
            if offset > sources.get(partition, -1):
                sources[partition] = offset
        if other.last_ms > self.last_ms:
            self.last_ms = other.last_ms
        for into, add in ((self.periods, other.periods), (self.slots, other.slots)):
            for key, nano in add.items():
                into[key] = into.get(key, 0) + nano
        if other.times is not None:
            if self.times is None:
                self.times = []
            self.times.extend(other.times)
        for holder, items in other.holders.items():
            self.holders.setdefault(holder, []).extend(items)
        if not with_activity:
            return
        self.intervals.extend(other.intervals)
        agents = self.agents
        for agent_id, seen in other.agents.items():
            had = agents.get(agent_id)
            if had is None or seen[2] < had[2]:
                agents[agent_id] = seen
        while len(agents) > SPAWN_AGENTS_KEPT:
            del agents[min(agents, key=lambda a: agents[a][2])]


# zones -> (start, end, keys): the instants [start, end) share these calendar buckets. Most
# events of a cycle fall in the same day, and three zoned window lookups per event were a
# fifth of counting it (bench.processor_core).
_KEYS: dict[tuple[str, ...], tuple[int, int, list[str]]] = {}


def period_keys(event_time_ms: int, zones: tuple[str, ...]) -> list[str]:
    """The calendar buckets an event counts in: each period kind in each zone. The list is
    shared between calls: read it, never change it."""
    known = _KEYS.get(zones)
    if known is not None and known[0] <= event_time_ms < known[1]:
        return known[2]
    windows = [
        period_window(period, event_time_ms, tz) for tz in zones for period in CALENDAR_PERIODS
    ]
    keys = [w.key for w in windows]
    if len(_KEYS) > 64:  # zones come from policies, so few; bound it anyway
        _KEYS.clear()
    _KEYS[zones] = (max(w.start_ms for w in windows), min(w.end_ms for w in windows), keys)
    return keys


def encode_delta(delta: ScopeDelta) -> bytes:
    wire: dict[str, Any] = {
        "v": DELTA_VERSION,
        "scope": delta.scope,
        "src": sorted(delta.sources.items()),
        "n": delta.events,
        "last_ms": delta.last_ms,
        "periods": delta.periods,
    }
    if delta.slots:
        wire["slots"] = delta.slots
    if delta.times is not None:
        wire["times"] = delta.times
    if delta.intervals:
        wire["intervals"] = delta.intervals
    if delta.agents:
        wire["agents"] = delta.agents
    if delta.holders:
        wire["holders"] = delta.holders
    return _ENCODE(wire)


def decode_delta(value: bytes | None) -> ScopeDelta:
    """Parse a scopes record; raise :class:`DeltaError` naming what is wrong."""
    if not value:
        raise DeltaError("scope delta record is empty; expected a JSON object (deltas.py)")
    try:
        wire = _DECODE(value)
    except msgspec.ValidationError as exc:
        raise DeltaError(f"scope delta record is invalid: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DeltaError(f"scope delta record is not JSON: {exc}") from None
    if wire.v != DELTA_VERSION:
        raise DeltaError(
            f"scope delta field 'v' is {wire.v}; this processor reads version {DELTA_VERSION} "
            "(upgrade every worker to the same release)"
        )
    if not wire.scope or wire.scope.startswith("agent:"):
        raise DeltaError(
            f"scope delta field 'scope' must name a pool, workflow or task type, got {wire.scope!r}"
        )
    if not wire.src:
        raise DeltaError("scope delta field 'src' must list at least one [partition, offset]")
    numbers = [
        *(n for pair in wire.src for n in pair),
        wire.n,
        wire.last_ms,
        *wire.periods.values(),
    ]
    if any(n < 0 for n in numbers):
        raise DeltaError("scope delta fields 'src', 'n', 'last_ms' and 'periods' must be >= 0")
    delta = ScopeDelta(wire.scope)
    delta.sources = dict(wire.src)
    delta.events = wire.n
    delta.last_ms = wire.last_ms
    delta.periods = wire.periods
    delta.slots = wire.slots
    delta.times = wire.times
    delta.intervals = wire.intervals
    delta.agents = wire.agents
    delta.holders = wire.holders
    return delta
