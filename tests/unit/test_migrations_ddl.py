"""The sink's DDL in single-node and cluster mode: snapshots of the exact statements, structural
checks that hold for any migration appended later, and ClickHouse's own parser on every
cluster statement (chDB parses ON CLUSTER and Replicated engines; it cannot run them: there is
no Keeper here)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from agentledger.sinks.database import ClickHouse
from agentledger.sinks.migrations import (
    MIGRATIONS,
    Migration,
    cluster_statement,
    distributed_statements,
    migration_ddl,
)

SNAPSHOTS = Path(__file__).parent / "snapshots"
CLUSTER = "agentledger"


def _render(statements: list[str]) -> str:
    return "".join(s.strip() + "\n;\n\n" for s in statements)


@pytest.mark.parametrize(
    ("cluster", "snapshot"),
    [(None, "migrations_single_node.sql"), (CLUSTER, "migrations_cluster.sql")],
)
def test_generated_ddl_matches_the_snapshot(cluster: str | None, snapshot: str) -> None:
    text = _render(migration_ddl(cluster))
    path = SNAPSHOTS / snapshot
    if os.environ.get("UPDATE_SNAPSHOTS"):
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), (
        f"the DDL changed; if intended, rerun with UPDATE_SNAPSHOTS=1 and review {path}"
    )


def test_single_node_mode_leaves_every_statement_unchanged() -> None:
    for migration in MIGRATIONS:
        for statement in migration.statements:
            assert cluster_statement(statement, None) is statement


def test_cluster_mode_rewrites_every_ddl_statement() -> None:
    statements = migration_ddl(CLUSTER)
    ddl = [s for s in statements if re.match(r"\s*(CREATE|ALTER|DROP)\b", s)]
    assert ddl, "no DDL generated"
    for statement in ddl:
        assert f" ON CLUSTER {CLUSTER}" in statement, statement
    for statement in statements:
        assert "non_replicated_deduplication_window" not in statement
        for engine in re.findall(r"ENGINE = (\w+)", statement):
            assert engine.startswith("Replicated") or engine == "Distributed", statement
        if statement.lstrip().startswith("DROP"):
            assert statement.rstrip().endswith(" SYNC"), statement
    # Every replicated table keeps an insert dedup window, so a retried batch (same token)
    # is still dropped, in the base table and in every view target.
    for statement in statements:
        if "ReplicatedMergeTree" in statement or "ReplicatedAggregatingMergeTree" in statement:
            assert "replicated_deduplication_window = 10000" in statement, statement


def test_every_table_left_in_place_gets_a_distributed_read_table() -> None:
    stored = {"schema_migrations", "calls", "control_commands", "alerts", "task_calls"}
    for family in ("calls_by", "workflows_by"):
        stored |= {f"{family}_{grain}" for grain in ("minute", "hour", "day")}
    names = {
        m.group(1)
        for s in distributed_statements(CLUSTER)
        if (m := re.match(r"CREATE TABLE IF NOT EXISTS (\w+)_all ON CLUSTER", s))
    }
    assert names == stored


def test_a_table_dropped_by_a_later_migration_gets_no_distributed_table() -> None:
    create = "CREATE TABLE IF NOT EXISTS a (x UInt8) ENGINE = MergeTree ORDER BY x"
    migrations = (Migration(1, "a", (create,)), Migration(2, "drop a", ("DROP TABLE IF EXISTS a",)))
    assert distributed_statements(CLUSTER, migrations) == (
        f"CREATE TABLE IF NOT EXISTS schema_migrations_all ON CLUSTER {CLUSTER} AS "
        f"schema_migrations\nENGINE = Distributed({CLUSTER}, currentDatabase(), "
        "schema_migrations)",
    )


@pytest.mark.parametrize("bad", ["", "a b", "x; DROP TABLE calls", "c'"])
def test_a_cluster_name_that_is_not_an_identifier_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="cluster name must match"):
        migration_ddl(bad)


def test_every_cluster_statement_parses_in_clickhouse(db: ClickHouse) -> None:
    for statement in migration_ddl(CLUSTER):
        formatted = db.writer_query("SELECT formatQuery({q:String})", {"q": statement}).rows[0][0]
        assert isinstance(formatted, str)
        if "ENGINE" in statement and "AS SELECT" not in statement:
            assert "ENGINE = Replicated" in formatted or "ENGINE = Distributed" in formatted


# Run in a child process: chDB takes its server config once per process, and this one names a
# cluster. The cluster has one shard whose only replica is this process (chDB opens no
# listener; a local replica is queried in-process), so the Distributed tables can be read here.
# ON CLUSTER is stripped because it needs Keeper, and the base tables stay single-node.
_DISTRIBUTED_SCRIPT = r"""
import json, sys
from pathlib import Path
import chdb
from agentledger.sinks.migrations import (
    LATENCY_BUCKET_SQL, apply_migrations, distributed_statements)

