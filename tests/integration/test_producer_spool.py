"""Zero loss across a broker outage: a PRIVATE broker (not the session one) is stopped in the
middle of a stream and restarted; every event id comes back from the calls topic."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from agentledger.config import Settings
from agentledger.deploy import KafkaBroker
from agentledger.producers import KafkaTransport, Ledger, Spool
from agentledger.schemas import CallEvent
from agentledger.schemas.topic_specs import topic_specs
from agentledger.topic_admin import ensure_topics
from tests.conftest import SettingsFactory, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    jars = os.environ.get("AGENTLEDGER_KAFKA_JARS")
    broker = KafkaBroker(
        state_dir=tmp_path / "kafka",
        port=free_port(),
        controller_port=free_port(),
        jar_dir=Path(jars) if jars else None,
    )
    broker.start(timeout_s=120)
    yield broker
    broker.kill()
    broker.stop(timeout_s=5)


def read_event_ids(bootstrap: str, topic: str, want: int, timeout_s: float) -> list[str]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        ids: list[str] = []
        deadline = time.monotonic() + timeout_s
        while len(ids) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                continue
            value = msg.value()
            assert value is not None
            ids.append(str(CallEvent.model_validate_json(value).event_id))
        # Anything beyond ``want`` would be a duplicate: read briefly for it.
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None and msg.value() is not None:
                ids.append(str(CallEvent.model_validate_json(msg.value() or b"").event_id))
        return ids
    finally:
        consumer.close()


def test_broker_outage_mid_stream_loses_no_event(
    private_broker: KafkaBroker, settings_factory: SettingsFactory
) -> None:
    settings: Settings = settings_factory(kafka=private_broker.bootstrap)
    ensure_topics(settings.kafka, topic_specs(settings.topics))
    transport = KafkaTransport(
        settings.kafka,
        close_timeout_s=30.0,
        spool=Spool(settings.home / "spool"),
        **{"reconnect.backoff.max.ms": 500},
    )
    ledger = Ledger(settings, transport=transport, start_control_listener=False)
    agents = [ledger.agent(f"steady-{i}", pool="outage") for i in range(3)]
    sent: list[str] = []

    def emit(n: int, pause_s: float = 0.0) -> None:
        for i in range(n):
            with agents[i % 3].call(provider="openai", model="gpt-4o-mini") as call:
                call.record(input_tokens=100, output_tokens=10)
            assert call.event is not None
            sent.append(str(call.event.event_id))
            if pause_s:
                time.sleep(pause_s)

    emit(100)
    assert transport.flush(30) == 0
    private_broker.stop(timeout_s=30)
    emit(150, pause_s=0.01)  # the agent keeps working while the broker is down
    assert transport.stats.spooled > 0, "nothing was spooled during the outage"
    private_broker.start(timeout_s=120)
    emit(50)

    deadline = time.monotonic() + 60
    while transport.spooling and time.monotonic() < deadline:
        time.sleep(0.1)
    ledger.close()
    stats = transport.stats
    got = read_event_ids(settings.kafka, settings.topics.calls, len(sent), 60.0)
    assert stats.dropped == 0
    assert set(got) == set(sent), f"lost {len(set(sent) - set(got))} of {len(sent)} events"
    # Duplicates are possible (a replay retried) and recognisable: the same event id.
    print(
        f"\noutage: {len(sent)} events sent, {stats.spooled} spooled, {stats.replayed} "
        f"replayed, {len(got) - len(set(got))} duplicates, 0 lost"
    )
