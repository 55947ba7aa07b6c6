"""A faust consumer that never commits an input partition past a record not yet counted, and
that seeks partitions without a committed offset back to their beginning like the others.

faust commits, per partition, the end of the first run of consecutive acked offsets. It checks
for a hole before that run only when the partition already has a committed offset, and then
one offset too late: with offset 31 committed (the next record to read), acked 32-40 commit
41 and record 31 is skipped; a partition never committed commits past any leading hole.
Holes happen here on purpose: the ordering guard (ordering.py) holds back records that
arrive beyond a missing one and seeks back for it, and take_events acks the held records with
their batch. A kill -9 after such a commit and before the missing records come again would
lose them for good.

The processor knows exactly where it is: everything below the ordering guard's next expected
offset is counted (or was accepted as a gap). That offset bounds every commit.

Seeks: faust throws away records fetched while a rebalance or recovery is under way and seeks
the partitions back to their committed offsets (``perform_seek``). aiokafka seeks only to a
committed offset above 0, so a partition never committed (or committed at 0) keeps the fetch
position past the records thrown away, and nothing reads them again. Seen in the two-worker
kill test: the survivor took over a partition the victim had never committed, fetched offsets
0-11 during recovery, dropped them, and fetched on from 12 until the stall watch sought it
back 12 s later. Such input partitions are sought to their beginning (where the group's
``auto_offset_reset=earliest`` starts them anyway); changelog partitions are left to the
table recovery, which places them itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread, Consumer
from faust.types import TP

__all__ = ["BoundedCommitConsumer", "CommitBound", "bounded"]

# The next offset to count per input partition; None for partitions it does not follow.
CommitBound = Callable[[TP], "int | None"]


def bounded(proposed: int | None, bound: int | None) -> int | None:
    """The offset to commit: faust's proposal, lowered to the bound."""
    if proposed is None or bound is None:
        return proposed
    return min(proposed, bound)


class ReadCommittedThread(AIOKafkaConsumerThread):
    """faust's consumer thread, reading with read_committed: the data plane writes the scopes
    topic in transactions, and faust reads committed data only with its (buggy) exactly_once
    guarantee on."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka keeps the constructor's value until start() builds its fetcher from it.
        assert hasattr(consumer, "_isolation_level"), "aiokafka changed: isolation_level"
        consumer._isolation_level = "read_committed"
        return consumer


class BoundedCommitConsumer(Consumer):
    """faust's aiokafka consumer whose commit offsets never pass the app's ``commit_bound``
    (an attribute of the app, set by the processor, None to commit as faust does), reading
    with read_committed."""

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return ReadCommittedThread(self, loop=self.loop, beacon=self.beacon)

    def _new_offset(self, tp: TP) -> int | None:
        # faust drops the acked offsets it proposes from its list either way; a lower commit
        # leaves them to be read, counted (a replay the states skip) and acked again.
        proposed = super()._new_offset(tp)
        commit_bound: CommitBound | None = getattr(self.app, "commit_bound", None)
        return bounded(proposed, commit_bound(tp) if commit_bound is not None else None)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed = await super().seek_to_committed()
        changelogs = self.app.tables.changelog_topics
        unset = [
            tp for tp, offset in committed.items() if not offset and tp.topic not in changelogs
        ]
        if unset:
            await self._thread.seek_to_beginning(*unset)
        return committed
