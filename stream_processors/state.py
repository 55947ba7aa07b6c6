"""The spend state of one key (an agent, or a pool / workflow / task type scope): what the
processor knows about it, kept as one table value.

Exactness rests on two facts kept in one state value (one changelog message, so one atomic
write): the highest source offset applied per partition, and the spend per period. A replayed
event, whose offset is at or below the applied one, changes nothing (:meth:`delivery`).

Counting is in counting.py (and fold.py per batch), the stored form in state_codec.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

from agentledger.schemas import ControlCommand

from .periods import PeriodWindow

__all__ = ["Delivery", "SpendState"]


class Delivery(StrEnum):
    """What one record at one source offset is, relative to a state."""

    NEW = "new"  # count it
    REPLAY = "replay"  # this very record was counted already (offset at or below applied)
    DUPLICATE = "duplicate"  # another record with the same event id was counted


@dataclass(frozen=True)
class SpendState:
    """Everything the processor knows about one agent, stored as one table value."""

    applied: Mapping[int, int] = field(default_factory=dict)
    periods: Mapping[str, int] = field(default_factory=dict)
    last_command: ControlCommand | None = None
    partition: int | None = None
    #: Recently counted event ids (hex) and the source offset each was counted at, oldest first.
    recent: Mapping[str, int] = field(default_factory=dict)
    #: Threshold crossings already alerted (:attr:`Crossing.key`), for the current periods.
    alerted: tuple[str, ...] = ()
    #: Event times of recent failed attempts per task id (agent states only), oldest first.
    failures: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    #: Rolling and burn-rate slots: ``"<slot_ms>:<slot_start_ms>"`` -> nano-USD.
    slots: Mapping[str, int] = field(default_factory=dict)
    #: Workflow runs per idle gap: idle_ms -> (first event ms, last event ms, nano-USD).
    runs: Mapping[int, tuple[int, int, int]] = field(default_factory=dict)
    #: Recent calls ``(start_ms, end_ms)`` (pool states with a concurrency cap), oldest first.
    intervals: tuple[tuple[int, int], ...] = ()
    #: Agents seen (workflow states with spawn limits): agent -> (parent, depth, first ms).
    agents: Mapping[str, tuple[str | None, int, int]] = field(default_factory=dict)
    #: Spend on retries (attempt 2 and later) per calendar period key (agent states only).
    retry_spend: Mapping[str, int] = field(default_factory=dict)
    #: Subtree scopes a command published from this (workflow) state stands for.
    subtrees: tuple[str, ...] = ()
    #: Allowances per budget instance (allowances.py): budget key -> (start ms, end ms or
    #: None, {holder: (granted, confirmed, expires ms)}), amounts cumulative in nano-USD.
    leases: Mapping[str, tuple[int, int | None, Mapping[str, tuple[int, int, int]]]] = field(
        default_factory=dict
    )
    #: Per holder: (last request seq applied, when, the allowances partition it follows).
    holders: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)

    def already_applied(self, partition: int, offset: int) -> bool:
        done = self.applied.get(partition)
        return done is not None and offset <= done

    def delivery(self, event_id: str | None, partition: int, offset: int) -> Delivery:
        seen_at = self.recent.get(event_id) if event_id is not None else None
        if seen_at is not None and seen_at != offset:
            return Delivery.DUPLICATE
        if self.already_applied(partition, offset):
            return Delivery.REPLAY
        return Delivery.NEW

    def spend(self, window: PeriodWindow) -> int:
        return self.periods.get(window.key, 0)

    @cached_property
    def slot_series(self) -> Mapping[int, list[tuple[int, int]]]:
        """The slots parsed and sorted per slot length: ``{slot_ms: [(start_ms, nano)]}``.
        Kept on the (immutable) state, since one evaluation reads them several times."""
        series: dict[int, list[tuple[int, int]]] = {}
        for key, nano in self.slots.items():
            slot, _, start = key.partition(":")
            series.setdefault(int(slot), []).append((int(start), nano))
        for items in series.values():
            items.sort()
        return series