root = Path(sys.argv[1])
(root / "config.xml").write_text(
    "<clickhouse><tcp_port>9000</tcp_port><remote_servers><agentledger><shard><replica>"
    "<host>127.0.0.1</host><port>9000</port></replica></shard></agentledger></remote_servers>"
    "</clickhouse>"
)
conn = chdb.connect(f"{root / 'db'}?config-file={root / 'config.xml'}")
cur = conn.cursor()

class Target:
    def command(self, sql, parameters=None):
        assert not parameters or set(parameters) == {"v", "n"}
        if parameters:
            sql = sql.replace("{v:UInt32}", str(int(parameters["v"]))).replace(
                "{n:String}", "'" + parameters["n"].replace("'", "") + "'")
        cur.execute(sql)

    def writer_query(self, sql, parameters=None):
        cur.execute(sql)
        return type("R", (), {"rows": cur.fetchall()})

target = Target()
apply_migrations(target)
for statement in distributed_statements("agentledger"):
    target.command(statement.replace(" ON CLUSTER agentledger", ""))
cur.execute(
    "INSERT INTO calls (event_id, event_time, agent_id, workflow_id, used_model, cost_nano_usd,"
    " latency_ms, status) SELECT generateUUIDv4(), toDateTime64('2026-01-01 00:00:00', 3, 'UTC')"
    " + number, concat('a', toString(number % 3)), 'wf', 'm', 1000000007 * (number + 1),"
    " 100 + number, 'ok' FROM numbers(50)"
)
out = {}
for table in ("calls", "calls_all"):
    cur.execute(f"SELECT count(), toString(sum(toInt128(cost_nano_usd))) FROM {table}")
    out[table] = list(cur.fetchall()[0])
for table in ("calls_by_day", "calls_by_day_all", "workflows_by_hour_all"):
    cur.execute(f"SELECT toString(sum(cost_nano_usd)), sum(calls) FROM {table}")
    out[table] = list(cur.fetchall()[0])
for table in ("calls_by_day", "calls_by_day_all"):
    cur.execute(f"SELECT toString(sumMap(latency_hist)) FROM {table}")
    out["latency " + table] = cur.fetchall()[0][0]
cur.execute(f"SELECT toString(sumMap(map({LATENCY_BUCKET_SQL}, toUInt64(1)))) FROM calls")
out["latency calls"] = cur.fetchall()[0][0]
print(json.dumps(out))
"""


def test_distributed_read_tables_answer_like_the_local_tables(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _DISTRIBUTED_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    total = str(sum(1_000_000_007 * (n + 1) for n in range(50)))
    assert out["calls"] == out["calls_all"] == [50, total]
    assert out["calls_by_day"] == out["calls_by_day_all"] == out["workflows_by_hour_all"]
    assert out["calls_by_day_all"] == [total, 50]
    assert out["latency calls_by_day_all"] == out["latency calls_by_day"] == out["latency calls"]
    # 100..149 ms: floor(log2(101..150) * 8) spans buckets 53..57; all 50 calls counted.
    assert out["latency calls"] == "{53:7,54:10,55:10,56:12,57:11}"
