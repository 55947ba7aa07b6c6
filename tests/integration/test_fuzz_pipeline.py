"""Fuzzed calls through the real broker into a running processor and sink: every malformed
record lands in the dlq once per component, with a reason, and the valid ones interleaved with
them are counted exactly (processor /state and ClickHouse rows)."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from agentledger.config import Settings
from agentledger.schemas import CallEvent, InvalidMessage
from tests.faults.harness import FaultStack, fleet_events, wait_exact
from tests.integration.test_processor_worker import avoid_midnight

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

BAD = 300
REQUIRED = ("event_time_ms", "agent_id", "provider", "requested_model", "used_model")
REQUIRED += ("cost_nano_usd", "latency_ms")


def malformed(valid: dict[str, Any], rng: random.Random) -> bytes:
    """One record that is invalid by construction, of a randomly chosen kind."""
    raw = json.dumps(valid).encode()
    kind = rng.randrange(8)
    bad = dict(valid)
    if kind == 0:  # garbage bytes (0xff never starts JSON)
        return b"\xff" + rng.randbytes(rng.randrange(0, 200))
    if kind == 1:  # a strict prefix of a JSON object never closes it
        return raw[: rng.randrange(0, len(raw) - 1)]
    if kind == 2:  # a wrong type in a required field
        bad[rng.choice(REQUIRED)] = rng.choice([[1, 2], {"x": 1}, None, "12 apples"])
    elif kind == 3:  # money and counts are never negative
        bad[rng.choice(["cost_nano_usd", "latency_ms", "input_tokens"])] = -rng.randrange(1, 10**12)
    elif kind == 4:  # unknown field (the schema forbids extras)
        bad[f"x_{rng.randrange(10**6)}"] = rng.random()
    elif kind == 5:  # a required field missing
        del bad[rng.choice(REQUIRED)]
    elif kind == 6:  # an id that cannot be a scope
        bad[rng.choice(["agent_id", "pool", "provider"])] = rng.choice(["has space", "", "x" * 201])
    else:  # far in the future (and beyond what DateTime64(3) can store)
        bad["event_time_ms"] = rng.randrange(10_413_792_000_000, 1 << 48)
    return json.dumps(bad).encode()


def read_dead_letters(settings: Settings, want: int, timeout_s: float) -> list[InvalidMessage]:
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka, "group.id": "fuzz-dlq", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(settings.topics.dlq, 0, 0)])
    found: list[InvalidMessage] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(found) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                found.append(InvalidMessage.model_validate_json(msg.value() or b""))
        # Anything beyond ``want`` would be a record dead-lettered twice: read briefly for it.
        end = time.monotonic() + 2
        while time.monotonic() < end:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                found.append(InvalidMessage.model_validate_json(msg.value() or b""))
    finally:
        consumer.close()
    return found


@pytest.fixture
def stack(stack_settings: Settings) -> Iterator[FaultStack]:
    avoid_midnight()
    running = FaultStack(stack_settings)
    running.up()
    try:
        yield running
    finally:
        running.down()


def test_fuzzed_records_are_dead_lettered_and_good_ones_counted_exactly(
    stack: FaultStack,
) -> None:
    settings = stack.settings
    rng = random.Random(8)
    good = [event for _, event in fleet_events(150, 1.0, seed=8)]
    good = list({e.event_id: e for e in good}.values())  # the duplicates are another test's
    template = json.loads(good[0].model_dump_json())
    bad = [malformed(template, rng) for _ in range(BAD)]
    records: list[tuple[bytes, bytes]] = [
        (e.agent_id.encode(), e.model_dump_json().encode()) for e in good
    ]
    records += [(b"fuzz-%d" % rng.randrange(8), value) for value in bad]
    rng.shuffle(records)
    for value in bad:  # by construction: none is a valid event
        with pytest.raises(ValueError):
            CallEvent.model_validate_json(value)
            if json.loads(value)["event_time_ms"] > 10_413_791_999_999:
                raise ValueError("beyond DateTime64(3)")

    producer = Producer({"bootstrap.servers": settings.kafka, "acks": "all", "linger.ms": 5})
    for key, value in records:
        producer.produce(settings.topics.calls, value, key)
    assert producer.flush(30) == 0

    wait_exact(stack, good)
    letters = read_dead_letters(settings, 2 * BAD, 120)
    by_component = {
        component: Counter(letter.payload() for letter in letters if letter.component == component)
        for component in ("processor", "sink")
    }
    assert {letter.component for letter in letters} == {"processor", "sink"}
    for component, payloads in by_component.items():
        assert payloads == Counter(bad), f"{component}: dlq payloads differ from the bad records"
    assert all(letter.reason.strip() for letter in letters)
    assert all(letter.topic == settings.topics.calls for letter in letters)
    print(f"\nfuzz: {len(good)} good counted exactly, {BAD} bad x 2 components dead-lettered")
