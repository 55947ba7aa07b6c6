"""Which input partitions have stopped moving while data waits, and what to do about it.

faust 0.15 with aiokafka sometimes leaves a partition a worker took over assigned and
"active" yet never delivers its records (faust-streaming/faust#629; seen here after a kill -9
of the other worker). Nothing in faust notices, so totals silently fall behind. This module is
the pure decision: the processor feeds it, once a second, each input partition's last
delivered offset, committed offset and end offset, and acts on what it returns. A partition
counts as stalled only when records wait beyond what was delivered and the delivered offset has
not moved for ``stall_after_s``; a quiet partition is never stalled.

Remedies escalate, each tried only while the stall lasts:
1. seek to the committed offset (twice: a seek can race a rebalance);
2. ask the consumer group to rebalance (a rejoin rebuilds every fetch position);
3. report the worker unhealthy, so a supervisor (Kubernetes liveness, ``agentledger up``)
   restarts it; a restarted worker with static membership takes its partitions straight back.
Re-reading is always safe: the spend state recognises applied offsets.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

__all__ = ["PartitionView", "Remedy", "StallWatch", "recovery_views"]

Partition = TypeVar("Partition", bound=Hashable)


class Remedy(Enum):
    SEEK = "seek"
    REJOIN = "rejoin"
    UNHEALTHY = "unhealthy"


# Remedy for the n-th action of one stall: two seeks, then rejoins.
_LADDER = (Remedy.SEEK, Remedy.SEEK, Remedy.REJOIN)


@dataclass(frozen=True)
class PartitionView:
    """What the consumer knows of one partition, as Kafka offsets: ``delivered`` is the last
    record handed to the stream (None: none since assignment), ``committed`` the next record a
    restart would read (the partition's earliest offset when nothing was committed), ``end``
    the offset the next produced record will get (None: unknown)."""

    delivered: int | None
    committed: int | None
    end: int | None


@dataclass
class _Stall:
    delivered: int | None
    since: float
    actions: int = 0
    last_action_at: float = 0.0


class StallWatch(Generic[Partition]):
    """Tracks partitions across calls of ``observe``; holds no references to faust."""

    def __init__(self, stall_after_s: float) -> None:
        if stall_after_s <= 0:
            raise ValueError(f"stall_after_s must be > 0 seconds, got {stall_after_s}")
        self.stall_after_s = stall_after_s
        self._stalls: dict[Partition, _Stall] = {}
        self.unhealthy: set[Partition] = set()

    def reset(self) -> None:
        """Forget every partition: called on a rebalance, which moves fetch positions anyway."""
        self._stalls.clear()
        self.unhealthy.clear()

    def observe(
        self, views: Mapping[Partition, PartitionView], now: float
    ) -> dict[Partition, Remedy]:
        """Return the remedy due now for each stalled partition (none for the others)."""
        due: dict[Partition, Remedy] = {}
        for tp in list(self._stalls):
            if tp not in views:
                del self._stalls[tp]
                self.unhealthy.discard(tp)
        for tp, view in views.items():
            if not _waiting(view):
                self._stalls.pop(tp, None)
                self.unhealthy.discard(tp)
                continue
            stall = self._stalls.get(tp)
            if stall is None or stall.delivered != view.delivered:
                self._stalls[tp] = _Stall(view.delivered, since=now)
                self.unhealthy.discard(tp)
                continue
            # Each step waits a full stall period after the previous one took effect.
            started = stall.last_action_at if stall.actions else stall.since
            if now - started < self.stall_after_s:
                continue
            if stall.actions < len(_LADDER):
                due[tp] = _LADDER[stall.actions]
            else:
                due[tp] = Remedy.UNHEALTHY
                self.unhealthy.add(tp)
            stall.actions += 1
            stall.last_action_at = now
        return due


def _waiting(view: PartitionView) -> bool:
    """Records exist past what the stream has been given."""
    if view.end is None:
        return False
    if view.delivered is not None:
        return view.end > view.delivered + 1
    if view.committed is None:
        return False
    return view.end > view.committed


def recovery_views(
    tps: Iterable[Partition],
    offsets: Mapping[Partition, int | None],
    highwaters: Mapping[Partition, int | None],
) -> dict[Partition, PartitionView]:
    """The changelog partitions a table recovery still reads, as views for a StallWatch.

    faust's recovery waits, without a timeout, until it has read each active changelog
    partition up to its highwater (faust stores the offset of the last record there, one less
    than Kafka's end offset); a fetch that stalls there keeps the worker in recovery, with
    every stream partition paused, for good. ``offsets`` holds the last record read per
    partition (-1: none)."""
    views: dict[Partition, PartitionView] = {}
    for tp in tps:
        offset, highwater = offsets.get(tp), highwaters.get(tp)
        if offset is None or highwater is None:
            continue
        views[tp] = PartitionView(delivered=offset, committed=None, end=highwater + 1)
    return views
