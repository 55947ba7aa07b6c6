from __future__ import annotations

from collections import Counter

import pytest
from genai_prices import Usage, calc_price

from agentledger.schemas import CallStatus, usd_to_nano
from agentledger.traces import TraceCall, load_trace
from agentledger.workload import (
    bursts,
    ground_truth,
    late_and_duplicates,
    paced,
    plan_to_events,
    replay_trace,
    runaway_retry_loop,
    slow_trickle,
    spawn_explosion,
)

START_MS = 1_795_478_400_000  # 2026-11-24T00:00:00Z
TRACE = [TraceCall(1_000, 374, 44), TraceCall(1_500, 396, 109), TraceCall(3_500, 879, 55)]


def test_replay_keeps_arrival_gaps_and_real_sizes() -> None:
    plan = replay_trace(TRACE, agents=2, speedup=10)
    assert [c.at_ms for c in plan] == [0, 50, 250]
    assert [(c.input_tokens, c.output_tokens) for c in plan] == [(374, 44), (396, 109), (879, 55)]
    assert replay_trace(TRACE, agents=2, seed=3) == replay_trace(TRACE, agents=2, seed=3)


def test_replay_spreads_a_real_trace_over_the_fleet() -> None:
    trace = load_trace("conv", limit=2_000)
    plan = replay_trace(trace, agents=8, pools=2, workflows=4, speedup=60)
    agents = Counter(c.agent_id for c in plan)
    assert set(agents) == {f"agent-{i}" for i in range(8)}
    assert {c.pool for c in plan} == {"pool-0", "pool-1"}
    # Each agent sits in one pool and one workflow.
    assert all(len({(c.pool, c.workflow_id) for c in plan if c.agent_id == a}) == 1 for a in agents)
    span_s = (trace[-1].arrival_ms - trace[0].arrival_ms) / 1000
    assert plan[-1].at_ms == int((trace[-1].arrival_ms - trace[0].arrival_ms) / 60)
    assert span_s > 60


def test_bad_fleet_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="speedup must be positive"):
        replay_trace(TRACE, speedup=0)
    with pytest.raises(ValueError, match="agents, pools and workflows"):
        replay_trace(TRACE, agents=0)


def test_runaway_is_one_failing_task_retried() -> None:
    plan = runaway_retry_loop(TRACE, attempts=5, every_ms=100)
    assert [c.attempt for c in plan] == [1, 2, 3, 4, 5]
    assert {c.task_id for c in plan} == {"runaway-task"}
    assert {c.status for c in plan} == {CallStatus.ERROR}
    assert {c.input_tokens for c in plan} == {879}  # the largest context of the trace
    assert [c.at_ms for c in plan] == [0, 100, 200, 300, 400]


def test_spawn_explosion_shape() -> None:
    plan = spawn_explosion(TRACE, fan_out=3, depth=2)
    assert len(plan) == 1 + 3 + 9
    assert Counter(c.spawn_depth for c in plan) == {0: 1, 1: 3, 2: 9}
    children = Counter(c.parent_agent_id for c in plan if c.parent_agent_id)
    assert children == {"planner": 3, "planner.0": 3, "planner.1": 3, "planner.2": 3}


def test_bursts_and_trickle_keep_the_calls() -> None:
    plan = replay_trace(load_trace("code", limit=300), agents=3)
    squeezed = bursts(plan, every_ms=10_000, burst_ms=1_000)
    assert [(c.agent_id, c.input_tokens) for c in squeezed] == [
        (c.agent_id, c.input_tokens) for c in plan
    ]
    assert all(c.at_ms % 10_000 < 1_000 for c in squeezed)
    trickle = slow_trickle(plan, gap_ms=2_000)
    assert [c.at_ms for c in trickle[:3]] == [0, 2_000, 4_000]


def test_events_cost_exactly_what_genai_prices_says() -> None:
    events = plan_to_events(replay_trace(TRACE, agents=3), start_ms=START_MS)
    for event in events:
        usage = Usage(input_tokens=event.input_tokens, output_tokens=event.output_tokens)
        expected = calc_price(usage, model_ref=event.used_model, provider_id=event.provider)
        assert event.cost_nano_usd == usd_to_nano(expected.total_price)
    assert events[0].event_time_ms == START_MS


def test_late_and_duplicate_events_and_ground_truth() -> None:
    plan = late_and_duplicates(
        replay_trace(load_trace("conv", limit=70), agents=4), late_every=10, duplicate_every=7
    )
    events = plan_to_events(plan, start_ms=START_MS)
    ids = Counter(e.event_id for e in events)
    assert len(events) == 80 and len(ids) == 70
    assert sum(1 for n in ids.values() if n == 2) == 10
    # A duplicate is the very same event delivered again, not a near copy.
    first = {}
    for event in events:
        assert first.setdefault(event.event_id, event) == event
    late = [e for e in events if e.event_time_ms < START_MS]
    assert {e.event_id for e in late} and all(e.event_time_ms < START_MS - 80_000_000 for e in late)
    truth = ground_truth(events)
    unique = {e.event_id: e for e in events}
    assert sum(truth.values()) == sum(e.cost_nano_usd for e in unique.values())
    assert sum(truth.values()) < sum(e.cost_nano_usd for e in events)


def test_paced_waits_for_each_offset() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    plan = replay_trace(TRACE, agents=1)
    assert list(paced(plan, sleep=sleep, monotonic=lambda: now[0])) == plan
    assert slept == [0.5, 2.0]
