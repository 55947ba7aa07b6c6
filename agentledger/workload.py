"""Realistic workloads: the Azure LLM traces replayed over a fleet of agents, plus scenarios.

A plan is a list of ``PlannedCall``s, each at an offset from the start of the run, with its real
token sizes. Plans are pure data and deterministic for a seed, so tests and benchmarks can
compute the exact ground truth (``ground_truth``) and compare the pipeline's totals with it.
Two ways to run a plan: through the shim (``run_through_shim``, enforcement applies) or as raw
CallEvents (``plan_to_events``, for late events, duplicates and throughput).
"""

from __future__ import annotations

import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from agentledger.schemas import CallEvent, CallStatus, uuid7
from agentledger.traces import TraceCall

__all__ = [
    "DEFAULT_MODELS",
    "PlannedCall",
    "bursts",
    "ground_truth",
    "late_and_duplicates",
    "paced",
    "plan_to_events",
    "replay_trace",
    "runaway_retry_loop",
    "shim_pricer",
    "slow_trickle",
    "spawn_explosion",
]

DEFAULT_MODELS: tuple[tuple[str, str], ...] = (
    ("openai", "gpt-4o-mini"),
    ("openai", "gpt-4o"),
    ("anthropic", "claude-3-5-haiku-latest"),
)


@dataclass(frozen=True)
class PlannedCall:
    at_ms: int
    """offset from the start of the run, after time compression"""
    agent_id: str
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    pool: str | None = None
    workflow_id: str | None = None
    task_type: str | None = None
    task_id: str | None = None
    parent_agent_id: str | None = None
    spawn_depth: int = 0
    status: CallStatus = CallStatus.OK
    attempt: int = 1
    error_type: str | None = None
    latency_ms: int = 0
    event_time_shift_ms: int = 0
    """added to the event time: negative for a late (backdated) event"""
    event_id: uuid.UUID | None = None
    """fixed id: two planned calls with the same id are one call delivered twice"""


def replay_trace(
    trace: Sequence[TraceCall],
    *,
    agents: int = 8,
    pools: int = 2,
    workflows: int = 4,
    models: Sequence[tuple[str, str]] = DEFAULT_MODELS,
    speedup: float = 1.0,
    limit: int | None = None,
    seed: int = 0,
    prefix: str = "agent",
) -> list[PlannedCall]:
    """Spread the trace's calls over a fleet, keeping arrival gaps (divided by ``speedup``)
    and token sizes. Each agent has a fixed pool, a home workflow and a preferred model."""
    if agents < 1 or pools < 1 or workflows < 1 or not models:
        raise ValueError("agents, pools and workflows must be >= 1 and models non-empty")
    if speedup <= 0:
        raise ValueError(f"speedup must be positive, got {speedup}")
    rng = random.Random(seed)  # noqa: S311 - workload simulation, not security
    calls = list(trace[:limit] if limit is not None else trace)
    if not calls:
        return []
    start = calls[0].arrival_ms
    plan = []
    for n, call in enumerate(calls):
        agent = rng.randrange(agents)
        provider, model = models[agent % len(models)]
        plan.append(
            PlannedCall(
                at_ms=int((call.arrival_ms - start) / speedup),
                agent_id=f"{prefix}-{agent}",
                provider=provider,
                model=model,
                input_tokens=call.input_tokens,
                output_tokens=call.output_tokens,
                pool=f"pool-{agent % pools}",
                workflow_id=f"wf-{agent % workflows}",
                task_type="chat" if n % 3 else "code",
                task_id=f"task-{agent}-{n // 10}",
                latency_ms=50 + call.output_tokens * 20,
            )
        )
    return plan


def runaway_retry_loop(
    trace: Sequence[TraceCall],
    *,
    agent_id: str = "runaway",
    attempts: int = 200,
    every_ms: int = 100,
    provider: str = "openai",
    model: str = "gpt-4o",
    start_ms: int = 0,
    pool: str | None = "pool-0",
    workflow_id: str | None = "wf-0",
) -> list[PlannedCall]:
    """One task retried over and over with its full context: every attempt fails and costs."""
    size = max(trace, key=lambda c: c.input_tokens) if trace else TraceCall(0, 8000, 200)
    return [
        PlannedCall(
            at_ms=start_ms + i * every_ms,
            agent_id=agent_id,
            provider=provider,
            model=model,
            input_tokens=size.input_tokens,
            output_tokens=size.output_tokens,
            pool=pool,
            workflow_id=workflow_id,
            task_type="fix-tests",
            task_id=f"{agent_id}-task",
            status=CallStatus.ERROR,
            attempt=i + 1,
            error_type="ToolCallFailed",
            latency_ms=800,
        )
        for i in range(attempts)
    ]


def spawn_explosion(
    trace: Sequence[TraceCall],
    *,
    root: str = "planner",
    fan_out: int = 4,
    depth: int = 3,
    every_ms: int = 20,
    provider: str = "openai",
    model: str = "gpt-4o-mini",
    workflow_id: str = "wf-spawn",
    start_ms: int = 0,
) -> list[PlannedCall]:
    """A root agent whose children each spawn ``fan_out`` more, ``depth`` levels deep; every
    agent makes one call. fan_out ** depth leaves: the shape detectors must catch."""
    if fan_out < 1 or depth < 0:
        raise ValueError("fan_out must be >= 1 and depth >= 0")
    sizes = list(trace) or [TraceCall(0, 500, 100)]
    plan: list[PlannedCall] = []
    level: list[tuple[str, str | None]] = [(root, None)]
    n = 0
    for d in range(depth + 1):
        next_level: list[tuple[str, str | None]] = []
        for agent, parent in level:
            size = sizes[n % len(sizes)]
            plan.append(
                PlannedCall(
                    at_ms=start_ms + n * every_ms,
                    agent_id=agent,
                    provider=provider,
                    model=model,
                    input_tokens=size.input_tokens,
                    output_tokens=size.output_tokens,
                    workflow_id=workflow_id,
                    task_type="plan",
                    parent_agent_id=parent,
                    spawn_depth=d,
                    latency_ms=300,
                )
            )
            n += 1
            if d < depth:
                next_level += [(f"{agent}.{k}", agent) for k in range(fan_out)]
        level = next_level
    return plan


