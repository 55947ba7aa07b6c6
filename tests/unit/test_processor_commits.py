"""Commits never pass a record not yet counted (commits.py), whatever faust proposes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import faust
from faust.types import TP

from agentledger.stream_processors.commits import BoundedCommitConsumer, bounded
from agentledger.stream_processors.flow import LedgerApp
from agentledger.stream_processors.ordering import InOrder, Verdict

CALLS = TP("calls", 0)


def on_a_loop(test: Callable[[], None]) -> Callable[[], None]:
    """Run the test inside a running loop: faust apps and consumers bind to the current loop,
    and asyncio.run closes it afterwards."""

    def run() -> None:
        async def body() -> None:
            test()

        asyncio.run(body())

    run.__name__ = test.__name__
    return run


@contextmanager
def consumer_of(app: faust.App) -> Iterator[Any]:
    """The app's (never started) consumer; its thread's event loop, made at construction, is
    closed afterwards."""
    consumer = app.consumer
    try:
        yield consumer
    finally:
        consumer._thread.thread_loop.close()  # type: ignore[attr-defined]


def ack(consumer: Any, offsets: Iterable[int]) -> None:
    """Mark offsets acked the way faust's Consumer.ack records them."""
    for offset in offsets:
        consumer._acked[CALLS].append(offset)
        consumer._acked_index[CALLS].add(offset)


@on_a_loop
def test_faust_commits_past_a_leading_hole() -> None:
    # The behaviour commits.py works around; when faust stops doing this, the bound is moot.
    app = faust.App("commits-faust", autodiscover=False, broker="kafka://127.0.0.1:1")
    with consumer_of(app) as never_committed:
        ack(never_committed, [5, 6, 7])
        assert never_committed._new_offset(CALLS) == 8
    app = faust.App("commits-faust-2", autodiscover=False, broker="kafka://127.0.0.1:1")
    with consumer_of(app) as committed:
        committed._committed_offset[CALLS] = 31  # the next record to read
        ack(committed, range(32, 41))
        assert committed._new_offset(CALLS) == 41  # 31 skipped


@on_a_loop
def test_the_ledger_app_commits_no_further_than_the_next_record_to_count() -> None:
    app = LedgerApp("commits-ledger", autodiscover=False, broker="kafka://127.0.0.1:1")
    order: InOrder[TP] = InOrder(accept_gap_after_s=5.0)
    app.commit_bound = order.commit_bound
    with consumer_of(app) as consumer:
        assert isinstance(consumer, BoundedCommitConsumer)
        counted_in_order(order, consumer)


def counted_in_order(order: InOrder[TP], consumer: Any) -> None:
    # Records 0-4 were skipped; 5-7 arrived, are held back (and acked with their batch).
    order.start(CALLS, 0)
    assert [order.admit(CALLS, o, now=0.0) for o in (5, 6, 7)] == [
        Verdict.SEEK,
        Verdict.HOLD,
        Verdict.HOLD,
    ]
    ack(consumer, [5, 6, 7])
    assert consumer._new_offset(CALLS) == 0
    # The seek brings 0-7 again: all counted, all acked, and the commit reaches the end.
    assert all(order.admit(CALLS, o, now=1.0) is Verdict.COUNT for o in range(8))
    ack(consumer, range(8))
    assert consumer._new_offset(CALLS) == 8


@on_a_loop
def test_partitions_the_guard_does_not_follow_commit_as_faust_does() -> None:
    app = LedgerApp("commits-other", autodiscover=False, broker="kafka://127.0.0.1:1")
    app.commit_bound = InOrder[TP](accept_gap_after_s=5.0).commit_bound
    with consumer_of(app) as consumer:
        ack(consumer, [0, 1, 2])
        assert consumer._new_offset(CALLS) == 3


def test_bounded() -> None:
    assert bounded(None, 4) is None
    assert bounded(9, None) == 9
    assert bounded(9, 4) == 4
    assert bounded(3, 4) == 3
