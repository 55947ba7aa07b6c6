"""The EventTransport contract, run on every transport, and Kafka-outage behaviour.

``TransportContract`` is the one shared suite: this module runs it on InMemoryTransport, and
tests/integration/test_producer_kafka.py runs it on KafkaTransport against the real broker,
reading the bytes back with a consumer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.producers import (
    EventTransport,
    InMemoryTransport,
    KafkaTransport,
    Ledger,
)
from agentledger.schemas import CallEvent
from tests.conftest import TEST_CONTROL_KEY, free_port

Message = tuple[str, bytes, bytes]


@dataclass
class TransportHarness:
    transport: EventTransport
    topic: str
    read: Callable[[int, float], list[Message]]
    """read(n, timeout_s): the first n messages on ``topic``, or fewer at the deadline"""
    settings: Settings


def by_key(messages: list[Message]) -> dict[bytes, list[bytes]]:
    grouped: dict[bytes, list[bytes]] = {}
    for _topic, key, value in messages:
        grouped.setdefault(key, []).append(value)
    return grouped


class TransportContract:
    """Subclasses provide a ``harness`` fixture."""

    def test_round_trips_exact_bytes_in_key_order(self, harness: TransportHarness) -> None:
        sent: list[Message] = []
        for i in range(30):
            key = f"agent-{i % 3}".encode()
            value = f'{{"n":{i},"id":"{uuid.uuid4()}"}}'.encode()
            harness.transport.send(harness.topic, key, value)
            sent.append((harness.topic, key, value))
        assert harness.transport.flush(10.0) == 0
        got = harness.read(len(sent), 20.0)
        assert sorted(got) == sorted(sent)
        # Per key, the transport keeps the order: one agent's events stay in sequence.
        assert by_key(got) == by_key(sent)

    def test_arbitrary_binary_keys_and_values(self, harness: TransportHarness) -> None:
        payloads = [bytes(range(256)), b"\x00", "zürich €".encode(), b"x" * 100_000]
        for n, value in enumerate(payloads):
            harness.transport.send(harness.topic, bytes([0xFF, n]), value)
        assert harness.transport.flush(10.0) == 0
        got = harness.read(len(payloads), 20.0)
        assert sorted(got) == sorted(
            (harness.topic, bytes([0xFF, n]), v) for n, v in enumerate(payloads)
        )

    def test_stats_count_sent_and_delivered(self, harness: TransportHarness) -> None:
        for i in range(5):
            harness.transport.send(harness.topic, b"k", str(i).encode())
        assert harness.transport.flush(10.0) == 0
        stats = harness.transport.stats  # type: ignore[attr-defined]
        assert (stats.sent, stats.delivered, stats.delivery_errors, stats.dropped) == (5, 5, 0, 0)

    def test_send_after_close_is_dropped_not_raised(self, harness: TransportHarness) -> None:
        harness.transport.send(harness.topic, b"k", b"before")
        harness.transport.close()
        harness.transport.send(harness.topic, b"k", b"after")
        stats = harness.transport.stats  # type: ignore[attr-defined]
        assert stats.dropped == 1
        got = harness.read(2, 3.0)
        assert got == [(harness.topic, b"k", b"before")]

    def test_ledger_events_arrive_keyed_by_agent(self, harness: TransportHarness) -> None:
        ticks = iter(range(1_790_000_000_000, 1_790_000_000_000 + 1000, 7))
        ledger = Ledger(
            harness.settings,
            transport=harness.transport,
            start_control_listener=False,
            clock=lambda: next(ticks),
        )
        for agent_id in ("planner", "coder"):
            agent = ledger.agent(agent_id, workflow="wf-1")
            for n in range(3):
                with agent.call(provider="openai", model="gpt-4o-mini", attempt=n + 1) as call:
                    call.record(input_tokens=100 * (n + 1), output_tokens=10)
        assert harness.transport.flush(10.0) == 0
        calls_topic = harness.settings.topics.calls
        assert harness.topic == calls_topic
        got = harness.read(6, 20.0)
        assert len(got) == 6
        for _topic, key, value in got:
            event = CallEvent.model_validate_json(value)
            assert key == event.agent_id.encode()
        for key, values in by_key(got).items():
            events = [CallEvent.model_validate_json(v) for v in values]
            assert [e.attempt for e in events] == [1, 2, 3], key
            assert [e.input_tokens for e in events] == [100, 200, 300]
        ledger.close()


def in_memory_settings() -> Settings:
    return Settings(control_key=SecretStr(TEST_CONTROL_KEY), topic_prefix="mem.")


class TestInMemoryTransport(TransportContract):
    @pytest.fixture
    def harness(self) -> TransportHarness:
        transport = InMemoryTransport()
        settings = in_memory_settings()

        def read(n: int, _timeout_s: float) -> list[Message]:
            return [m for m in transport.messages if m[0] == settings.topics.calls][:n]

        return TransportHarness(transport, settings.topics.calls, read, settings)


# Kafka with no broker listening: the agent must never notice beyond the counters.


@pytest.fixture
def dead_bootstrap() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def dead_transport(dead_bootstrap: str) -> Iterator[KafkaTransport]:
    transport = KafkaTransport(
        dead_bootstrap,
        block_s=0.2,
        close_timeout_s=0.5,
        **{
            "message.timeout.ms": 800,
            "queue.buffering.max.messages": 3,
            "reconnect.backoff.max.ms": 200,
        },
    )
    yield transport
    transport.close()


def test_kafka_outage_counts_delivery_errors(dead_transport: KafkaTransport) -> None:
    for i in range(3):
        dead_transport.send("t.calls", b"k", str(i).encode())
    assert dead_transport.stats.sent == 3
    assert dead_transport.flush(10.0) == 0  # expired after message.timeout.ms
    assert dead_transport.stats.delivery_errors == 3
    assert dead_transport.stats.delivered == 0
    assert dead_transport.stats.last_error is not None


def test_kafka_full_queue_blocks_briefly_then_drops(dead_transport: KafkaTransport) -> None:
    for i in range(3):
        dead_transport.send("t.calls", b"k", str(i).encode())
    started = time.monotonic()
    dead_transport.send("t.calls", b"k", b"one too many")
    waited = time.monotonic() - started
    assert dead_transport.stats.dropped == 1
    assert 0.15 <= waited < 0.8
    assert "queue full" in (dead_transport.stats.last_error or "")


def test_ledger_keeps_working_without_a_broker(dead_bootstrap: str, tmp_path: object) -> None:
    settings = Settings(
        kafka=dead_bootstrap, control_key=SecretStr(TEST_CONTROL_KEY), topic_prefix="dead."
    )
    transport = KafkaTransport(
        dead_bootstrap, block_s=0.05, close_timeout_s=0.5, **{"message.timeout.ms": 500}
    )
    ledger = Ledger(settings, transport=transport)
    agent = ledger.agent("offline-agent", pool="p")
    for _ in range(3):
        with agent.call(provider="openai", model="gpt-4o") as call:
            call.record(input_tokens=10, output_tokens=5)
    assert ledger.wait_for_control(0.3) is False
    started = time.monotonic()
    ledger.close(timeout_s=2.0)
    assert time.monotonic() - started < 8.0
    assert ledger.stats["events"] == 3
    assert transport.stats.delivered == 0
    assert transport.stats.delivery_errors == 3
