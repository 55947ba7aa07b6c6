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
    stored = {"schema_migrations", "calls", "control_commands", "alerts"}
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
