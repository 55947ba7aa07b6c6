"""A faust App whose stream queues keep their events when flow resumes.

faust 0.15 empties every stream queue each time ``app.flow_control.resume()`` runs. After a
rebalance that needs table recovery, flow is resumed once to read the changelogs, then the
stream partitions are resumed and sought to their committed offsets (a broker round trip per
partition, a second or more under load), and only then is flow resumed again. Records fetched
in that gap are already in the queues and are thrown away; their offsets are behind the
fetch position, so nothing reads them again, and the next commit moves past them. Seen here as
events missing from the totals after a worker joined or died (the two-worker test, debug log:
``calls:4@0`` fetched, never delivered, offset 2 committed).

Queues must be emptied when partitions are revoked, and faust does that on its own
(``flow_control.clear()`` in the revoke path). A resume only lets events flow again; clearing
there drops current events, so this App's flow control does not.
"""

from __future__ import annotations

from functools import cached_property

import faust
from faust.types.transports import ConsumerT, ProducerT
from mode.utils.queues import FlowControlEvent

from .commits import BoundedCommitConsumer, CommitBound
from .declare import PatientProducer

__all__ = ["LedgerApp", "ResumeKeepsQueues"]


class ResumeKeepsQueues(FlowControlEvent):
    """Flow control whose ``resume`` never empties the queues; ``clear`` still does."""

    def resume(self) -> None:
        # FlowControlEvent.resume minus its self.clear(); the two events are mode's own state.
        self._suspend.clear()
        self._resume.set()


class LedgerApp(faust.App):
    """faust.App with :class:`ResumeKeepsQueues` as its flow control, a consumer whose
    commits never pass ``commit_bound`` (commits.py), and a producer whose topic creation
    rides out a broker gone while the worker starts (declare.py)."""

    commit_bound: CommitBound | None = None

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return ResumeKeepsQueues(loop=self.loop)

    def _new_producer(self) -> ProducerT:
        # faust's own construction (App._new_producer), with the patient producer class.
        return PatientProducer(self.transport, loop=self.loop, beacon=self.beacon)

    def _new_consumer(self) -> ConsumerT:
        # faust's own construction (App._new_consumer), with the bounded consumer class.
        return BoundedCommitConsumer(
            self.transport,
            callback=self.topics.on_message,
            on_partitions_revoked=self._on_partitions_revoked,
            on_partitions_assigned=self._on_partitions_assigned,
            beacon=self.beacon,
            loop=self.transport.loop,
        )
