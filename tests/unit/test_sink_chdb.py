"""The sink's ClickHouse side against a real embedded chDB (in this process).

Verified: clickhouse-connect chDB clients can be opened and closed repeatedly in one process, on
different paths, as long as all clients of the previous path are closed first. So each test
opens its own path and closes it in teardown; nothing is shared across tests.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agentledger.config import Settings
from agentledger.review.query import DirectQueryClient, QueryClient, QueryError, QueryResult
from agentledger.review.spend import spend_by_agent_model
from agentledger.schemas import CallEvent, CallStatus
from agentledger.sinks.database import ClickHouse, ClickHouseError
from agentledger.sinks.migrations import MIGRATIONS, Migration, apply_migrations
from agentledger.sinks.rows import CALL_COLUMNS, SourcePosition, call_to_row, dedup_token
from agentledger.sinks.store import SinkTables
from agentledger.sinks.streams import calls_stream

CALLS = calls_stream(Settings(topic_prefix="x."))


def open_db(path: Path) -> ClickHouse:
    return ClickHouse.open(f"chdb://{path}")


def event(
    n: int,
    *,
    agent: str = "a1",
    model: str = "m1",
    cost: int = 1,
    time_ms: int = 1_700_000_000_000,
    status: CallStatus = CallStatus.OK,
    workflow: str | None = None,
) -> CallEvent:
    return CallEvent(
        event_id=uuid.UUID(int=n),
        event_time_ms=time_ms + n,
        agent_id=agent,
        provider="p",
        requested_model=model,
        used_model=model,
        input_tokens=10 * n,
        output_tokens=n,
        cost_nano_usd=cost,
        latency_ms=5,
        status=status,
        workflow_id=workflow,
    )


def rows_for(
    events: list[CallEvent], topic: str = "x.calls", partition: int = 0, first_offset: int = 0
) -> list[list[object]]:
    return [
        call_to_row(e, SourcePosition(topic, partition, first_offset + i), 0)
        for i, e in enumerate(events)
    ]


def count(db: ClickHouse, sql: str = "SELECT count() FROM calls") -> int:
    return int(db.writer_query(sql).rows[0][0])


def test_migrations_are_idempotent_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "ch"
    first = open_db(path)
    try:
        assert apply_migrations(first) == [m.version for m in MIGRATIONS]
        assert apply_migrations(first) == []
        first.insert("calls", rows_for([event(1)]), CALL_COLUMNS)
    finally:
        first.close()
    # Reopen the same path: nothing re-applied, data kept.
    again = open_db(path)
    try:
        assert apply_migrations(again) == []
        recorded = again.writer_query(
            "SELECT version, name FROM schema_migrations FINAL ORDER BY version"
        )
        assert recorded.rows == [[m.version, m.name] for m in MIGRATIONS]
        assert count(again) == 1
        engine = again.writer_query(
            "SELECT engine, partition_key, sorting_key FROM system.tables WHERE name = 'calls'"
        )
        assert engine.rows == [
            ["MergeTree", "toYYYYMM(event_time)", "agent_id, event_time, event_id"]
        ]
        create = str(again.writer_query("SHOW CREATE TABLE calls").rows[0][0])
        assert "non_replicated_deduplication_window = 10000" in create
    finally:
        again.close()


def test_new_migration_is_applied_once_after_the_old_ones(db: ClickHouse) -> None:
    extra = Migration(
        MIGRATIONS[-1].version + 1,
        "test view",
        (
            "CREATE VIEW IF NOT EXISTS calls_per_agent AS "
            "SELECT agent_id, count() AS n FROM calls GROUP BY agent_id",
        ),
    )
    assert apply_migrations(db, (*MIGRATIONS, extra)) == [extra.version]
    assert apply_migrations(db, (*MIGRATIONS, extra)) == []
    assert count(db, "SELECT count() FROM calls_per_agent") == 0


def test_migration_versions_must_increase(db: ClickHouse) -> None:
    with pytest.raises(ValueError, match="unique and increasing"):
        apply_migrations(db, (Migration(2, "b", ()), Migration(1, "a", ())))


def test_same_batch_twice_with_same_token_is_stored_once(db: ClickHouse) -> None:
    table = SinkTables(db)
    rows = rows_for([event(i) for i in range(50)], first_offset=100)
    token = dedup_token("x.calls", 0, 100, 149)
    table.insert(CALLS, rows, token)
    table.insert(CALLS, rows, token)
    assert count(db) == 50
    # A different token is a different batch: the window does not hide it.
    table.insert(
        CALLS, rows_for([event(99)], first_offset=150), dedup_token("x.calls", 0, 150, 150)
    )
    assert count(db) == 51


def test_present_offsets_reports_landed_records_per_partition(db: ClickHouse) -> None:
    table = SinkTables(db)
    table.insert(
        CALLS, rows_for([event(i) for i in range(5)], partition=2, first_offset=10), "t:2:10-14"
    )
    table.insert(CALLS, rows_for([event(9)], partition=1, first_offset=12), "t:1:12-12")
    assert table.present_offsets(CALLS, "x.calls", 2, 12) == {12, 13, 14}
    assert table.present_offsets(CALLS, "x.calls", 1, 0) == {12}
    assert table.present_offsets(CALLS, "other.calls", 2, 0) == set()


def test_readonly_session_refuses_writes_and_leaves_the_writer_usable(db: ClickHouse) -> None:
    SinkTables(db).insert(CALLS, rows_for([event(1)]), "t:0:0-0")
    for sql in (
        "INSERT INTO calls (agent_id) VALUES ('x')",
        "DROP TABLE calls",
        "TRUNCATE TABLE calls",
        "SELECT 1 SETTINGS readonly = 0",
        "CREATE TABLE evil (a UInt8) ENGINE = Memory",
    ):
        with pytest.raises(ClickHouseError) as info:
            db.readonly_query(sql)
        assert info.value.code == 164, sql
    assert count(db) == 1
    # The writer session was not turned read-only by any of that.
    SinkTables(db).insert(CALLS, rows_for([event(2)], first_offset=1), "t:0:1-1")
    assert count(db) == 2


def test_readonly_query_binds_parameters_and_returns_json_values(db: ClickHouse) -> None:
    SinkTables(db).insert(CALLS, rows_for([event(1, cost=45_000_000)]), "t:0:0-0")
    result = db.readonly_query(
        "SELECT event_id, event_time, toDecimal128(sum(cost_nano_usd), 9) / 1000000000 AS usd "
        "FROM calls WHERE agent_id = {a:String} GROUP BY event_id, event_time",
        {"a": "a1"},
    )
    assert result.columns == ["event_id", "event_time", "usd"]
    assert result.types[0] == "UUID"
    assert result.rows == [
        ["00000000-0000-0000-0000-000000000001", "2023-11-14T22:13:20.001000", "0.045000000"]
    ]


class _LocalClient(QueryClient):
    def __init__(self, db: ClickHouse) -> None:
        self.db = db

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        return self.db.readonly_query(sql, parameters)


def test_review_sums_exactly_and_orders_by_cost(db: ClickHouse) -> None:
    big = 1 << 62  # two of these overflow Int64: the review must not wrap
    events = [
        event(1, agent="cheap", cost=3),
        event(2, agent="cheap", cost=4, status=CallStatus.ERROR, workflow="wf-x"),
        event(3, agent="rich", model="m2", cost=big),
        event(4, agent="rich", model="m2", cost=big),
        event(5, agent="late", cost=10**12, time_ms=1_800_000_000_000),
    ]
    SinkTables(db).insert(CALLS, rows_for(events), "t:0:0-4")
    rows = spend_by_agent_model(_LocalClient(db), 1_700_000_000_000, 1_700_000_000_010)
    assert [(r.agent_id, r.used_model, r.calls, r.failures) for r in rows] == [
        ("rich", "m2", 2, 0),
        ("cheap", "m1", 2, 1),
    ]
    assert rows[0].cost_nano_usd == 2 * big
    assert rows[0].cost_usd == Decimal(2 * big) / 10**9
    assert rows[1].cost_nano_usd == 7
    assert rows[1].cost_usd == Decimal("0.000000007")
    assert (rows[1].input_tokens, rows[1].output_tokens) == (30, 3)
    only_wf = spend_by_agent_model(
        _LocalClient(db), 1_700_000_000_000, 1_700_000_000_010, workflow_id="wf-x"
    )
    assert [(r.agent_id, r.calls, r.cost_nano_usd) for r in only_wf] == [("cheap", 1, 4)]
    assert spend_by_agent_model(_LocalClient(db), 0, 1, workflow_id="wf-x") == []
    with pytest.raises(ValueError, match="since_ms <= until_ms"):
        spend_by_agent_model(_LocalClient(db), 10, 5)


def test_direct_query_client_is_read_only(tmp_path: Path) -> None:
    # The server-DSN path of QueryClient; chDB stands in for the server (same client code).
    path = tmp_path / "ch"
    setup = open_db(path)
    try:
        apply_migrations(setup)
        SinkTables(setup).insert(CALLS, rows_for([event(1, cost=5)]), "t:0:0-0")
    finally:
        setup.close()
    direct = DirectQueryClient(f"chdb://{path}")
    try:
        assert direct.query(
            "SELECT sum(cost_nano_usd) FROM calls WHERE agent_id = {a:String}", {"a": "a1"}
        ).rows == [[5]]
        with pytest.raises(QueryError, match="READONLY"):
            direct.query("DROP TABLE calls")
    finally:
        direct.close()
