"""Count each input partition in offset order, whatever faust delivers around a rebalance.

The spend states recognise a replay by the last applied offset of each source partition, so
they are exact only if a partition's records are counted in offset order. faust does not
guarantee that around a rebalance: records fetched before the new assignment's seek to the
committed offsets can reach the stream first, and records dropped from its queues (it empties
them on revoke) leave holes that a later record then jumps over. Both were seen here (debug
logs of the two-worker tests): a record counted at offset 60 made the dropped one at 59 look
like a replay, and its cost was lost.

So the batch handlers ask :class:`InOrder` about every record. A record at the expected offset,
or below it (a replay, which the states skip), is counted. A record beyond it means records
were skipped: it is held back, and the partition is sought back to the expected offset so the
missing records come again, followed by the held ones. If the missing offsets never come
(a real gap, e.g. transaction markers) the gap is accepted after ``accept_gap_after_s``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

__all__ = ["InOrder", "Verdict"]

Partition = TypeVar("Partition", bound=Hashable)


class Verdict(Enum):
    COUNT = "count"
    HOLD = "hold"  # beyond the expected offset: wait for the seek to bring the missing ones
    SEEK = "seek"  # the first record beyond it: seek the partition back to the expected offset


@dataclass
class _Seek:
    since: float
    lowest_held: int


class InOrder(Generic[Partition]):
    """The next offset to count per partition, for one consumer generation."""

    def __init__(self, accept_gap_after_s: float) -> None:
        if accept_gap_after_s <= 0:
            raise ValueError(f"accept_gap_after_s must be > 0 seconds, got {accept_gap_after_s}")
        self.accept_gap_after_s = accept_gap_after_s
        self._next: dict[Partition, int] = {}
        self._seeking: dict[Partition, _Seek] = {}

    def reset(self) -> None:
        """Forget every partition (a new assignment starts from its committed offsets)."""
        self._next.clear()
        self._seeking.clear()

    def known(self) -> list[Partition]:
        return list(self._next)

    def start(self, tp: Partition, offset: int) -> None:
        """The first offset to count on ``tp``: its committed offset (or its earliest)."""
        self._next[tp] = offset
        self._seeking.pop(tp, None)

    def expected(self, tp: Partition) -> int:
        return self._next[tp]

    def commit_bound(self, tp: Partition) -> int | None:
        """The highest offset that may be committed for ``tp``: every record below the next
        one to count is counted. None for a partition not followed (yet)."""
        return self._next.get(tp)

    def admit(self, tp: Partition, offset: int, now: float) -> Verdict:
        expected = self._next[tp]
        if offset < expected:
            return Verdict.COUNT  # read again after a seek: the state skips what it applied
        if offset == expected:
            self._next[tp] = offset + 1
            self._seeking.pop(tp, None)
            return Verdict.COUNT
        seek = self._seeking.get(tp)
        if seek is None:
            self._seeking[tp] = _Seek(since=now, lowest_held=offset)
            return Verdict.SEEK
        seek.lowest_held = min(seek.lowest_held, offset)
        if now - seek.since < self.accept_gap_after_s:
            return Verdict.HOLD
        # The missing offsets did not come back: they do not exist. Count on from the lowest
        # record held back, seeking to it when this is not that record.
        del self._seeking[tp]
        if offset == seek.lowest_held:
            self._next[tp] = offset + 1
            return Verdict.COUNT
        self._next[tp] = seek.lowest_held
        self._seeking[tp] = _Seek(since=now, lowest_held=offset)
        return Verdict.SEEK
