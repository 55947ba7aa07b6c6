"""The processor's topic creation while the broker is gone (stream_processors/declare.py), on a
real broker that is SIGKILLed between the producer's start and the CreateTopics request: faust
alone raised NodeNotReadyError there and the worker exited."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from agentledger.deploy import KafkaBroker
from agentledger.stream_processors.declare import BrokerGoneAtStart, PatientProducer
from agentledger.stream_processors.flow import LedgerApp
from tests.integration.test_producer_spool import private_broker

__all__ = ["private_broker"]

pytestmark = pytest.mark.integration


def make_app(broker: KafkaBroker, tmp_path: Path) -> LedgerApp:
    return LedgerApp(
        "start-test",
        broker=f"kafka://{broker.bootstrap}",
        store="memory://",
        datadir=str(tmp_path / "app"),
        autodiscover=False,
        web_enabled=False,
    )


def test_topic_creation_rides_out_a_restart_and_gives_up_on_a_broker_gone_for_good(
    private_broker: KafkaBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(private_broker, tmp_path)
    producer = app.producer
    assert isinstance(producer, PatientProducer)

    async def restart_during_creation() -> None:
        private_broker.kill()
        creating = asyncio.ensure_future(producer.create_topic("start.after-restart", 2, 1))
        await asyncio.sleep(2)
        assert not creating.done(), "topic creation ended while the broker was down"
        await asyncio.get_running_loop().run_in_executor(None, private_broker.start, 120)
        await asyncio.wait_for(creating, 60)

    async def gone_for_good() -> None:
        producer.patience_s = 3.0
        private_broker.kill()
        await producer.create_topic("start.never", 1, 1)

    app.loop.run_until_complete(producer.start())
    try:
        app.loop.run_until_complete(restart_during_creation())
        assert "creating topic 'start.after-restart': Kafka does not answer" in caplog.text
        admin = AdminClient({"bootstrap.servers": private_broker.bootstrap})
        topics = admin.list_topics(timeout=10).topics
        assert len(topics["start.after-restart"].partitions) == 2

        with pytest.raises(BrokerGoneAtStart) as failure:
            app.loop.run_until_complete(gone_for_good())
    finally:
        app.loop.run_until_complete(producer.stop())
    message = str(failure.value)
    assert message.startswith(
        f"could not create topic 'start.never': Kafka at {private_broker.bootstrap} did not "
        "answer for 3s ("
    )
    assert "`agentledger up --supervise`" in message
