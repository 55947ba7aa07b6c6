"""The routing stats recomputed in a real (embedded) ClickHouse equal what the processor's
aggregator publishes for the same calls: counts, exact cost, freshness, latency buckets."""

from __future__ import annotations

import random
import uuid

import pytest

from agentledger.review.stats_query import routing_stats
from agentledger.schemas import CallEvent, CallStatus, StatsSummary, TaskStats, summarize
from agentledger.sinks.database import ClickHouse
from agentledger.sinks.rows import CALL_COLUMNS, SourcePosition, call_to_row
from agentledger.stream_processors.stats import StatsAggregator

T0 = 1_790_000_000_000


def workload() -> list[CallEvent]:
    rng = random.Random(11)
    events = []
    for n in range(400):
        agent = ("cheap", "pricey", "new")[n % 3]
        events.append(
            CallEvent(
                event_id=uuid.UUID(int=n + 1),
                event_time_ms=T0 + n * 1_000,
                agent_id=agent,
                task_type=None if n % 7 == 0 else ("summarize", "translate")[n % 2],
                provider="openai",
                requested_model="m",
                used_model=("small", "large")[n % 2],
                cost_nano_usd=rng.randrange(1, 10**10),
                priced=n % 11 != 0,
                latency_ms=rng.choice([0, 1, 2, rng.randrange(3, 60_000)]),
                status=CallStatus.OK if rng.random() < 0.9 else CallStatus.TIMEOUT,
            )
        )
    return [e if e.priced else e.model_copy(update={"cost_nano_usd": 0}) for e in events]


@pytest.fixture
def loaded(db: ClickHouse) -> tuple[ClickHouse, list[CallEvent]]:
    events = workload()
    rows = [call_to_row(e, SourcePosition("calls", 0, i), T0 + 10**6) for i, e in enumerate(events)]
    db.insert("calls", rows, CALL_COLUMNS)
    return db, events


def expected(events: list[CallEvent], by: str) -> dict[tuple[str, str | None], StatsSummary]:
    agg = StatsAggregator(clock=lambda: T0 + 10**7)
    for offset, event in enumerate(events):
        agg.observe(offset % 4, offset, event.model_dump_json().encode())
    groups: dict[tuple[str, str | None], list[TaskStats]] = {}
    for record in agg.take_dirty():
        if record.subject.startswith(by):
            groups.setdefault((record.subject, record.task_type), []).append(record)
    found = {key: summarize(parts) for key, parts in groups.items()}
    return {k: v for k, v in found.items() if v is not None}


@pytest.mark.parametrize("by", ["agent", "model"])
def test_clickhouse_stats_equal_the_processors(
    loaded: tuple[ClickHouse, list[CallEvent]], by: str
) -> None:
    db, events = loaded
    got = {(s.subject, s.task_type): s for s in routing_stats(db.readonly_query, by=by)}
    want = expected(events, by)
    assert set(got) == set(want)
    for key, summary in want.items():
        mine = got[key]
        assert (mine.calls, mine.successes, mine.priced_calls) == (
            summary.calls,
            summary.successes,
            summary.priced_calls,
        ), key
        assert mine.cost_nano_usd == summary.cost_nano_usd, key
        assert mine.last_event_time_ms == summary.last_event_time_ms, key
        assert dict(mine.latency_ms_buckets) == dict(summary.latency_ms_buckets), key
        assert (mine.p50_ms, mine.p95_ms) == (summary.p50_ms, summary.p95_ms), key


def test_filters_by_task_type_ids_and_time(loaded: tuple[ClickHouse, list[CallEvent]]) -> None:
    db, events = loaded
    since, until = T0 + 100_000, T0 + 200_000
    [only] = routing_stats(
        db.readonly_query,
        task_type="summarize",
        ids=["pricey"],
        since_ms=since,
        until_ms=until,
    )
    chosen = [
        e
        for e in events
        if e.agent_id == "pricey"
        and e.task_type == "summarize"
        and since <= e.event_time_ms < until
    ]
    assert only.subject == "agent:pricey" and only.calls == len(chosen) > 0
    assert only.cost_nano_usd == sum(e.cost_nano_usd for e in chosen if e.priced)
    # A hostile id is a value, not SQL.
    assert routing_stats(db.readonly_query, ids=["x' OR 1=1 --"]) == []


def test_bad_arguments_are_refused(db: ClickHouse) -> None:
    with pytest.raises(ValueError, match="by must be 'agent' or 'model'"):
        routing_stats(db.readonly_query, by="pool")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="since_ms <= until_ms"):
        routing_stats(db.readonly_query, since_ms=5, until_ms=4)
