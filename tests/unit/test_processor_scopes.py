"""Scopes beyond agent: glob and default policies, event-id dedup, the forwarded second hop."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentledger.schemas import BudgetPolicy, CallEvent, ControlAction, Period
from agentledger.schemas.call_decode import record_of
from agentledger.stream_processors.counting import RECENT_IDS, apply_cost, apply_event
from agentledger.stream_processors.decisions import decide
from agentledger.stream_processors.periods import period_window
from agentledger.stream_processors.precedence import matching_policies
from agentledger.stream_processors.scopes import (
    ScopeCost,
    decode_scope_costs,
    encode_scope_costs,
    forwarded_costs,
)
from agentledger.stream_processors.state import Delivery, SpendState
from agentledger.stream_processors.state_codec import state_from_json, state_to_json
from agentledger.stream_processors.tracking import Activity


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


NOON = ms("2026-03-04T12:00:00")
DAY = period_window(Period.DAY, NOON)


def call(cost: int, agent: str = "x", **extra: str) -> CallEvent:
    return CallEvent(
        event_time_ms=NOON,
        agent_id=agent,
        provider="openai",
        requested_model="gpt-4o",
        used_model="gpt-4o",
        cost_nano_usd=cost,
        latency_ms=10,
        **extra,  # type: ignore[arg-type]
    )


def policy(scope: str, usd: str, period: Period = Period.DAY) -> BudgetPolicy:
    return BudgetPolicy(scope=scope, period=period, limit_usd=Decimal(usd))


def test_exact_scope_beats_glob_beats_default() -> None:
    exact = policy("agent:researcher-1", "1")
    glob = policy("agent:researcher-*", "2")
    default = policy("agent:*", "3")
    weekly = policy("agent:*", "9", Period.WEEK)
    book = [default, glob, exact, weekly]
    assert matching_policies(book, "agent:researcher-1") == [exact, weekly]
    assert matching_policies(book, "agent:researcher-2") == [glob, weekly]
    assert matching_policies(book, "agent:writer") == [default, weekly]
    # A pattern of another kind never matches, and the default covers agents only.
    assert matching_policies(book, "pool:researcher-1") == []


def test_longer_glob_wins_and_ties_are_broken_by_name() -> None:
    short = policy("agent:r*", "1")
    long = policy("agent:res*-?", "2")
    twin = policy("agent:re?e*-?", "3")
    assert matching_policies([short, long], "agent:research-7") == [long]
    # Equal literal counts: alphabetical, whatever the order the book holds them in.
    assert policy("agent:re?e*-?", "3").scope < long.scope
    assert matching_policies([long, twin], "agent:research-7") == [twin]
    assert matching_policies([twin, long], "agent:research-7") == [twin]


def test_glob_budget_binds_each_matching_agent_on_its_own() -> None:
    book = {p.key: p for p in [policy("agent:researcher-*", "0.000001")]}
    state = apply_event(SpendState(), call(999, "researcher-1"), 0, 0, now_ms=NOON)
    assert decide(state, book, "agent:researcher-1", NOON) is None
    state = apply_event(state, call(1, "researcher-1"), 0, 1, now_ms=NOON)
    command = decide(state, book, "agent:researcher-1", NOON)
    assert command is not None and command.action is ControlAction.STOP
    assert command.limit_nano_usd == 1000


def test_same_event_id_at_two_offsets_counts_once() -> None:
    event = call(500)
    state = apply_event(SpendState(), event, 0, 10, now_ms=NOON)
    assert state.delivery(event.event_id.hex, 0, 11) is Delivery.DUPLICATE
    assert apply_event(state, event, 0, 11, now_ms=NOON) is state
    # The original record replayed is a replay (so the first hop forwards it again).
    assert state.delivery(event.event_id.hex, 0, 10) is Delivery.REPLAY
    assert state.periods[DAY.key] == 500


def test_recent_ids_are_bounded_oldest_first() -> None:
    state = SpendState()
    events = [call(1) for _ in range(RECENT_IDS + 5)]
    for offset, event in enumerate(events):
        state = apply_event(state, event, 0, offset, now_ms=NOON)
    assert len(state.recent) == RECENT_IDS
    assert events[0].event_id.hex not in state.recent
    assert list(state.recent)[-1] == events[-1].event_id.hex
    assert state_from_json(state_to_json(state)) == state
    assert list(state_from_json(state_to_json(state)).recent) == list(state.recent)


def test_malformed_recent_is_named() -> None:
    with pytest.raises(ValueError, match="'recent'"):
        state_from_json({"recent": {"a": 1}})


def test_forwarded_costs_name_every_non_agent_scope() -> None:
    event = call(42, pool="research", workflow_id="wf-1", task_type="summarize")
    costs = forwarded_costs(event, 3, 77)
    assert [c.scope for c in costs] == ["pool:research", "workflow:wf-1", "task_type:summarize"]
    for cost in costs:
        assert (cost.partition, cost.offset, cost.cost_nano_usd) == (3, 77, 42)
        assert cost.event_id == event.event_id.hex
        # The batch format carries who made the call (pool and workflow scopes only).
        assert decode_scope_costs(encode_scope_costs(cost.scope, [cost])) == [cost]
        # The single-record format predates activity and carries none.
        assert ScopeCost.from_bytes(cost.to_bytes()) == replace(cost, activity=None)
    pool, workflow, task_type = costs
    assert pool.activity == workflow.activity == Activity("x", None, 0, 10)
    assert task_type.activity is None
    assert forwarded_costs(call(42), 0, 0) == []
    for extra in ({"task_type": "t"}, {"workflow_id": "w"}, {"pool": "p", "task_type": "t"}):
        event = call(1, **extra)
        expected = [s for s in event.scopes() if not s.startswith("agent:")]
        assert [c.scope for c in forwarded_costs(event, 0, 0)] == expected


def test_a_call_record_forwards_exactly_what_its_call_event_does() -> None:
    for extra in (
        {},
        {"pool": "p", "workflow_id": "w", "task_type": "t", "parent_agent_id": "root"},
        {"task_type": "t"},
        {"workflow_id": "w"},
    ):
        event = call(7, **extra)
        record = record_of(event)
        assert forwarded_costs(record, 2, 9, holder="h") == forwarded_costs(event, 2, 9, holder="h")
        assert forwarded_costs(record, 2, 9, event.event_id.hex) == forwarded_costs(event, 2, 9)


def test_bad_activity_in_a_batch_is_named() -> None:
    row = ["e", 1, 2, 0, 0, "agent-1", None, -1, 5]
    raw = json.dumps({"scope": "workflow:w", "costs": [row]}).encode()
    with pytest.raises(ValueError, match=r"costs\[0\]'.*spawn_depth"):
        decode_scope_costs(raw)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "empty"),
        (b"{nope", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"scope": "pool:a"}', "'event_id'"),
        (
            b'{"scope":"pool:a","event_id":"e","event_time_ms":1,"cost_nano_usd":-1,'
            b'"partition":0,"offset":0}',
            "'cost_nano_usd'",
        ),
    ],
)
def test_bad_scope_cost_records_are_named(raw: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ScopeCost.from_bytes(raw)


@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**9)), min_size=1, max_size=40),
    st.data(),
)
def test_scope_hop_is_exact_under_any_replay_of_any_source_partition(
    records: list[tuple[int, int]], data: st.DataObject
) -> None:
    """Costs from 3 calls partitions, each forwarded in offset order; after a crash a source
    partition is re-sent from any earlier offset. The scope's total stays the ground truth."""
    offsets = {0: 0, 1: 0, 2: 0}
    forwarded = []
    for source, cost in records:
        forwarded.append(ScopeCost("pool:p", uuid.uuid4().hex, NOON, cost, source, offsets[source]))
        offsets[source] += 1
    cut = data.draw(st.integers(0, len(forwarded)))
    replay_from = data.draw(st.integers(0, cut))
    # First run dies after `cut` records; the restart re-sends from `replay_from` on.
    delivered = forwarded[:cut] + forwarded[replay_from:]
    state = SpendState()
    for item in delivered:
        state = apply_cost(
            state,
            event_id=item.event_id,
            event_time_ms=item.event_time_ms,
            cost_nano_usd=item.cost_nano_usd,
            partition=item.partition,
            offset=item.offset,
            now_ms=NOON,
            state_partition=5,
        )
    assert state.periods.get(DAY.key, 0) == sum(cost for _, cost in records)
    assert state.partition == 5
