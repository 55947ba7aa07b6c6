"""Replay dedup, the control/alerts tables and the rollups against a real embedded chDB.

The worker runs with the in-memory Kafka fakes of test_sink_worker but the real SinkTables, so
what is checked is what ClickHouse stores and what the materialized views count.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.schemas import (
    Alert,
    AlertKind,
    CallEvent,
    CallStatus,
    ControlAction,
    ControlCommand,
    sign_command,
)
from agentledger.sinks.call_decode import decode_call_json
from agentledger.sinks.database import ClickHouse
from agentledger.sinks.migrations import (
    LATENCY_BUCKET_SQL,
    LATENCY_P50_SQL,
    ROLLUP_GRAINS,
    apply_migrations,
)
from agentledger.sinks.rows import SourcePosition, call_to_row
from agentledger.sinks.store import SinkTables
from agentledger.sinks.streams import default_streams
from agentledger.sinks.worker import SinkWorker
from tests.unit.test_sink_worker import KEY, Msg, worker_on_chdb

T0 = 1_735_689_600_000  # 2025-01-01T00:00:00Z


def value(db: ClickHouse, sql: str) -> list[list[object]]:
    return db.writer_query(sql).rows


def make_call(n: int, **extra: object) -> CallEvent:
    values: dict[str, object] = {
        "event_id": uuid.UUID(int=n + 1),
        # Two minutes and two hours apart, same day.
        "event_time_ms": T0 + (n % 2) * 3_600_000 + (n % 3) * 60_000,
        "agent_id": f"a{n % 2}",
        "pool": "p" if n % 2 else None,
        "task_type": "t",
        "provider": "p",
        "requested_model": "m",
        "used_model": "m" if n % 4 else "big",
        "input_tokens": 10 + n,
        "output_tokens": n,
        "cost_nano_usd": 1_000_000_007 * (n + 1),
        "latency_ms": 100 + 10 * n,
        "attempt": 1 + n % 3,
        "status": CallStatus.OK if n % 5 else CallStatus.ERROR,
        **extra,
    }
    return CallEvent.model_validate(values)


def rollup_totals(db: ClickHouse, grain: str) -> list[object]:
    return value(
        db,
        f"SELECT sum(calls), sum(failures), sum(retries), sum(input_tokens), "
        f"sum(output_tokens), sum(cost_nano_usd), sum(failed_cost_nano_usd), "
        f"sum(retry_cost_nano_usd) FROM calls_by_{grain}",
    )[0]


def base_totals(db: ClickHouse) -> list[object]:
    return value(
        db,
        "SELECT count(), countIf(status != 'ok'), countIf(attempt > 1), sum(input_tokens), "
        "sum(output_tokens), sum(toInt128(cost_nano_usd)), "
        "sumIf(toInt128(cost_nano_usd), status != 'ok'), "
        "sumIf(toInt128(cost_nano_usd), attempt > 1) FROM calls",
    )[0]


@pytest.mark.parametrize("form", ["json lines", "column lists"])
def test_the_same_batch_twice_with_the_same_token_counts_once_in_every_rollup(
    db: ClickHouse, form: str
) -> None:
    """For the sink's JSON lines (INSERT ... SELECT, views in parallel, hours fed from minutes)
    and for rows built by call_to_row (the JSONCompactColumns insert tests use)."""
    stream = default_streams(Settings(topic_prefix="x.", control_key=SecretStr(KEY)))[0]
    tables = SinkTables(db)
    events = [make_call(n) for n in range(20)]
    sources = [SourcePosition("x.calls", 0, i) for i in range(len(events))]
    rows: list[Any] = (
        [
            decode_call_json(e.model_dump_json().encode(), s, 0).row
            for e, s in zip(events, sources, strict=True)
        ]
        if form == "json lines"
        else [call_to_row(e, s, 0) for e, s in zip(events, sources, strict=True)]
    )
    tables.insert(stream, rows, "x.calls:0:0-19")
    tables.insert(stream, rows, "x.calls:0:0-19")  # a retry of an acknowledged-but-lost insert
    with_task = sum(e.task_id is not None for e in events)
    assert value(db, "SELECT count() FROM task_calls") == [[with_task]]
    expected = [
        len(events),
        sum(e.status != CallStatus.OK for e in events),
        sum(e.attempt > 1 for e in events),
        sum(e.input_tokens for e in events),
        sum(e.output_tokens for e in events),
        sum(e.cost_nano_usd for e in events),
        sum(e.cost_nano_usd for e in events if e.status != CallStatus.OK),
        sum(e.cost_nano_usd for e in events if e.attempt > 1),
    ]
    assert [int(str(v)) for v in base_totals(db)] == expected
    for grain in ROLLUP_GRAINS:
        assert [int(str(v)) for v in rollup_totals(db, grain)] == expected, grain
        by_workflow = value(db, f"SELECT sum(calls), sum(cost_nano_usd) FROM workflows_by_{grain}")
        assert by_workflow == [[expected[0], expected[5]]], grain
    # The buckets are what the grain says: 2 hours x 3 minutes of events.
    assert value(db, "SELECT uniqExact(bucket) FROM calls_by_minute") == [[6]]
    assert value(db, "SELECT uniqExact(bucket) FROM calls_by_hour") == [[2]]
    assert value(db, "SELECT uniqExact(bucket) FROM calls_by_day") == [[1]]
    # Latency histograms merge to what the raw rows give, every call in one bucket, and the
    # p50 read from them lies within half a bucket (~4.5%) of the exact median.
    histogram = f"sumMap(map({LATENCY_BUCKET_SQL}, toUInt64(1)))"
    for grain in ROLLUP_GRAINS:
        assert value(db, f"SELECT sumMap(latency_hist) FROM calls_by_{grain}") == value(
            db, f"SELECT {histogram} FROM calls"
        ), grain
        merged = value(db, f"SELECT sumMap(latency_hist) FROM workflows_by_{grain}")[0][0]
        assert isinstance(merged, dict) and sum(merged.values()) == len(events), grain
    p50 = float(
        str(
            value(db, f"WITH sumMap(latency_hist) AS h SELECT {LATENCY_P50_SQL} FROM calls_by_day")[
                0
            ][0]
        )
    )
    exact = sorted(e.latency_ms for e in events)[(len(events) - 1) // 2]
    assert abs(p50 - exact) <= 0.045 * exact, (p50, exact)
    # A different token is a different batch: counted (so the check above could fail).
    tables.insert(stream, rows[:1], "x.calls:0:100-100")
    assert int(str(rollup_totals(db, "day")[0])) == len(events) + 1


def test_rollups_backfill_calls_stored_before_them(tmp_path: Path) -> None:
    from agentledger.sinks.migrations import MIGRATIONS

    database = ClickHouse.open(f"chdb://{tmp_path / 'ch'}")
    try:
        apply_migrations(database, MIGRATIONS[:3])
        stream = default_streams(Settings(topic_prefix="x.", control_key=SecretStr(KEY)))[0]
        rows = [call_to_row(make_call(n), SourcePosition("x.calls", 0, n), 0) for n in range(7)]
        SinkTables(database).insert(stream, rows, "x.calls:0:0-6")
        assert apply_migrations(database) == [4, 5, 6, 7, 8]
        assert rollup_totals(database, "hour") == base_totals(database)
        workflows = value(database, "SELECT sum(calls), sum(cost_nano_usd) FROM workflows_by_day")
        assert workflows == [base_totals(database)[:1] + base_totals(database)[5:6]]
        assert value(database, "SELECT sum(calls) FROM calls_by_minute") == [[7]]
    finally:
        database.close()


def run_worker(db: ClickHouse, batches: list[list[Msg]]) -> SinkWorker:
    worker, consumer, settings = worker_on_chdb(db, batch_max_rows=1000, batch_max_ms=20)
    for topic in (settings.topics.calls, settings.topics.control, settings.topics.alerts):
        consumer.assign_partitions(topic, [0, 1])
    # Assigning one topic replaces the fake's list; the worker keeps all of them.
    for batch in batches:
        consumer.queued = list(batch)
        assert worker.step()
    return worker


def test_a_spool_replay_at_new_offsets_counts_once_in_calls_and_rollups(db: ClickHouse) -> None:
    events = [make_call(n) for n in range(30)]
    first = [
        Msg("x.calls", n % 2, n // 2, e.model_dump_json().encode()) for n, e in enumerate(events)
    ]
    # The spool re-sends 10 of them later, at new offsets of the other partition, mixed with new
    # events; one of the new events is also repeated within the batch.
    fresh = [make_call(n) for n in range(30, 35)]
    replay = [
        Msg("x.calls", 1 - n % 2, 100 + n, e.model_dump_json().encode())
        for n, e in enumerate(events[:10] + fresh + fresh[:1])
    ]
    worker = run_worker(db, [first, replay])
    stored = events + fresh
    assert worker.stats.duplicates_skipped == 11
    assert value(db, "SELECT count(), uniqExact(event_id) FROM calls") == [[35, 35]]
    expected_cost = sum(e.cost_nano_usd for e in stored)
    assert value(db, "SELECT sum(toInt128(cost_nano_usd)) FROM calls") == [[expected_cost]]
    for grain in ROLLUP_GRAINS:
        assert rollup_totals(db, grain)[0] == 35
        assert rollup_totals(db, grain)[5] == expected_cost


def test_control_commands_and_alerts_land_in_their_tables(db: ClickHouse) -> None:
    command = sign_command(
        ControlCommand(
            scope="agent:a1",
            action=ControlAction.STOP,
            reason="over budget",
            issued_at_ms=T0,
            spend_nano_usd=5,
            limit_nano_usd=4,
            issuer="operator:alice",
        ),
        KEY.encode(),
    )
    unsigned = ControlCommand(
        scope="agent:a2", action=ControlAction.RESUME, reason="x", issued_at_ms=T0 + 1
    )
    alert = Alert(
        kind=AlertKind.SPIKE,
        scope="pool:p",
        message="spend 5x the hourly mean",
        issued_at_ms=T0 + 2,
        details={"ratio": 5},
    )
    as_bytes = [c.model_dump_json().encode() for c in (command, unsigned, alert)]
    run_worker(
        db,
        [
            [
                Msg("x.control", 0, 0, as_bytes[0]),
                Msg("x.control", 0, 1, as_bytes[1]),
                Msg("x.alerts", 0, 0, as_bytes[2]),
            ],
            # Delivered again at new offsets: stored once.
            [Msg("x.control", 1, 0, as_bytes[0]), Msg("x.alerts", 1, 0, as_bytes[2])],
        ],
    )
    assert value(
        db,
        "SELECT scope, action, issuer, verified, spend_nano_usd, limit_nano_usd, "
        "toUnixTimestamp64Milli(issued_at) FROM control_commands ORDER BY scope",
    ) == [
        ["agent:a1", "stop", "operator:alice", True, 5, 4, T0],
        ["agent:a2", "resume", "processor", False, None, None, T0 + 1],
    ]
    assert value(db, "SELECT kind, severity, scope, details FROM alerts") == [
        ["spike", "warning", "pool:p", '{"ratio":5}']
    ]
