"""The shim's direct event serialiser writes exactly what the pydantic model would."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentledger.producers.event_json import agent_fragment, call_event_json, event_id
from agentledger.schemas import CallEvent, CallStatus
from agentledger.schemas.ids import uuid7_time_ms
from tests.unit.test_producer_ledger import T0, Harness

SCHEMA = json.loads(
    (Path(__file__).parents[2] / "schemas" / "json" / "call_event.v1.json").read_text()
)

ids = st.text(alphabet="abcXYZ019._:/@+-", min_size=1, max_size=200)
tokens = st.integers(0, 100_000_000)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    inp, out = draw(tokens), draw(tokens)
    return {
        "event_time_ms": draw(st.integers(0, (1 << 48) - 1)),
        "agent_id": draw(ids),
        "pool": draw(st.none() | ids),
        "workflow_id": draw(st.none() | ids),
        "parent_agent_id": draw(st.none() | ids),
        "spawn_depth": draw(st.integers(0, 1000)),
        "task_type": draw(st.none() | ids),
        "task_id": draw(st.none() | ids),
        "provider": draw(ids),
        "requested_model": draw(ids),
        "used_model": draw(ids),
        "input_tokens": inp,
        "output_tokens": out,
        "cached_input_tokens": draw(st.integers(0, inp)),
        "reasoning_tokens": draw(st.integers(0, out)),
        "cost_nano_usd": draw(st.integers(0, 10**15)),
        "priced": draw(st.booleans()),
        "pricing_version": draw(
            st.none() | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=100)
        ),
        "latency_ms": draw(st.integers(0, 10**9)),
        "status": draw(st.sampled_from(CallStatus)),
        "attempt": draw(st.integers(1, 10_000)),
        "error_type": draw(
            st.none() | st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=200)
        ),
    }


def fast(fields: dict[str, Any], eid: str) -> bytes | None:
    agent_part = agent_fragment(
        fields["agent_id"],
        fields["pool"],
        fields["workflow_id"],
        fields["parent_agent_id"],
        fields["spawn_depth"],
    )
    rest = {
        k: v
        for k, v in fields.items()
        if k not in {"agent_id", "pool", "workflow_id", "parent_agent_id", "spawn_depth"}
    }
    return call_event_json(event_id=eid, agent_part=agent_part, **rest)


@settings(max_examples=300, deadline=None)
@given(events())
def test_bytes_equal_the_models_json_and_validate(fields: dict[str, Any]) -> None:
    eid = event_id(fields["event_time_ms"])
    data = fast(fields, eid)
    assert data is not None
    model = CallEvent(event_id=uuid.UUID(eid), **fields)
    assert data == model.model_dump_json().encode()
    jsonschema.validate(json.loads(data), SCHEMA)


@pytest.mark.parametrize(
    "change",
    [
        {"error_type": "naïve"},  # non-ASCII text: the validating path decides
        {"error_type": "x" * 201},
        {"cached_input_tokens": 11},
        {"reasoning_tokens": 6},
        {"input_tokens": -1},
        {"input_tokens": True},
        {"attempt": 0},
        {"latency_ms": -1},
        {"cost_nano_usd": -5},
        {"event_time_ms": 1 << 48},
        {"status": "bogus"},
        {"pricing_version": "p" * 101},
    ],
)
def test_anything_unusual_takes_the_validating_path(change: dict[str, Any]) -> None:
    fields = {
        "event_time_ms": T0,
        "agent_id": "a",
        "pool": None,
        "workflow_id": None,
        "parent_agent_id": None,
        "spawn_depth": 0,
        "task_type": None,
        "task_id": None,
        "provider": "openai",
        "requested_model": "gpt-4o",
        "used_model": "gpt-4o",
        "input_tokens": 10,
        "output_tokens": 5,
        "cached_input_tokens": 0,
        "reasoning_tokens": 0,
        "cost_nano_usd": 1,
        "priced": True,
        "pricing_version": "v",
        "latency_ms": 0,
        "status": CallStatus.OK,
        "attempt": 1,
        "error_type": None,
    }
    assert fast(fields, event_id(T0)) is not None
    assert fast(fields | change, event_id(T0)) is None


def test_event_ids_are_uuid7_of_the_time_and_distinct() -> None:
    made = [event_id(T0) for _ in range(2000)]
    assert len(set(made)) == len(made)
    for text in made[:300]:
        value = uuid.UUID(text)
        assert str(value) == text
        assert (value.version, value.variant) == (7, uuid.RFC_4122)
        assert uuid7_time_ms(value) == T0


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    event_id(T0)  # leaves unused random bytes in the pool
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, event_id(T0).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    assert child != event_id(T0)


def test_the_ledger_sends_the_models_bytes(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    agent = h.ledger.agent("a", pool="p", workflow="w").spawn("b")
    with (
        agent.task("summarize", task_id="t1"),
        agent.call(provider="openai", model="gpt-4o", attempt=2) as call,
    ):
        h.clock.now += 250
        call.record(input_tokens=1200, output_tokens=300, cached_input_tokens=1000)
        call.error_type = 'quote " and \\ backslash'
        call.status = CallStatus.TIMEOUT
    ((_topic, key, value),) = h.transport.messages
    event = CallEvent.model_validate_json(value)
    assert key == b"b"
    assert value == event.model_dump_json().encode()
    assert call.event == event
    assert (event.parent_agent_id, event.spawn_depth, event.pool) == ("a", 1, "p")
    assert (event.task_type, event.task_id, event.attempt, event.latency_ms) == (
        "summarize",
        "t1",
        2,
        250,
    )
    assert call.cost_nano_usd == event.cost_nano_usd > 0


def test_the_ledger_falls_back_to_the_model_for_unusual_values(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    agent = h.ledger.agent("a")
    with agent.call(provider="openai", model="gpt-4o") as call:
        call.error_type = "délai dépassé"
    with agent.call(provider="openai", model="gpt-4o") as call:
        call.input_tokens = -3  # bypassing record(): the event is invalid
    sent = h.transport.messages
    assert [t for t, _k, _v in sent] == ["unit.calls", "unit.dlq"]
    assert CallEvent.model_validate_json(sent[0][2]).error_type == "délai dépassé"
    assert h.ledger.stats["dead_lettered"] == 1
    assert call.event is None and call.cost_nano_usd == 0


def test_agent_attributes_reassigned_later_are_followed_or_validated(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    agent = h.ledger.agent("a", pool="p")
    with agent.call(provider="openai", model="gpt-4o"):
        pass
    agent.pool = "q"
    with agent.call(provider="openai", model="gpt-4o"):
        pass
    agent.pool = "not an id"
    with agent.call(provider="openai", model="gpt-4o"):
        pass
    first, second, third = h.transport.messages
    assert CallEvent.model_validate_json(first[2]).pool == "p"
    assert CallEvent.model_validate_json(second[2]).pool == "q"
    assert third[0] == "unit.dlq"  # the validating path caught it
