"""The second hop's per-cycle sums (deltas.py) against counting each cost: a scope folded from
deltas holds what the per-cost reference holds (recent event ids aside: the agent's state tells
duplicates apart before anything is forwarded), and the wire format round-trips."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentledger.stream_processors.deltas import (
    DeltaError,
    ScopeDelta,
    decode_delta,
    encode_delta,
    period_keys,
)
from agentledger.stream_processors.fold import SpendFold
from agentledger.stream_processors.periods import DAY_MS
from agentledger.stream_processors.state import Delivery, SpendState
from agentledger.stream_processors.tracking import Activity, BucketPlan

NOW = int(datetime(2026, 3, 4, 12, tzinfo=UTC).timestamp() * 1000)
PLANS = [
    BucketPlan(),
    BucketPlan(
        zones=frozenset({"Europe/Paris", "America/New_York"}),
        slots=((60_000, 3_600_000), (1_440_000, 86_400_000)),
        run_idles=(1_800_000,),
        concurrency=True,
        spawn=True,
    ),
]
costs = st.lists(
    st.tuples(
        st.integers(NOW - 40 * DAY_MS, NOW),  # event time
        st.integers(0, 10**9),  # cost
        st.sampled_from(["a", "b", "c", None]),  # agent (activity)
        st.integers(0, 9),  # latency / 10 s
        st.sampled_from([None, "h1", "h2"]),  # allowance holder
        st.integers(0, 2),  # calls partition
    ),
    max_size=80,
)


def leased() -> SpendState:
    # Outstanding allowances of two holders, so holders' costs count against them.
    held = {"h1": (10**12, 0, NOW + DAY_MS), "h2": (10**12, 5, NOW + DAY_MS)}
    return replace(SpendState(), leases={"day": (NOW - 10 * DAY_MS, None, held)})


@settings(max_examples=150, deadline=None)
@given(costs, st.lists(st.integers(1, 30), max_size=6), st.sampled_from(PLANS))
def test_folding_cycle_deltas_equals_counting_each_cost(
    rows: list[tuple[int, int, str | None, int, str | None, int]],
    cuts: list[int],
    plan: BucketPlan,
) -> None:
    zones = ("UTC", *sorted(plan.zones))
    # The reference: each cost counted on its own (fold.py's add_cost equals apply_cost,
    # test_processor_fold.py).
    reference = SpendFold(leased(), now_ms=NOW, plan=plan)
    next_offset = [0, 0, 0]
    items = []
    for time, cost, agent, latency, holder, partition in rows:
        offset = next_offset[partition]
        next_offset[partition] += 1
        activity = Activity(agent, None, 1, latency * 10_000) if agent else None
        items.append((time, cost, activity, holder, partition, offset))
        reference.add_cost(
            event_id=None,
            event_time_ms=time,
            cost_nano_usd=cost,
            partition=partition,
            offset=offset,
            state_partition=7,
            activity=activity,
            holder=holder,
        )
    expected = reference.result()
    # The same costs cut into cycles, each sent as one delta, then folded in one batch.
    deltas: list[ScopeDelta] = []
    start = 0
    for size in [*cuts, len(items)]:
        chunk = items[start : start + size]
        start += size
        if not chunk:
            continue
        delta = ScopeDelta("pool:p")
        for time, cost, activity, holder, partition, offset in chunk:
            delta.add(
                period_keys(time, zones),
                time,
                cost,
                partition,
                offset,
                now_ms=NOW,
                plan=plan,
                activity=activity,
                holder=holder,
            )
        deltas.append(decode_delta(encode_delta(delta)))
    fold = SpendFold(leased(), now_ms=NOW, plan=plan)
    for delta in deltas:
        assert fold.add_delta(delta, 7) is Delivery.NEW
    folded = fold.result()
    if not deltas:
        assert folded == leased()
        return
    assert replace(folded, recent={}) == replace(expected, recent={})


def test_a_delta_whose_offsets_were_applied_is_a_replay() -> None:
    delta = ScopeDelta("workflow:w")
    delta.add(period_keys(NOW, ("UTC",)), NOW, 100, 2, 41, now_ms=NOW)
    fold = SpendFold(SpendState(), now_ms=NOW)
    assert fold.add_delta(delta, 3) is Delivery.NEW
    state = fold.result()
    again = SpendFold(state, now_ms=NOW)
    assert again.add_delta(decode_delta(encode_delta(delta)), 3) is Delivery.REPLAY
    assert again.result() is state
    assert state.applied == {2: 41} and state.partition == 3
    assert sum(v for k, v in state.periods.items() if k.startswith("day:")) == 100


@pytest.mark.parametrize(
    ("value", "names"),
    [
        (b"", "empty"),
        (b"{", "not JSON"),
        (b'{"v":1}', "scope"),
        (b'{"v":2,"scope":"pool:p","src":[[0,1]],"n":1,"last_ms":1,"periods":{}}', "version 1"),
        (b'{"v":1,"scope":"agent:a","src":[[0,1]],"n":1,"last_ms":1,"periods":{}}', "pool"),
        (b'{"v":1,"scope":"pool:p","src":[],"n":1,"last_ms":1,"periods":{}}', "'src'"),
        (b'{"v":1,"scope":"pool:p","src":[[0,1]],"n":1,"last_ms":1,"periods":{"d":-1}}', ">= 0"),
        (b'{"v":1,"scope":"pool:p","src":[[0,1]],"n":1,"last_ms":1,"periods":{},"x":1}', "x"),
    ],
)
def test_a_bad_delta_is_refused_naming_the_field(value: bytes, names: str) -> None:
    with pytest.raises(DeltaError, match=names):
        decode_delta(value)
