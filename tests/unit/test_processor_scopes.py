"""Scopes beyond agent: glob and default policies, event-id dedup, replays of the second hop."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentledger.schemas import BudgetPolicy, CallEvent, ControlAction, Period
from agentledger.stream_processors.counting import RECENT_IDS, apply_cost, apply_event
from agentledger.stream_processors.decisions import decide
from agentledger.stream_processors.periods import period_window
from agentledger.stream_processors.precedence import matching_policies
from agentledger.stream_processors.state import Delivery, SpendState
from agentledger.stream_processors.state_codec import state_from_json, state_to_json


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
        forwarded.append((uuid.uuid4().hex, cost, source, offsets[source]))
        offsets[source] += 1
    cut = data.draw(st.integers(0, len(forwarded)))
    replay_from = data.draw(st.integers(0, cut))
    # First run dies after `cut` records; the restart re-sends from `replay_from` on.
    delivered = forwarded[:cut] + forwarded[replay_from:]
    state = SpendState()
    for event_id, cost, source, offset in delivered:
        state = apply_cost(
            state,
            event_id=event_id,
            event_time_ms=NOON,
            cost_nano_usd=cost,
            partition=source,
            offset=offset,
            now_ms=NOON,
            state_partition=5,
        )
    assert state.periods.get(DAY.key, 0) == sum(cost for _, cost in records)
    assert state.partition == 5
