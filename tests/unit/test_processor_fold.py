"""SpendFold (one state copy per batch) against the per-event reference, apply_event and
apply_cost: the same deliveries and the same state, field for field and in stored order."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentledger.schemas import CallEvent, CallFields, CallStatus, id_hex
from agentledger.schemas.call_decode import record_of
from agentledger.stream_processors.counting import RECENT_IDS, apply_cost, apply_event
from agentledger.stream_processors.fold import SpendFold
from agentledger.stream_processors.periods import DAY_MS
from agentledger.stream_processors.state import Delivery, SpendState
from agentledger.stream_processors.state_codec import state_to_json
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
# Event times from 40 days back (older than the kept buckets) to just now.
times = st.integers(NOW - 40 * DAY_MS, NOW)
records = st.lists(
    st.tuples(
        times,
        st.integers(0, 10**10),  # cost
        st.integers(1, 3),  # attempt
        st.sampled_from([CallStatus.OK, CallStatus.ERROR]),
        st.sampled_from([None, "t1", "t2"]),  # task id
        st.integers(0, 2),  # partition
        # Mostly new ids and offsets; sometimes the id of the 1st or 2nd record back (a
        # duplicate), sometimes an offset at or below the applied one (a replay).
        st.sampled_from([0, 0, 0, 0, 0, 0, 1, 2]),
        st.sampled_from([False, False, False, False, True]),
    ),
    max_size=60,
)


Row = tuple[int, int, int, CallStatus, str | None, int, int, bool]


def build(rows: list[Row]) -> list[tuple[CallEvent, int, int]]:
    """Events with offsets increasing per partition, some duplicated ids and replayed offsets."""
    next_offset = [0, 0, 0]
    out: list[tuple[CallEvent, int, int]] = []
    for time, cost, attempt, status, task, partition, dup, replay in rows:
        if replay and next_offset[partition] > 0:
            offset = next_offset[partition] - 1
        else:
            offset = next_offset[partition]
            next_offset[partition] += 1
        event_id = out[-dup][0].event_id if dup and len(out) >= dup else uuid.uuid4()
        event = CallEvent(
            event_id=event_id,
            event_time_ms=time,
            agent_id="a",
            provider="openai",
            requested_model="m",
            used_model="m",
            cost_nano_usd=cost,
            latency_ms=time % 5000,
            attempt=attempt,
            status=status,
            task_id=task,
        )
        out.append((event, partition, offset))
    return out


def stored(state: SpendState) -> str:
    # The changelog value, order included (recent ids and failures forget the oldest first).
    return json.dumps(state_to_json(state))


@pytest.mark.parametrize("as_record", [False, True], ids=["CallEvent", "CallRecord"])
@settings(max_examples=100, deadline=None)
@given(records, records, st.sampled_from(PLANS))
def test_folding_a_batch_equals_applying_each_event(
    as_record: bool,
    before: list[Row],
    batch: list[Row],
    plan: BucketPlan,
) -> None:
    """The fold counts the msgspec records (the batch path's) exactly as the reference counts
    the pydantic events."""
    events = build(before + batch)
    state = SpendState()
    for event, partition, offset in events[: len(before)]:
        state = apply_event(state, event, partition, offset, now_ms=NOW - DAY_MS, plan=plan)
    expected, expected_deliveries = state, []
    for event, partition, offset in events[len(before) :]:
        expected_deliveries.append(expected.delivery(event.event_id.hex, partition, offset))
        expected = apply_event(expected, event, partition, offset, now_ms=NOW, plan=plan)
    fold = SpendFold(state, now_ms=NOW, plan=plan)
    folded_events: list[tuple[CallFields, int, int]] = [
        (record_of(event) if as_record else event, partition, offset)
        for event, partition, offset in events[len(before) :]
    ]
    deliveries = [
        fold.add_event(event, id_hex(event.event_id), partition, offset)
        for event, partition, offset in folded_events
    ]
    folded = fold.result()
    assert deliveries == expected_deliveries
    assert folded == expected
    assert stored(folded) == stored(expected)
    if Delivery.NEW not in deliveries:
        assert folded is state


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            times, st.integers(0, 10**9), st.sampled_from(["a", "b", None]), st.integers(0, 9)
        ),
        max_size=80,
    ),
    st.sampled_from(PLANS),
)
def test_folding_forwarded_costs_equals_applying_each(
    rows: list[tuple[int, int, str | None, int]], plan: BucketPlan
) -> None:
    expected = SpendState()
    fold = SpendFold(expected, now_ms=NOW, plan=plan)
    for offset, (time, cost, agent, latency) in enumerate(rows):
        activity = Activity(agent, None, 1, latency * 10_000 if agent else None)
        kwargs = {
            "event_id": f"{offset % 50:032x}",  # ids repeat: duplicates at another offset
            "event_time_ms": time,
            "cost_nano_usd": cost,
            "partition": offset % 3,
            "offset": offset,
            "state_partition": 7,
            "activity": activity,
        }
        expected = apply_cost(expected, now_ms=NOW, plan=plan, **kwargs)  # type: ignore[arg-type]
        fold.add_cost(**kwargs)  # type: ignore[arg-type]
    folded = fold.result()
    assert folded == expected
    assert stored(folded) == stored(expected)


def test_recent_ids_stay_bounded_oldest_forgotten_first() -> None:
    fold = SpendFold(SpendState(), now_ms=NOW)
    ids = [f"{i:032x}" for i in range(RECENT_IDS + 5)]
    for offset, event_id in enumerate(ids):
        fold.add_cost(
            event_id=event_id, event_time_ms=NOW, cost_nano_usd=1, partition=0, offset=offset
        )
    state = fold.result()
    assert list(state.recent) == ids[5:]
    assert fold.delivery(ids[-1], 0, 0) is Delivery.DUPLICATE
    assert fold.delivery(ids[0], 0, RECENT_IDS + 5) is Delivery.NEW
