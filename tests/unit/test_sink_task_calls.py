"""task_calls (migration 7) against `calls`: the review's escalations read from it must equal the
same query over `calls` (the reference), for every --by dimension and for windows that cut
tasks, after several sink batches, a spool replay, a retried insert and a backfill."""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.review.escalation import Escalations, escalations
from agentledger.review.insights import DIMENSIONS
from agentledger.review.query import QueryClient, QueryResult
from agentledger.schemas import CallEvent, CallStatus
from agentledger.sinks.database import ClickHouse
from agentledger.sinks.migrations import MIGRATIONS, apply_migrations
from agentledger.sinks.rows import SourcePosition, call_to_row
from agentledger.sinks.store import SinkTables
from agentledger.sinks.streams import calls_stream
from tests.unit.test_sink_rollups import run_worker
from tests.unit.test_sink_worker import Msg

DAY = 86_400_000
MINUTE = 60_000
T0 = 1_735_689_600_000  # 2025-01-01T00:00:00Z
# "free" has no rank (no tokens priced), so a step to or from it is never an escalation.
RANKS = {"small": 1, "mid": 2, "big": 3}
MODELS = [*RANKS, "free"]


class LocalClient(QueryClient):
    def __init__(self, db: ClickHouse) -> None:
        self.db = db

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        return self.db.readonly_query(sql, parameters)


