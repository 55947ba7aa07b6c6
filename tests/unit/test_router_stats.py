"""Routing stats without a broker: the latency sketch, the processor's aggregator (replays,
rebuilds) and the partials a router adds up."""

from __future__ import annotations

import random
import uuid
from fractions import Fraction

import pytest
from pydantic import ValidationError

from agentledger.producers import StatsBook
from agentledger.schemas import CallEvent, CallStatus, TaskStats, summarize
from agentledger.schemas.call_decode import record_of
from agentledger.schemas.stats import (
    LATENCY_RELATIVE_ERROR,
    bucket_value,
    latency_bucket,
    sketch_quantile,
)
from agentledger.stream_processors.stats import StatsAggregator

T0 = 1_790_000_000_000


def call(
    n: int,
    *,
    agent: str = "a",
    model: str = "m",
    cost: int = 1_000,
    latency: int = 100,
    status: CallStatus = CallStatus.OK,
    task_type: str | None = "summarize",
    priced: bool = True,
) -> CallEvent:
    return CallEvent(
        event_id=uuid.UUID(int=n + 1),
        event_time_ms=T0 + n,
        agent_id=agent,
        task_type=task_type,
        provider="openai",
        requested_model=model,
        used_model=model,
        cost_nano_usd=cost if priced else 0,
        priced=priced,
        latency_ms=latency,
        status=status,
    )


