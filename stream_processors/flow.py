"""The faust App the worker runs: faust's, with three repairs for what it still does (follow
the alerts topic for webhooks, create topics at start).

- **read_committed.** The alerts topic is written in the data plane's transactions, and
  faust's aiokafka consumer reads committed data only with faust's exactly_once guarantee on
  (which the processor does not use): :class:`ReadCommittedThread` sets the isolation level,
  so an aborted cycle's alerts are never posted.
- **Resume keeps queues.** faust 0.15 empties every stream queue each time
  ``app.flow_control.resume()`` runs, and resumes more than once around a rebalance (once to
  recover tables, again once the partitions are sought); records fetched in between were
  thrown away and, behind the fetch position, never read again (seen as calls missing from the
  totals when the calls were a faust stream). Queues must still be emptied when partitions are
  revoked, which faust does on its own (``flow_control.clear()`` in the revoke path); a resume
  only lets events flow again.
- **Patient producer** (declare.py): topic creation rides out a broker gone while the worker
  starts.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import faust
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread, Consumer
from faust.types.transports import ConsumerT, ProducerT
from mode.utils.queues import FlowControlEvent

from .declare import PatientProducer

__all__ = ["LedgerApp", "ReadCommittedConsumer", "ReadCommittedThread", "ResumeKeepsQueues"]


class ResumeKeepsQueues(FlowControlEvent):
    """Flow control whose ``resume`` never empties the queues; ``clear`` still does."""

    def resume(self) -> None:
        # FlowControlEvent.resume minus its self.clear(); the two events are mode's own state.
        self._suspend.clear()
        self._resume.set()


class ReadCommittedThread(AIOKafkaConsumerThread):
    """faust's consumer thread, reading with read_committed."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka keeps the constructor's value until start() builds its fetcher from it.
        assert hasattr(consumer, "_isolation_level"), "aiokafka changed: isolation_level"
        consumer._isolation_level = "read_committed"
        return consumer


class ReadCommittedConsumer(Consumer):
    """faust's aiokafka consumer on a :class:`ReadCommittedThread`."""

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return ReadCommittedThread(self, loop=self.loop, beacon=self.beacon)


class LedgerApp(faust.App):
    """faust.App with :class:`ResumeKeepsQueues` as its flow control, a read_committed
    consumer, and a producer whose topic creation rides out a broker gone while the worker
    starts (declare.py)."""

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return ResumeKeepsQueues(loop=self.loop)

    def _new_producer(self) -> ProducerT:
        # faust's own construction (App._new_producer), with the patient producer class.
        return PatientProducer(self.transport, loop=self.loop, beacon=self.beacon)

    def _new_consumer(self) -> ConsumerT:
        # faust's own construction (App._new_consumer), with the read_committed consumer.
        return ReadCommittedConsumer(
            self.transport,
            callback=self.topics.on_message,
            on_partitions_revoked=self._on_partitions_revoked,
            on_partitions_assigned=self._on_partitions_assigned,
            beacon=self.beacon,
            loop=self.transport.loop,
        )
