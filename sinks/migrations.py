"""Versioned schema of the sink's tables, applied at start, recorded in `schema_migrations`.

Every statement is idempotent (IF NOT EXISTS), so a migration interrupted between its DDL and its
record is simply re-run. Never edit a released migration: append a new version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .results import QueryResult

__all__ = ["MIGRATIONS", "Migration", "MigrationTarget", "applied_versions", "apply_migrations"]


class MigrationTarget(Protocol):
    def command(self, sql: str, parameters: dict[str, object] | None = None) -> None: ...

    def writer_query(
        self, sql: str, parameters: dict[str, object] | None = None
    ) -> QueryResult: ...


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version UInt32,
    name String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY version
"""

# One immutable row per call. Source columns (_topic, _partition, _offset) make every row
# traceable to its Kafka record and let a restarted sink see exactly which records of an
# uncommitted batch already landed. The minmax index on _offset keeps that lookup from
# scanning old parts. non_replicated_deduplication_window turns on insert dedup tokens on a
# single node (NOTES.md).
_CALLS_V1 = """
CREATE TABLE IF NOT EXISTS calls
(
    schema_version UInt8,
    event_id UUID,
    event_time DateTime64(3, 'UTC'),
    agent_id String,
    pool LowCardinality(Nullable(String)),
    workflow_id Nullable(String),
    parent_agent_id Nullable(String),
    spawn_depth UInt16,
    task_type LowCardinality(Nullable(String)),
    task_id Nullable(String),
    provider LowCardinality(String),
    requested_model LowCardinality(String),
    used_model LowCardinality(String),
    input_tokens UInt64,
    output_tokens UInt64,
    cached_input_tokens UInt64,
    reasoning_tokens UInt64,
    cost_nano_usd Int64,
    priced Bool,
    pricing_version LowCardinality(Nullable(String)),
    latency_ms UInt32,
    status LowCardinality(String),
    attempt UInt16,
    error_type Nullable(String),
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    ingested_at DateTime64(3, 'UTC'),
    INDEX idx_source_offset _offset TYPE minmax GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (agent_id, event_time, event_id)
SETTINGS non_replicated_deduplication_window = 10000
"""

MIGRATIONS: tuple[Migration, ...] = (Migration(1, "calls table", (_CALLS_V1,)),)


def applied_versions(target: MigrationTarget) -> set[int]:
    target.command(_SCHEMA_MIGRATIONS)
    result = target.writer_query("SELECT DISTINCT version FROM schema_migrations")
    return {int(row[0]) for row in result.rows}


def apply_migrations(
    target: MigrationTarget, migrations: tuple[Migration, ...] = MIGRATIONS
) -> list[int]:
    """Apply the missing versions in order; return the versions applied by this call."""
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise ValueError(f"migration versions must be unique and increasing, got {versions}")
    done = applied_versions(target)
    applied = []
    for migration in migrations:
        if migration.version in done:
            continue
        for statement in migration.statements:
            target.command(statement)
        target.command(
            "INSERT INTO schema_migrations (version, name) VALUES ({v:UInt32}, {n:String})",
            {"v": migration.version, "n": migration.name},
        )
        applied.append(migration.version)
    return applied