def nearest_rank(values: list[int], q: Fraction) -> int:
    ordered = sorted(values)
    rank = max(1, -(-q.numerator * len(ordered) // q.denominator))
    return ordered[rank - 1]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sketch_quantiles_are_within_the_stated_relative_error(seed: int) -> None:
    rng = random.Random(seed)
    values = [int(rng.lognormvariate(6, 1.2)) + 1 for _ in range(5_000)]
    buckets: dict[int, int] = {}
    for v in values:
        buckets[latency_bucket(v)] = buckets.get(latency_bucket(v), 0) + 1
    for q in (Fraction(1, 2), Fraction(95, 100), Fraction(99, 100)):
        exact = nearest_rank(values, q)
        estimate = sketch_quantile(buckets, q)
        assert estimate is not None
        # +1 ms: the representative is rounded to a whole millisecond.
        assert abs(estimate - exact) <= exact * LATENCY_RELATIVE_ERROR + 1, (q, exact, estimate)


def test_sketch_edges() -> None:
    assert latency_bucket(0) == 0 and bucket_value(0) == 0
    assert bucket_value(latency_bucket(1)) == 1
    assert sketch_quantile({}, Fraction(1, 2)) is None
    assert len({latency_bucket(v) for v in range(1, 10_000_000, 997)}) < 175


def aggregate(events: list[CallEvent], partition: int = 0, start: int = 0) -> StatsAggregator:
    agg = StatsAggregator(clock=lambda: T0 + 10_000)
    for i, event in enumerate(events):
        assert agg.observe(partition, start + i, event.model_dump_json().encode())
    return agg


def test_aggregator_sums_exactly_per_agent_and_model() -> None:
    events = [
        call(0, cost=333_333_333),
        call(1, cost=333_333_334, status=CallStatus.ERROR, latency=900),
        call(2, cost=1, model="other"),
        call(3, cost=0, priced=False),
    ]
    records = {r.key: r for r in aggregate(events).take_dirty()}
    assert set(records) == {
        "agent:a|summarize|0",
        "model:m|summarize|0",
        "model:other|summarize|0",
    }
    agent = records["agent:a|summarize|0"]
    assert (agent.calls, agent.successes, agent.priced_calls) == (4, 3, 3)
    assert agent.cost_nano_usd == 666_666_668
    assert agent.source_offset == 3
    assert (agent.first_event_time_ms, agent.last_event_time_ms) == (T0, T0 + 3)
    model = records["model:m|summarize|0"]
    assert (model.calls, model.cost_nano_usd) == (3, 666_666_667)
    summary = summarize([agent])
    assert summary is not None
    assert summary.success_rate == Fraction(3, 4)
    assert summary.cost_per_call_nano == Fraction(666_666_668, 3)
    # Four calls for three successes, the unpriced one at the mean of the priced ones.
    assert summary.cost_per_success_nano == Fraction(666_666_668, 3) * 4 / 3
    assert summary.as_dict()["cost_per_call_usd"] == "0.222222222667"


def test_replayed_offsets_are_not_counted_twice_and_dirty_keys_publish_once() -> None:
    events = [call(n) for n in range(5)]
    agg = aggregate(events)
    assert len(agg.take_dirty()) == 2
    assert agg.take_dirty() == []
    for offset, event in enumerate(events):
        assert not agg.observe(0, offset, event.model_dump_json().encode())
    assert agg.take_dirty() == []
    assert agg.metrics["replayed"] == 5
    stats = agg.stats("agent:a|summarize|0")
    assert stats is not None and stats.calls == 5


def test_counting_call_records_equals_counting_call_events() -> None:
    rng = random.Random(3)
    events = [
        call(
            n,
            cost=rng.randrange(10**9),
            latency=rng.randrange(1, 5_000),
            status=rng.choice(list(CallStatus)),
            priced=rng.random() < 0.9,
            agent=f"a{n % 3}",
            task_type=rng.choice([None, "t1", "t2"]),
        )
        for n in range(200)
    ]
    by_event, by_record = StatsAggregator(lambda: T0), StatsAggregator(lambda: T0)
    for offset, event in enumerate(events):
        partition = offset % 2
        assert by_event.count(event, partition, offset // 2)
        assert by_record.count(record_of(event), partition, offset // 2)
    assert not by_record.count(record_of(events[0]), 0, 0)  # a replay
    assert by_record.take_dirty() == by_event.take_dirty() != []


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_counting_a_batch_equals_counting_its_events_one_by_one(seed: int) -> None:
    """The data plane counts a cycle's events with count_batch: the same partials and the
    same replay skips as count() event by event, including an agent whose events of several
    models interleave and batches that re-read offsets already counted (after a rewind)."""
    rng = random.Random(seed)
    events = [
        call(
            n,
            cost=rng.randrange(10**9),
            latency=rng.randrange(0, 5_000),
            status=rng.choice(list(CallStatus)),
            priced=rng.random() < 0.9,
            agent=f"a{rng.randrange(3)}",
            model=rng.choice(["m1", "m2", "m3"]),
            task_type=rng.choice([None, "t1"]),
        )
        for n in range(600)
    ]
    records = [(record_of(e), n % 3, n // 3) for n, e in enumerate(events)]
    one_by_one, batched = StatsAggregator(lambda: T0), StatsAggregator(lambda: T0)
    at = 0
    while at < len(records):
        size = rng.randrange(1, 80)
        # Now and then a cycle read again from a little before where the last one ended.
        begin = max(0, at - rng.randrange(0, 30)) if rng.random() < 0.3 else at
        batch = records[begin : at + size]
        for record, partition, offset in batch:
            one_by_one.count(record, partition, offset)
        batched.count_batch(batch)
        at += size
        assert batched.metrics == one_by_one.metrics
    assert batched.take_dirty() == one_by_one.take_dirty() != []
    assert batched.metrics["replayed"] > 0


def test_unreadable_and_future_calls_are_skipped_not_counted() -> None:
    agg = StatsAggregator(clock=lambda: T0)
    assert not agg.observe(0, 0, None)
    assert not agg.observe(0, 1, b"{not json")
    # More than 5 minutes ahead of the clock, as the spend path dead-letters it.
    future = call(0).model_copy(update={"event_time_ms": T0 + 300_001})
    assert not agg.observe(0, 2, future.model_dump_json().encode())
    assert agg.metrics["unreadable"] == 3 and len(agg) == 0
    assert agg.observe(0, 3, call(300_000).model_dump_json().encode())


def test_rebuild_takes_the_published_partial_and_continues_after_its_offset() -> None:
    published = aggregate([call(n) for n in range(10)]).take_dirty()
    restarted = StatsAggregator(clock=lambda: T0 + 20_000)
    for record in published:
        assert restarted.load(record.model_dump_json().encode()) is None
    # A replay from an older committed offset: 0-9 were counted, 10-11 are new.
    for offset in range(12):
        restarted.observe(0, offset, call(offset).model_dump_json().encode())
    stats = restarted.stats("agent:a|summarize|0")
    assert stats is not None and (stats.calls, stats.source_offset) == (12, 11)
    # An older value of the same key (read back late from the topic) never wins.
    assert restarted.load(published[0].model_dump_json().encode()) is None
    again = restarted.stats("agent:a|summarize|0")
    assert again is not None and again.calls == 12
    assert "not a valid TaskStats" in (restarted.load(b'{"subject": "x"}') or "")


def test_partials_of_several_partitions_add_up_to_one_aggregate() -> None:
    rng = random.Random(7)
    events = [
        call(n, latency=rng.randrange(1, 5_000), cost=rng.randrange(10**9), agent=f"a{n % 3}")
        for n in range(300)
    ]
    whole = aggregate(events).take_dirty()
    split = StatsAggregator(clock=lambda: T0)
    for offset, event in enumerate(events):
        split.observe(offset % 4, offset, event.model_dump_json().encode())
    model_parts = [r for r in split.take_dirty() if r.subject == "model:m"]
    assert len(model_parts) == 4
    merged, single = summarize(model_parts), summarize([r for r in whole if r.subject == "model:m"])
    assert merged is not None and single is not None
    assert merged.cost_nano_usd == single.cost_nano_usd == sum(e.cost_nano_usd for e in events)
    assert merged.latency_ms_buckets == single.latency_ms_buckets
    assert (merged.p50_ms, merged.p95_ms, merged.calls) == (single.p50_ms, single.p95_ms, 300)


def test_summarize_refuses_mixed_groups() -> None:
    records = aggregate([call(0, agent="a"), call(1, agent="b")]).take_dirty()
    with pytest.raises(ValueError, match="one \\(subject, task type\\)"):
        summarize(records)


def test_stats_record_validation_names_the_field() -> None:
    record = aggregate([call(0)]).take_dirty()[0]
    assert TaskStats.model_validate_json(record.model_dump_json()) == record
    with pytest.raises(ValidationError, match="subject"):
        TaskStats.model_validate({**record.model_dump(), "subject": "pool:x"})
    with pytest.raises(ValidationError, match="cost_nano_usd"):
        TaskStats.model_validate({**record.model_dump(), "cost_nano_usd": -1})


def test_stats_book_keeps_the_latest_partial_and_rejects_garbage() -> None:
    agg = aggregate([call(n) for n in range(3)])
    first = agg.take_dirty()
    agg.observe(0, 3, call(3).model_dump_json().encode())
    second = agg.take_dirty()
    book = StatsBook()
    for record in second + first:  # the newer value arrives first
        book.apply(record.model_dump_json().encode())
    summary = book.summary("agent:a", "summarize")
    assert summary is not None and summary.calls == 4
    assert book.metrics["stale"] == 2
    assert book.apply(b"garbage") is False and book.metrics["rejected_invalid"] == 1
    assert book.summary("agent:nobody", "summarize") is None