def generated_calls(n: int, seed: int) -> list[CallEvent]:
    """Tasks of a few calls over two days, with failures, retries, model changes both ways,
    task ids shared between agents (a different task per agent), calls without a task id, and
    calls of one task with the same attempt and millisecond (the event id decides the order)."""
    rng = random.Random(seed)
    events: list[CallEvent] = []
    for i in range(n):
        task = rng.randrange(40)
        t = T0 - DAY + rng.randrange(2 * DAY // MINUTE) * MINUTE + rng.choice([0, 0, 1, 7])
        events.append(
            CallEvent(
                event_id=uuid.UUID(int=rng.getrandbits(128)),
                event_time_ms=t,
                agent_id=f"a{task % 4}" if rng.random() < 0.9 else "a9",
                pool=rng.choice(["p0", "p1", None]),
                workflow_id=rng.choice([f"w{task % 5}", None]),
                task_type=rng.choice(["code", "plan", None]),
                task_id=f"t{task}" if i % 11 else None,
                provider="x",
                requested_model="small",
                used_model=rng.choice(MODELS),
                input_tokens=100,
                output_tokens=10,
                cost_nano_usd=1_000 + i,  # distinct, so a wrong call's cost shows
                latency_ms=10,
                status=CallStatus.OK if rng.random() < 0.6 else CallStatus.ERROR,
                attempt=rng.choice([1, 1, 2, 3]),
            )
        )
    return events


def message(event: CallEvent, partition: int, offset: int) -> Msg:
    return Msg("x.calls", partition, offset, event.model_dump_json().encode())


WINDOWS = [
    (T0, T0 + DAY),  # the day, against the day before: aligned, every task whole
    (T0 + 7 * MINUTE + 3, T0 + 5 * 3_600_000 + 11),  # bounds off the minute, cutting tasks
]


def both_sources(
    db: ClickHouse, by: str, since: int, until: int
) -> tuple[tuple[dict[str, Escalations], ...], tuple[dict[str, Escalations], ...]]:
    expression = DIMENSIONS[by][2]
    keys = [str(r[0]) for r in db.writer_query(f"SELECT DISTINCT {expression} FROM calls").rows]
    client = LocalClient(db)
    prev = 2 * since - until
    args = (client, expression, prev, since, until, keys, RANKS)
    return escalations(*args, source="task_calls"), escalations(*args, source="calls")


def test_escalations_from_task_calls_equal_the_raw_query(db: ClickHouse) -> None:
    events = generated_calls(900, seed=7)
    first, second, third = events[:300], events[300:600], events[600:]
    # The spool re-sends 20 events of the first batch at new offsets, and one event of the
    # second batch is repeated within it.
    replayed = first[:20] + second + second[:1]
    worker = run_worker(
        db,
        [
            [message(e, n % 2, n // 2) for n, e in enumerate(first)],
            [message(e, n % 2, 1_000 + n) for n, e in enumerate(replayed)],
            [message(e, n % 2, 5_000 + n) for n, e in enumerate(third)],
        ],
    )
    assert worker.stats.duplicates_skipped == 21
    with_task = [e for e in events if e.task_id is not None]
    assert db.writer_query("SELECT count(), uniqExact(event_id) FROM task_calls").rows == [
        [len(with_task), len(with_task)]
    ]
    # A retried insert (same token) counts once in task_calls too, as in the rollups.
    extra = generated_calls(30, seed=8)
    rows = [call_to_row(e, SourcePosition("x.calls", 0, 9_000 + i), 0) for i, e in enumerate(extra)]
    stream = calls_stream(Settings(topic_prefix="x.", control_key=SecretStr("k" * 32)))
    SinkTables(db).insert(stream, rows, "x.calls:0:9000-9029")
    SinkTables(db).insert(stream, rows, "x.calls:0:9000-9029")
    expected_rows = len(with_task) + sum(e.task_id is not None for e in extra)
    assert db.writer_query("SELECT count() FROM task_calls").rows == [[expected_rows]]

    found = Escalations()
    for by in DIMENSIONS:
        for since, until in WINDOWS:
            from_task_calls, from_calls = both_sources(db, by, since, until)
            assert from_task_calls == from_calls, (by, since, until)
            for per_key in from_calls:
                for e in per_key.values():
                    found = Escalations(
                        found.escalated + e.escalated,
                        found.failed + e.failed,
                        found.failed_cost_nano_usd + e.failed_cost_nano_usd,
                        found.needless + e.needless,
                        found.needless_cost_nano_usd + e.needless_cost_nano_usd,
                    )
    # The comparison covered escalations of every kind, not empty results.
    assert found.failed > 10 and found.needless > 10 and found.escalated > found.failed


def test_task_calls_keep_the_order_ties_of_the_raw_query(db: ClickHouse) -> None:
    # One task, all calls with the same attempt and millisecond: only the event id orders them,
    # and ClickHouse orders UUIDs by their second half first. Both sources must agree.
    ids = [uuid.UUID(f"{hi:08x}-0000-0000-0000-{lo:012x}") for hi, lo in [(1, 3), (3, 1), (2, 2)]]
    events = [
        CallEvent(
            event_id=event_id,
            event_time_ms=T0 + 5,
            agent_id="a",
            task_id="t",
            provider="x",
            requested_model=model,
            used_model=model,
            input_tokens=1,
            output_tokens=1,
            cost_nano_usd=10 + i,
            latency_ms=1,
            status=status,
        )
        for i, (event_id, model, status) in enumerate(
            zip(ids, ["small", "big", "mid"], [CallStatus.ERROR] * 3, strict=True)
        )
    ]
    rows = [call_to_row(e, SourcePosition("x.calls", 0, i), 0) for i, e in enumerate(events)]
    stream = calls_stream(Settings(topic_prefix="x.", control_key=SecretStr("k" * 32)))
    SinkTables(db).insert(stream, rows, "x.calls:0:0-2")
    from_task_calls, from_calls = both_sources(db, "agent", T0, T0 + DAY)
    assert from_task_calls == from_calls
    # By the UUID order (3,1) < (2,2) < (1,3): big, mid, small: no step up at all.
    assert from_calls[0] == {"a": Escalations()}


def test_task_calls_are_backfilled_from_calls_stored_before_them(tmp_path: Path) -> None:
    database = ClickHouse.open(f"chdb://{tmp_path / 'ch'}")
    try:
        apply_migrations(database, MIGRATIONS[:6])
        events = generated_calls(200, seed=9)
        rows = [call_to_row(e, SourcePosition("x.calls", 0, i), 0) for i, e in enumerate(events)]
        stream = calls_stream(Settings(topic_prefix="x.", control_key=SecretStr("k" * 32)))
        SinkTables(database).insert(stream, rows, "x.calls:0:0-199")
        assert apply_migrations(database) == [7, 8]
        assert apply_migrations(database) == []
        with_task = sum(e.task_id is not None for e in events)
        assert database.writer_query("SELECT count() FROM task_calls").rows == [[with_task]]
        for since, until in WINDOWS:
            from_task_calls, from_calls = both_sources(database, "agent", since, until)
            assert from_task_calls == from_calls
    finally:
        database.close()
