"""What the spend state must track beyond calendar buckets, derived from the policies in force,
and the pure helpers behind the detectors that need more than a sum.

The spend state is updated per event without knowing which policy will be read, so the policy
book says up front (a :class:`BucketPlan`) which timezones, rolling slot sizes and workflow run
gaps to keep, and whether pool concurrency or workflow spawn trees are watched. A policy that
asks for something new is counted from when it arrives (see the README).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agentledger.schemas import BudgetPolicy, Period
from agentledger.schemas.policy import CALENDAR_PERIODS, duration_ms

from .periods import rolling_slot_ms

__all__ = [
    "BURN_SLOTS_PER_WINDOW",
    "CONCURRENCY_HOLD_MS",
    "EMPTY_PLAN",
    "INTERVALS_KEPT",
    "SPAWN_AGENTS_KEPT",
    "Activity",
    "BucketPlan",
    "SpawnFinding",
    "over_cap_until",
    "peak_in_flight",
    "plan_for",
    "spawn_findings",
]

# A burn-rate window is kept in this many slots (window/10 each).
BURN_SLOTS_PER_WINDOW = 10
# A pool stays throttled this long after the last moment its calls in flight exceeded the cap.
CONCURRENCY_HOLD_MS = 60_000
# Recent call intervals kept per pool (the newest win), and agents kept per workflow.
INTERVALS_KEPT = 1024
SPAWN_AGENTS_KEPT = 512


@dataclass(frozen=True)
class Activity:
    """Who made a call and for how long, forwarded with its cost to pool and workflow scopes:
    ``agent_id`` (with parent and depth) for spawn trees, ``latency_ms`` for concurrency."""

    agent_id: str | None = None
    parent_agent_id: str | None = None
    spawn_depth: int = 0
    latency_ms: int | None = None


@dataclass(frozen=True)
class BucketPlan:
    """What every spend state keeps, beyond UTC day/week/month buckets."""

    zones: frozenset[str] = frozenset()
    #: (slot length, how long slots are kept), one per slot length in use.
    slots: tuple[tuple[int, int], ...] = ()
    #: Idle gaps (ms) that end a workflow run, one run tracker per gap in use.
    run_idles: tuple[int, ...] = ()
    concurrency: bool = False
    spawn: bool = False


EMPTY_PLAN = BucketPlan()


def plan_for(policies: Iterable[BudgetPolicy]) -> BucketPlan:
    zones: set[str] = set()
    keep: dict[int, int] = {}
    idles: set[int] = set()
    concurrency = spawn = False
    for policy in policies:
        if policy.budgeted and policy.period in CALENDAR_PERIODS and policy.timezone != "UTC":
            zones.add(policy.timezone)
        if policy.budgeted and policy.period is Period.ROLLING:
            window = policy.window_ms
            slot = rolling_slot_ms(window)
            keep[slot] = max(keep.get(slot, 0), window)
        if policy.budgeted and policy.period is Period.RUN:
            idles.add(policy.window_ms)
        if policy.burn_rate is not None:
            window = duration_ms(policy.burn_rate.window)
            slot = window // BURN_SLOTS_PER_WINDOW
            span = window + duration_ms(policy.burn_rate.baseline)
            keep[slot] = max(keep.get(slot, 0), span)
        concurrency |= policy.max_concurrency is not None
        spawn |= policy.spawn is not None
    return BucketPlan(
        zones=frozenset(zones),
        slots=tuple(sorted(keep.items())),
        run_idles=tuple(sorted(idles)),
        concurrency=concurrency,
        spawn=spawn,
    )


def peak_in_flight(intervals: Iterable[tuple[int, int]]) -> int:
    """The most intervals ``[start, end)`` that overlap at one instant."""
    points = sorted(
        [(start, 1) for start, end in intervals if end > start]
        + [(end, -1) for start, end in intervals if end > start]
    )
    # At equal times ends (-1) sort first: a call ending as another starts is not overlap.
    peak = current = 0
    for _, step in points:
        current += step
        peak = max(peak, current)
    return peak


def over_cap_until(intervals: Iterable[tuple[int, int]], cap: int) -> int | None:
    """The last instant at which more than ``cap`` intervals overlapped (the end of the last
    such stretch), or None if they never did."""
    points = sorted(
        [(start, 1) for start, end in intervals if end > start]
        + [(end, -1) for start, end in intervals if end > start]
    )
    current = 0
    last: int | None = None
    for time, step in points:
        if current > cap and step < 0:
            last = time
        current += step
    return last


@dataclass(frozen=True)
class SpawnFinding:
    """One spawn limit a part of a workflow is over."""

    what: str  # children | depth | rate
    agent: str  # the parent with too many children, the deepest agent, or the newest agent
    value: int
    limit: int
    #: The agent whose descendants are the offending subtree (they, not it, are acted on);
    #: None when no one agent of the workflow spawned them all: the whole workflow offends.
    root: str | None = None


Agents = Mapping[str, tuple[str | None, int, int]]


def spawn_findings(
    agents: Agents,
    *,
    max_children: int | None,
    max_depth: int | None,
    max_new_agents_per_minute: int | None,
) -> list[SpawnFinding]:
    """The subtrees over a limit, given the workflow's agents (agent -> (parent, depth, first
    seen ms)): every parent with too many children; per subtree rooted at depth ``max_depth``,
    its deepest agent; and the smallest subtree holding the largest burst of new agents."""
    found = []
    if max_children is not None:
        children: dict[str, int] = {}
        for parent, _, _ in agents.values():
            if parent is not None:
                children[parent] = children.get(parent, 0) + 1
        for parent, count in sorted(children.items(), key=lambda item: (-item[1], item[0])):
            if count > max_children:
                found.append(SpawnFinding("children", parent, count, max_children, parent))
    if max_depth is not None:
        deepest: dict[str | None, tuple[int, str]] = {}
        for agent, (_, depth, _) in agents.items():
            if depth > max_depth:
                root = _root_at_depth(agents, agent, max_depth)
                deepest[root] = max(deepest.get(root, (0, "")), (depth, agent))
        for root, (depth, agent) in sorted(
            deepest.items(), key=lambda item: (-item[1][0], item[0] or "")
        ):
            found.append(SpawnFinding("depth", agent, depth, max_depth, root))
    if max_new_agents_per_minute is not None:
        firsts = sorted((t, a) for a, (_, _, t) in agents.items())
        best = (0, "", 0)
        low = 0
        for high, (time, agent) in enumerate(firsts):
            while firsts[low][0] <= time - 60_000:
                low += 1
            best = max(best, (high - low + 1, agent, low))
        count, newest, first = best
        if count > max_new_agents_per_minute:
            burst = [a for _, a in firsts[first : first + count]]
            root = _common_ancestor(agents, burst)
            found.append(SpawnFinding("rate", newest, count, max_new_agents_per_minute, root))
    return found


def _ancestors(agents: Agents, agent: str) -> list[str]:
    """``agent``'s parent, grandparent, ... as far as the workflow's agents say (the last may
    be an agent that made no call, so its own parent is unknown)."""
    chain: list[str] = []
    current = agents.get(agent)
    while current is not None and current[0] is not None and len(chain) <= len(agents):
        parent = current[0]
        chain.append(parent)
        current = agents.get(parent)
    return chain


def _root_at_depth(agents: Agents, agent: str, depth: int) -> str | None:
    """The ancestor of ``agent`` at spawn depth ``depth`` (or the highest known one deeper
    than that, when the chain breaks), whose descendants are the agents too deep."""
    chain = _ancestors(agents, agent)
    levels = agents[agent][1] - depth  # the ancestor at ``depth`` is this many levels up
    if not chain:
        return None
    return chain[min(levels, len(chain)) - 1]


def _common_ancestor(agents: Agents, burst: list[str]) -> str | None:
    """The deepest agent that every agent of ``burst`` descends from, if any."""
    chains = [_ancestors(agents, agent) for agent in burst]
    common = set(chains[0]).intersection(*chains[1:])
    return next((a for a in chains[0] if a in common), None)
