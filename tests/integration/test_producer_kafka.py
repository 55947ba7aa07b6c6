"""The shim against the real broker: the transport contract, STOPs from the control topic, and
exact costs read back from the calls topic."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from genai_prices import Usage, calc_price

from agentledger.config import Settings
from agentledger.producers import BudgetExceeded, KafkaTransport, Ledger
from agentledger.schemas import (
    CallEvent,
    ControlAction,
    ControlCommand,
    sign_command,
    usd_to_nano,
)
from tests.conftest import TEST_CONTROL_KEY
from tests.unit.test_producer_transport import Message, TransportContract, TransportHarness

pytestmark = pytest.mark.integration

KEY = TEST_CONTROL_KEY.encode()


def read_topic(bootstrap: str, topic: str, n: int, timeout_s: float) -> list[Message]:
    """The first ``n`` messages of every partition of ``topic`` (fewer at the deadline)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        got: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            topic_name, key, value = msg.topic(), msg.key(), msg.value()
            assert topic_name is not None and key is not None and value is not None
            got.append((topic_name, key, value))
        return got
    finally:
        consumer.close()


class TestKafkaTransport(TransportContract):
    @pytest.fixture
    def harness(self, stack_settings: Settings) -> Iterator[TransportHarness]:
        transport = KafkaTransport(stack_settings.kafka)
        topic = stack_settings.topics.calls

        def read(n: int, timeout_s: float) -> list[Message]:
            return read_topic(stack_settings.kafka, topic, n, timeout_s)

        yield TransportHarness(transport, topic, read, stack_settings)
        transport.close()


def publish(settings: Settings, *commands: ControlCommand) -> None:
    """Write commands as the processor or an operator would: a plain producer, keyed by scope."""
    producer = Producer({"bootstrap.servers": settings.kafka})
    for cmd in commands:
        producer.produce(
            settings.topics.control, key=cmd.scope.encode(), value=cmd.model_dump_json().encode()
        )
    assert producer.flush(10) == 0


def control(
    scope: str,
    action: ControlAction = ControlAction.STOP,
    *,
    key: bytes | None = KEY,
    issued_at_ms: int | None = None,
) -> ControlCommand:
    cmd = ControlCommand(
        scope=scope,
        action=action,
        reason="daily budget spent",
        limit_nano_usd=250_000_000,
        spend_nano_usd=251_000_000,
        issued_at_ms=issued_at_ms if issued_at_ms is not None else time.time_ns() // 1_000_000,
    )
    return cmd if key is None else sign_command(cmd, key)


