"""A faust consumer that never commits an input partition past a record not yet counted.

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
"""

from __future__ import annotations

from collections.abc import Callable

from faust.transport.drivers.aiokafka import Consumer
from faust.types import TP

__all__ = ["BoundedCommitConsumer", "CommitBound", "bounded"]

# The next offset to count per input partition; None for partitions it does not follow.
CommitBound = Callable[[TP], "int | None"]


def bounded(proposed: int | None, bound: int | None) -> int | None:
    """The offset to commit: faust's proposal, lowered to the bound."""
    if proposed is None or bound is None:
        return proposed
    return min(proposed, bound)


class BoundedCommitConsumer(Consumer):
    """faust's aiokafka consumer whose commit offsets never pass the app's ``commit_bound``
    (an attribute of the app, set by the processor, None to commit as faust does)."""

    def _new_offset(self, tp: TP) -> int | None:
        # faust drops the acked offsets it proposes from its list either way; a lower commit
        # leaves them to be read, counted (a replay the states skip) and acked again.
        proposed = super()._new_offset(tp)
        commit_bound: CommitBound | None = getattr(self.app, "commit_bound", None)
        return bounded(proposed, commit_bound(tp) if commit_bound is not None else None)