def bursts(
    plan: Sequence[PlannedCall], *, every_ms: int = 10_000, burst_ms: int = 500
) -> list[PlannedCall]:
    """Squeeze the calls of each ``every_ms`` slot into its first ``burst_ms``: the same calls
    and tokens, arriving in bursts."""
    if not 0 < burst_ms <= every_ms:
        raise ValueError("need 0 < burst_ms <= every_ms")
    return [
        replace(
            c, at_ms=(c.at_ms // every_ms) * every_ms + (c.at_ms % every_ms) * burst_ms // every_ms
        )
        for c in plan
    ]


def slow_trickle(plan: Sequence[PlannedCall], *, gap_ms: int = 2_000) -> list[PlannedCall]:
    """The same calls, one every ``gap_ms``: the slow, steady spend that budgets must still see."""
    return [replace(c, at_ms=i * gap_ms) for i, c in enumerate(plan)]


def late_and_duplicates(
    plan: Sequence[PlannedCall],
    *,
    late_every: int = 10,
    late_by_ms: int = 86_400_000,
    duplicate_every: int = 7,
    seed: int = 0,
) -> list[PlannedCall]:
    """Backdate every ``late_every``-th call by ``late_by_ms`` (it belongs to an earlier period)
    and deliver every ``duplicate_every``-th call twice: the same event (id, event time),
    sent 1 ms apart."""
    rng = random.Random(seed)  # noqa: S311 - workload simulation, not security
    out: list[PlannedCall] = []
    for i, call in enumerate(plan):
        fixed = replace(call, event_id=uuid.UUID(int=rng.getrandbits(128), version=4))
        if late_every and i % late_every == late_every - 1:
            fixed = replace(fixed, event_time_shift_ms=-late_by_ms)
        out.append(fixed)
        if duplicate_every and i % duplicate_every == duplicate_every - 1:
            # Sent 1 ms later but the same event: same id AND same event time, as a spool
            # replay or a producer retry delivers it (the sink's id lookup is time-windowed).
            out.append(
                replace(
                    fixed, at_ms=fixed.at_ms + 1, event_time_shift_ms=fixed.event_time_shift_ms - 1
                )
            )
    return out


Pricer = Callable[[PlannedCall, int], tuple[int, bool, str | None]]
"""(planned call, event time ms) -> (cost nano-USD, priced, pricing version)"""


def shim_pricer() -> Pricer:
    """Price planned calls exactly as the shim does."""
    from agentledger.producers.pricing import Pricer as ShimPricer

    pricer = ShimPricer()

    def price(call: PlannedCall, at_ms: int) -> tuple[int, bool, str | None]:
        result = pricer.price(
            call.provider,
            call.model,
            input_tokens=call.input_tokens,
            output_tokens=call.output_tokens,
            cached_input_tokens=0,
            at_ms=at_ms,
        )
        return result.cost_nano_usd, result.priced, result.pricing_version

    return price


def plan_to_events(
    plan: Iterable[PlannedCall], *, start_ms: int, price: Pricer | None = None
) -> list[CallEvent]:
    """Raw CallEvents for a plan, event time = start + offset + shift, costs from ``price``."""
    price = price or shim_pricer()
    events = []
    for call in plan:
        event_time = start_ms + call.at_ms + call.event_time_shift_ms
        cost, priced, version = price(call, event_time)
        events.append(
            CallEvent(
                event_id=call.event_id or uuid7(event_time),
                event_time_ms=event_time,
                agent_id=call.agent_id,
                pool=call.pool,
                workflow_id=call.workflow_id,
                parent_agent_id=call.parent_agent_id,
                spawn_depth=call.spawn_depth,
                task_type=call.task_type,
                task_id=call.task_id,
                provider=call.provider,
                requested_model=call.model,
                used_model=call.model,
                input_tokens=call.input_tokens,
                output_tokens=call.output_tokens,
                cost_nano_usd=cost,
                priced=priced,
                pricing_version=version,
                latency_ms=call.latency_ms,
                status=call.status,
                attempt=call.attempt,
                error_type=call.error_type,
            )
        )
    return events


def ground_truth(events: Iterable[CallEvent], by: str = "agent_id") -> dict[str | None, int]:
    """Exact cost per ``by`` (a CallEvent field), each event id counted once."""
    seen: set[uuid.UUID] = set()
    totals: dict[str | None, int] = defaultdict(int)
    for event in events:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        totals[getattr(event, by)] += event.cost_nano_usd
    return dict(totals)


def paced(
    plan: Sequence[PlannedCall],
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> Iterable[PlannedCall]:
    """Yield each planned call at its offset from the moment iteration starts."""
    start = monotonic()
    for call in sorted(plan, key=lambda c: c.at_ms):
        wait = start + call.at_ms / 1000 - monotonic()
        if wait > 0:
            sleep(wait)
        yield call