def eventually(check: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def ledger(stack_settings: Settings) -> Iterator[Ledger]:
    led = Ledger(stack_settings)
    yield led
    led.close()


def call_refused(agent: object) -> Callable[[], bool]:
    def attempt() -> bool:
        try:
            with agent.call(provider="openai", model="gpt-4o-mini"):  # type: ignore[attr-defined]
                pass
        except BudgetExceeded:
            return True
        return False

    return attempt


def test_stop_published_to_the_control_topic_refuses_calls(
    stack_settings: Settings, ledger: Ledger
) -> None:
    agent = ledger.agent("runaway-1", workflow="wf-int", pool="research")
    assert ledger.wait_for_control(30.0)
    with agent.call(provider="openai", model="gpt-4o-mini"):
        pass

    publish(stack_settings, control("pool:research"))
    assert eventually(call_refused(agent)), "the STOP never reached the shim"
    with pytest.raises(
        BudgetExceeded,
        match=r"budget exceeded for pool:research: "
        r"spent \$0\.251 of \$0\.25",
    ):
        agent.call(provider="openai", model="gpt-4o-mini").__enter__()

    publish(stack_settings, control("pool:research", ControlAction.RESUME))
    assert eventually(lambda: not call_refused(agent)()), "the RESUME never reached the shim"


def test_new_agent_learns_standing_stops_before_its_first_call(stack_settings: Settings) -> None:
    stale = control("agent:late-joiner", issued_at_ms=1_000)
    forged = control("agent:late-joiner", key=b"an-attacker-key-0123456789")
    unsigned = control("workflow:wf-x", key=None)
    publish(
        stack_settings,
        stale,
        control("agent:late-joiner"),
        forged,
        unsigned,
        control("pool:unrelated"),
    )
    publish(stack_settings, stale)  # an old STOP replayed after the newer one

    with Ledger(stack_settings) as ledger:
        agent = ledger.agent("late-joiner", workflow="wf-x")
        assert ledger.wait_for_control(30.0)
        ran = False
        with pytest.raises(BudgetExceeded) as info, agent.call(provider="openai", model="gpt-4o"):
            ran = True
        assert ran is False
        assert info.value.scope == "agent:late-joiner"
        metrics = ledger.control.metrics
        assert metrics == {
            "accepted": 3,
            "rejected_unsigned": 1,
            "rejected_forged": 1,
            "rejected_replayed": 1,
            "rejected_invalid": 0,
        }


def test_events_read_back_with_exact_genai_prices_cost(
    stack_settings: Settings, ledger: Ledger
) -> None:
    usages = [
        ("openai", "gpt-4o", 10_000, 2_000, 0),
        ("openai", "gpt-4o-mini", 1_200, 300, 1_000),
        ("anthropic", "claude-3-5-sonnet-latest", 50_000, 1_234, 40_000),
        ("google", "gemini-1.5-pro", 200_000, 5_000, 0),
    ]
    agent = ledger.agent("pricing-check", workflow="wf-price", pool="qa")
    for provider, model, inp, out, cached in usages:
        with agent.call(provider=provider, model=model) as call:
            call.record(input_tokens=inp, output_tokens=out, cached_input_tokens=cached)
    assert ledger.transport.flush(10.0) == 0

    got = read_topic(stack_settings.kafka, stack_settings.topics.calls, len(usages), 30.0)
    assert len(got) == len(usages)
    events = [CallEvent.model_validate_json(value) for _t, _k, value in got]
    assert {key for _t, key, _v in got} == {b"pricing-check"}
    for event, (provider, model, inp, out, cached) in zip(events, usages, strict=True):
        assert (
            event.provider,
            event.used_model,
            event.input_tokens,
            event.output_tokens,
            event.cached_input_tokens,
        ) == (provider, model, inp, out, cached)
        when = datetime.fromtimestamp(event.event_time_ms / 1000, tz=UTC)
        expected = calc_price(
            Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=cached),
            model_ref=model,
            provider_id=provider,
            genai_request_timestamp=when,
        ).total_price
        assert event.cost_nano_usd == usd_to_nano(expected)
        assert event.priced


def test_tombstone_and_garbage_on_the_control_topic_are_harmless(
    stack_settings: Settings, ledger: Ledger
) -> None:
    producer = Producer({"bootstrap.servers": stack_settings.kafka})
    producer.produce(stack_settings.topics.control, key=b"agent:victim", value=b"{not json")
    producer.produce(stack_settings.topics.control, key=b"agent:victim", value=None)
    assert producer.flush(10) == 0
    agent = ledger.agent("victim")
    assert ledger.wait_for_control(30.0)
    with agent.call(provider="openai", model="gpt-4o-mini"):
        pass
    assert ledger.control.metrics["rejected_invalid"] == 1
    assert ledger.control.metrics["accepted"] == 0
    listener = ledger._listener
    assert listener is not None and listener.errors == 0, listener.last_error if listener else None


def test_many_compressed_batches_round_trip(stack_settings: Settings) -> None:
    # The shim's idempotent, lz4-compressed batches must be readable by any consumer.
    transport = KafkaTransport(stack_settings.kafka)
    for i in range(200):
        transport.send(stack_settings.topics.calls, b"k%d" % (i % 7), b"v" * 500)
    transport.close()
    assert transport.stats.delivered == 200
    got = read_topic(stack_settings.kafka, stack_settings.topics.calls, 200, 30.0)
    assert sorted(got) == sorted(
        (stack_settings.topics.calls, b"k%d" % (i % 7), b"v" * 500) for i in range(200)
    )
