"""InOrder: records counted in each partition's offset order, holes sought back."""

from __future__ import annotations

import pytest

from agentledger.stream_processors.ordering import InOrder, Verdict

COUNT, HOLD, SEEK = Verdict.COUNT, Verdict.HOLD, Verdict.SEEK


def verdicts(order: InOrder[str], offsets: list[int], now: float = 0.0) -> list[Verdict]:
    return [order.admit("calls:0", offset, now) for offset in offsets]


def test_in_order_records_and_replays_are_counted() -> None:
    order: InOrder[str] = InOrder(5.0)
    order.start("calls:0", 10)
    assert verdicts(order, [10, 11, 12, 3, 4, 13]) == [COUNT] * 6
    assert order.expected("calls:0") == 14


def test_a_hole_is_sought_back_and_the_records_behind_it_wait() -> None:
    order: InOrder[str] = InOrder(5.0)
    order.start("calls:0", 59)
    # 59 was dropped; 60 and 61 arrive first: seek back to 59, hold both.
    assert verdicts(order, [60, 61]) == [SEEK, HOLD]
    assert order.expected("calls:0") == 59
    # Stale copies still queued keep waiting without another seek.
    assert verdicts(order, [62], now=1.0) == [HOLD]
    # The seek brings 59 again, then everything after it, in order.
    assert verdicts(order, [59, 60, 61, 62], now=1.5) == [COUNT] * 4
    assert order.expected("calls:0") == 63


def test_a_real_gap_is_accepted_after_the_wait() -> None:
    order: InOrder[str] = InOrder(5.0)
    order.start("calls:0", 7)
    assert verdicts(order, [9], now=0.0) == [SEEK]
    assert verdicts(order, [9], now=1.0) == [HOLD]  # the seek brought 9 again, not 7 or 8
    assert verdicts(order, [9], now=6.0) == [COUNT]  # 7 and 8 do not exist
    assert verdicts(order, [10], now=6.1) == [COUNT]


def test_an_accepted_gap_restarts_from_the_lowest_record_held() -> None:
    order: InOrder[str] = InOrder(5.0)
    order.start("calls:0", 0)
    assert verdicts(order, [4, 5], now=0.0) == [SEEK, HOLD]
    assert verdicts(order, [5], now=6.0) == [SEEK]  # 4 was the lowest held: go back to it
    assert order.expected("calls:0") == 4
    assert verdicts(order, [4, 5], now=6.5) == [COUNT, COUNT]


def test_partitions_are_independent_and_reset_forgets_them() -> None:
    order: InOrder[str] = InOrder(5.0)
    order.start("calls:0", 0)
    order.start("calls:1", 100)
    assert order.admit("calls:0", 1, 0.0) is SEEK
    assert order.admit("calls:1", 100, 0.0) is COUNT
    assert sorted(order.known()) == ["calls:0", "calls:1"]
    order.reset()
    assert order.known() == []


def test_the_gap_wait_must_be_positive() -> None:
    with pytest.raises(ValueError, match="accept_gap_after_s must be > 0"):
        InOrder(0)
