"""Versioned schema of the sink's tables, applied at start, recorded in `schema_migrations`.

Every statement is idempotent (IF NOT EXISTS), so a migration interrupted between its DDL and its
record is simply re-run. Never edit a released migration: append a new version.

A `Migration` is DDL that takes moments and runs before the worker consumes. A `Rebuild` replaces
derived tables (rollups) with new definitions computed from `calls`; it runs in the background
while the sink keeps ingesting (sinks/rebuild.py), so an upgrade never stops history for the
minutes a rebuild of millions of calls takes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from .results import QueryResult

__all__ = [
    "LATENCY_BUCKET_SQL",
    "LATENCY_P50_SQL",
    "MIGRATIONS",
    "ROLLUP_FAMILIES",
    "ROLLUP_GRAINS",
    "ROLLUP_QUANTILES",
    "Migration",
    "MigrationTarget",
    "Rebuild",
    "RebuildView",
    "applied_versions",
    "apply_migrations",
    "cluster_statement",
    "distributed_statements",
    "migration_ddl",
    "rebuild_rollups",
]


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


_CREATED_TABLE = re.compile(r"^\s*CREATE TABLE IF NOT EXISTS (\w+)")
_CREATED_VIEW = re.compile(
    r"^\s*CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+) TO (\w+) AS\s+(SELECT\b.*)$", re.DOTALL
)
_FROM_TABLE = re.compile(r"\bFROM\s+(\w+)\b")


@dataclass(frozen=True)
class RebuildView:
    """One materialized view of a Rebuild: `name` feeds `target` with `select`, which reads
    `source` (the rebuild's source table, or another table of the rebuild: a cascade)."""

    name: str
    target: str
    source: str
    select: str


@dataclass(frozen=True)
class Rebuild:
    """Derived tables rebuilt from `source` with new definitions, without stopping ingest.

    `creates`: the CREATE TABLE IF NOT EXISTS and CREATE MATERIALIZED VIEW IF NOT EXISTS ... TO
    statements of the new tables and views under their final names; every view reads `source`
    (a root view: its SELECT has one `FROM <source>`) or a table created here (a cascade), and
    every table is some view's target. `drops`: DROP statements for old tables or views that go
    and have no successor. Old tables and views with the names of new ones are replaced.

    sinks/rebuild.py runs it in the background: the new tables are built under temporary names
    (`<name>__m<version>`), fed by their own views from a fence on (a moment between two sink
    batches, so no insert is half in and half out), backfilled from a snapshot of `source`
    taken at that fence, then swapped in with EXCHANGE TABLES at a second fence. `statements`
    is the same change as plain DDL (drop, create, backfill from `source` in one go), used on a
    cluster and when `source` is still empty at start.
    """

    version: int
    name: str
    creates: tuple[str, ...]
    drops: tuple[str, ...] = ()
    source: str = "calls"
    # The source column whose ranges the backfill walks (hours, or minutes when an hour holds
    # more than a range's rows), aligned to months, the tables' partitions.
    time_column: str = "event_time"

    def __post_init__(self) -> None:
        tables = self.tables
        for view in self.views:
            if view.target not in tables:
                raise ValueError(
                    f"rebuild {self.version}: view {view.name} writes {view.target}, "
                    "which the rebuild does not create"
                )
            if view.source != self.source and view.source not in tables:
                raise ValueError(
                    f"rebuild {self.version}: view {view.name} reads {view.source}; it must "
                    f"read {self.source} or a table of the rebuild"
                )
            if view.source == self.source and len(_FROM_TABLE.findall(view.select)) != 1:
                raise ValueError(
                    f"rebuild {self.version}: root view {view.name} must read exactly one "
                    f"FROM {self.source} (the backfill swaps it for the snapshot's ranges)"
                )
        fed = {view.target for view in self.views}
        if not self.roots or set(tables) - fed:
            raise ValueError(
                f"rebuild {self.version}: every table needs a view feeding it, and at least "
                f"one view must read {self.source}; unfed: {sorted(set(tables) - fed)}"
            )

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(m.group(1) for s in self.creates if (m := _CREATED_TABLE.match(s)))

    @property
    def views(self) -> tuple[RebuildView, ...]:
        views = []
        for statement in self.creates:
            if (m := _CREATED_VIEW.match(statement)) is None:
                continue
            read = _FROM_TABLE.search(m.group(3))
            if read is None:
                raise ValueError(f"rebuild {self.version}: view {m.group(1)} reads no table")
            views.append(RebuildView(m.group(1), m.group(2), read.group(1), m.group(3)))
        return tuple(views)

    @property
    def roots(self) -> tuple[RebuildView, ...]:
        """The views that read `source`: the backfill inserts through them."""
        return tuple(view for view in self.views if view.source == self.source)

    def temporary(self, name: str) -> str:
        """The name a new table or view has while it is built beside the live one."""
        return f"{name}__m{self.version}"

    @property
    def snapshot(self) -> str:
        return f"{self.source}__m{self.version}_snapshot"

    @property
    def marker(self) -> str:
        """The comment of the new tables: after EXCHANGE TABLES it names which one is live, so
        an interrupted swap knows which pairs it already exchanged."""
        return f"agentledger migration {self.version}"

    def renamed(self, statement: str) -> str:
        """`statement` with every table and view of the rebuild under its temporary name."""
        names = sorted({*self.tables, *(v.name for v in self.views)}, key=len, reverse=True)
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
        return pattern.sub(lambda m: self.temporary(m.group(1)), statement)

    def backfill(self, view: RebuildView, source_sql: str, target: str | None = None) -> str:
        """`INSERT INTO <target, default view.target> <view.select>` reading `source_sql` (a
        table or a parenthesised subquery) as `source`: the alias keeps `calls.<column>`
        references working."""
        select = _FROM_TABLE.sub(f"FROM {source_sql} AS {self.source}", view.select, count=1)
        return f"INSERT INTO {target or view.target}\n{select}"

    @property
    def table_creates(self) -> tuple[str, ...]:
        return tuple(s for s in self.creates if _CREATED_TABLE.match(s))

    @property
    def view_creates(self) -> tuple[str, ...]:
        return tuple(s for s in self.creates if _CREATED_VIEW.match(s))

    @property
    def leftovers(self) -> tuple[str, ...]:
        """Drops of what an interrupted background run may have left (temporary names only)."""
        return (
            *(f"DROP VIEW IF EXISTS {self.temporary(v.name)}" for v in self.views),
            *(f"DROP TABLE IF EXISTS {self.temporary(t)}" for t in self.tables),
            f"DROP TABLE IF EXISTS {self.snapshot}",
        )

    @property
    def statements(self) -> tuple[str, ...]:
        """The rebuild as blocking DDL, like migration 6: leftovers of an interrupted background
        run, then the old views and tables, go; the new ones are created and backfilled from
        `source` in one insert per root view. A re-run drops and rebuilds again."""
        old = (
            *(f"DROP VIEW IF EXISTS {v.name}" for v in self.views),
            *(f"DROP TABLE IF EXISTS {t}" for t in self.tables),
            *self.drops,
        )
        fill = tuple(self.backfill(v, self.source) for v in self.roots)
        return self.leftovers + old + self.creates + fill


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

# The worker skips a record whose event_id is already stored (a spool replay re-sends an event
# at a new offset). The lookup filters on event_time (partition pruning) and event_id, which is
# not a key prefix; a bloom filter index lets it skip granules without that id.
_CALLS_EVENT_ID_INDEX = (
    "ALTER TABLE calls ADD INDEX IF NOT EXISTS idx_event_id event_id "
    "TYPE bloom_filter(0.001) GRANULARITY 1"
)

# Every command seen on the control topic, verified or not: an audit of who told agents what.
_CONTROL_COMMANDS_V3 = """
CREATE TABLE IF NOT EXISTS control_commands
(
    schema_version UInt8,
    command_id UUID,
    issued_at DateTime64(3, 'UTC'),
    scope String,
    action LowCardinality(String),
    params String,
    reason String,
    limit_nano_usd Nullable(Int64),
    spend_nano_usd Nullable(Int64),
    period_start Nullable(DateTime64(3, 'UTC')),
    until Nullable(DateTime64(3, 'UTC')),
    issuer LowCardinality(String),
    signature Nullable(String),
    verified Bool,
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    ingested_at DateTime64(3, 'UTC'),
    INDEX idx_source_offset _offset TYPE minmax GRANULARITY 1,
    INDEX idx_command_id command_id TYPE bloom_filter(0.001) GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(issued_at)
ORDER BY (scope, issued_at, command_id)
SETTINGS non_replicated_deduplication_window = 10000
"""

_ALERTS_V3 = """
CREATE TABLE IF NOT EXISTS alerts
(
    schema_version UInt8,
    alert_id UUID,
    issued_at DateTime64(3, 'UTC'),
    kind LowCardinality(String),
    severity LowCardinality(String),
    scope String,
    message String,
    period_start Nullable(DateTime64(3, 'UTC')),
    spend_nano_usd Nullable(Int64),
    limit_nano_usd Nullable(Int64),
    action Nullable(String),
    details String,
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    ingested_at DateTime64(3, 'UTC'),
    INDEX idx_source_offset _offset TYPE minmax GRANULARITY 1,
    INDEX idx_alert_id alert_id TYPE bloom_filter(0.001) GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(issued_at)
ORDER BY (scope, issued_at, alert_id)
SETTINGS non_replicated_deduplication_window = 10000
"""

# Rollups per minute, hour and day, fed by materialized views on `calls`; nullable dimensions
# become '' because key columns cannot be Nullable. Sums are Int128/UInt64
# SimpleAggregateFunction, so merges never wrap; latency is a quantiles state.
# non_replicated_deduplication_window on the targets: without it a retried insert (same token)
# is dropped by `calls` but still counted by the views (NOTES.md).
ROLLUP_GRAINS: dict[str, str] = {
    "minute": "toStartOfMinute",
    "hour": "toStartOfHour",
    "day": "toStartOfDay",
}
ROLLUP_QUANTILES = (0.5, 0.9, 0.99)
_Q = ", ".join(str(q) for q in ROLLUP_QUANTILES)
_DIMENSION_EXPRESSIONS = {
    "agent_id": "agent_id",
    "used_model": "used_model",
    "pool": "ifNull(pool, '')",
    "workflow_id": "ifNull(workflow_id, '')",
    "task_type": "ifNull(task_type, '')",
}
# v4 kept every dimension in one key. Workflows are many (often one per task run), so that key
# made the rollups nearly as large as `calls` (measured: 206 ms for the spenders query over 1M
# generated calls). v5 splits them: `calls_by_<grain>` by agent, model, pool and task type, and
# `workflows_by_<grain>` by workflow and model.
_FAMILIES_V4: dict[str, tuple[str, ...]] = {
    "calls_by": ("agent_id", "used_model", "pool", "workflow_id", "task_type")
}
ROLLUP_FAMILIES: dict[str, tuple[str, ...]] = {
    "calls_by": ("agent_id", "used_model", "pool", "task_type"),
    "workflows_by": ("workflow_id", "used_model"),
}


def _rollup_table(family: str, dims: tuple[str, ...], grain: str) -> str:
    columns = "".join(
        f"    {d} {'LowCardinality(String)' if d == 'used_model' else 'String'},\n" for d in dims
    )
    return f"""
CREATE TABLE IF NOT EXISTS {family}_{grain}
(
    bucket DateTime('UTC'),
{columns}    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_ms AggregateFunction(quantiles({_Q}), UInt32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, {", ".join(dims)})
SETTINGS non_replicated_deduplication_window = 10000
"""


def _rollup_select(dims: tuple[str, ...], bucket_fn: str, where: str = "") -> str:
    # Only our own constants are interpolated: dimension names, the grain function, a guard.
    selected = "".join(
        f"    {_DIMENSION_EXPRESSIONS[d]}{'' if _DIMENSION_EXPRESSIONS[d] == d else ' AS ' + d},\n"
        for d in dims
    )
    return f"""
SELECT
    {bucket_fn}(event_time, 'UTC') AS bucket,
{selected}    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState({_Q})(latency_ms) AS latency_ms
FROM calls
{where}
GROUP BY bucket, {", ".join(dims)}
"""  # noqa: S608


def _rollup_view(family: str, dims: tuple[str, ...], grain: str, bucket_fn: str) -> str:
    return (
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {family}_{grain}_mv TO {family}_{grain} AS"
        + _rollup_select(dims, bucket_fn)
    )


def _rollup_backfill(family: str, dims: tuple[str, ...], grain: str, bucket_fn: str) -> str:
    # Calls stored before this migration: migrations run before the worker starts, so nothing
    # inserts meanwhile, and the emptiness guard makes a re-run after an interruption
    # (backfilled, not yet recorded) a no-op.
    where = f"WHERE (SELECT count() FROM {family}_{grain}) = 0"  # noqa: S608 - our names
    return f"INSERT INTO {family}_{grain}" + _rollup_select(dims, bucket_fn, where)


def _rollups(families: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(
        statement
        for family, dims in families.items()
        for grain, fn in ROLLUP_GRAINS.items()
        for statement in (
            _rollup_table(family, dims, grain),
            _rollup_view(family, dims, grain, fn),
            _rollup_backfill(family, dims, grain, fn),
        )
    )


# Rollups are derived data: v5 drops v4's and rebuilds them from `calls` (backfill). A re-run
# after an interruption drops and rebuilds again, which is just as correct.
_DROP_V4_ROLLUPS = tuple(
    statement
    for grain in ROLLUP_GRAINS
    for statement in (
        f"DROP VIEW IF EXISTS calls_by_{grain}_mv",
        f"DROP TABLE IF EXISTS calls_by_{grain}",
    )
)

# v6: latency as a fixed log-bucket histogram instead of a quantiles state. Merging quantile
# states costs in proportion to the calls behind them (each keeps up to 8,192 samples), so the
# review's p50 over 10M calls spent most of its time there; a histogram merges in proportion to
# the buckets used (at most 257: 8 per doubling of latency_ms + 1, so a bucket is ~9% wide), and
# its sumMap is cheaper in the materialized views than quantilesState. The same expressions
# read `calls` directly, so rollups and raw rows give the same p50 (the bucket's geometric
# middle, within ~4.5% of the true median).
LATENCY_BUCKET_SQL = "toUInt16(floor(log2(latency_ms + 1) * 8))"
# Over a merged histogram `h` (sumMap: keys ascending): the first bucket holding half the calls.
LATENCY_P50_SQL = (
    "exp2((mapKeys(h)[arrayFirstIndex(x -> x * 2 >= arraySum(mapValues(h)), "
    "arrayCumSum(mapValues(h)))] + 0.5) / 8) - 1"
)
_LATENCY_V5 = f"quantilesState({_Q})(latency_ms) AS latency_ms"
_LATENCY_V6 = f"sumMap(map({LATENCY_BUCKET_SQL}, toUInt64(1))) AS latency_hist"
_LATENCY_COLUMN_V5 = f"latency_ms AggregateFunction(quantiles({_Q}), UInt32)"
_LATENCY_COLUMN_V6 = "latency_hist SimpleAggregateFunction(sumMap, Map(UInt16, UInt64))"


def _v6(statement: str) -> str:
    # The v6 rollups are v5's with the latency column swapped; derived from the same templates
    # so the two can differ in nothing else.
    return statement.replace(_LATENCY_V5, _LATENCY_V6).replace(
        _LATENCY_COLUMN_V5, _LATENCY_COLUMN_V6
    )


def _drop_rollups(families: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(
        statement
        for family in families
        for grain in ROLLUP_GRAINS
        for statement in (
            f"DROP VIEW IF EXISTS {family}_{grain}_mv",
            f"DROP TABLE IF EXISTS {family}_{grain}",
        )
    )


# v7: the calls of each task, clustered by task, for the review's escalations (escalation.py).
# They are read per (key, task) in (attempt, event time, event id) order, with model price ranks
# and window bounds known only at query time (the ranks are the window's cost per token, and a
# window cut can remove a call from the middle of a task's sequence, since the order is by
# attempt first), so no count can be fixed at insert time; what a rollup can do is keep the few
# columns involved in that order. Read from `calls` (ordered by agent and time), a task's calls
# are scattered over the agent's granules and its array arrives unsorted; here they are
# adjacent and already in order, which measured ~25-35% less CPU for the same query over the
# top 10 agents at 10M calls. Same column names and types as `calls`, so the same SQL reads
# either (the test compares both). Only calls with a task_id (the others have no sequence).
_TASK_CALLS_COLUMNS = (
    "agent_id, pool, workflow_id, task_type, assumeNotNull(task_id) AS task_id, attempt, "
    "event_time, event_id, used_model, status, cost_nano_usd"
)
_TASK_CALLS_V7 = """
CREATE TABLE IF NOT EXISTS task_calls
(
    agent_id String,
    pool LowCardinality(Nullable(String)),
    workflow_id Nullable(String),
    task_type LowCardinality(Nullable(String)),
    task_id String,
    attempt UInt16,
    event_time DateTime64(3, 'UTC'),
    event_id UUID,
    used_model LowCardinality(String),
    status LowCardinality(String),
    cost_nano_usd Int64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (agent_id, task_id, attempt, event_time, event_id)
SETTINGS non_replicated_deduplication_window = 10000
"""
_TASK_CALLS_VIEW_V7 = (
    "CREATE MATERIALIZED VIEW IF NOT EXISTS task_calls_mv TO task_calls AS\n"
    f"SELECT {_TASK_CALLS_COLUMNS}\nFROM calls\nWHERE calls.task_id IS NOT NULL"
)
# `calls.task_id`: the bare name would be the non-null alias. Same guard as the rollups'
# backfill: migrations run before the worker inserts anything.
_TASK_CALLS_BACKFILL_V7 = (
    "INSERT INTO task_calls\n"  # noqa: S608 - our own constants
    f"SELECT {_TASK_CALLS_COLUMNS}\nFROM calls\n"
    "WHERE calls.task_id IS NOT NULL AND (SELECT count() FROM task_calls) = 0"
)


# v8: the hour rollups are fed from the minute rollups' insert blocks, and the day rollups from
# the hours', instead of each from the calls block. A view over `calls` reads and groups every
# row of an insert; a view over `<family>_minute` reads the minute view's output for that
# insert, a few rows per (minute, key). Measured per view on the sink's inserts (sink_bench's
# ceiling, CPU per row of `calls`): see sinks/README.md "Insert path". Sums and sumMap are
# associative, so hour and day buckets hold the same values (the rollup tests compare every
# grain against `calls`). Only the views change: the tables and their rows stay as they are.
_CASCADE_SOURCES = {"hour": "minute", "day": "hour"}


def _cascade_view(family: str, dims: tuple[str, ...], grain: str) -> str:
    source = f"{family}_{_CASCADE_SOURCES[grain]}"
    return (
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {family}_{grain}_mv TO {family}_{grain} AS\n"
        f"SELECT {ROLLUP_GRAINS[grain]}(bucket, 'UTC') AS bucket, {', '.join(dims)}, "
        "sum(calls) AS calls, sum(failures) AS failures, sum(retries) AS retries, "
        "sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
        "sum(cost_nano_usd) AS cost_nano_usd, sum(failed_cost_nano_usd) AS failed_cost_nano_usd, "
        "sum(retry_cost_nano_usd) AS retry_cost_nano_usd, sumMap(latency_hist) AS latency_hist\n"
        f"FROM {source}\nGROUP BY bucket, {', '.join(dims)}"
    )


_CASCADE_V8 = tuple(
    statement
    for family, dims in ROLLUP_FAMILIES.items()
    for grain in _CASCADE_SOURCES
    for statement in (
        f"DROP VIEW IF EXISTS {family}_{grain}_mv",
        _cascade_view(family, dims, grain),
    )
)


def rebuild_rollups(
    version: int, name: str = "rollups rebuilt from calls (same definitions)"
) -> Rebuild:
    """The rollups as migrations 6 and 8 define them, rebuilt from `calls` in the background:
    what a migration changing a rollup looks like (with its new definitions in `creates`), and
    what the migration tests and bench/migration_bench.py run over millions of calls."""
    creates = []
    for family, dims in ROLLUP_FAMILIES.items():
        creates += [_v6(_rollup_table(family, dims, grain)) for grain in ROLLUP_GRAINS]
        creates.append(_v6(_rollup_view(family, dims, "minute", ROLLUP_GRAINS["minute"])))
        creates += [_cascade_view(family, dims, grain) for grain in _CASCADE_SOURCES]
    return Rebuild(version, name, tuple(creates))


AnyMigration = Migration | Rebuild

MIGRATIONS: tuple[AnyMigration, ...] = (
    Migration(1, "calls table", (_CALLS_V1,)),
    Migration(2, "calls: event_id bloom filter index for replay dedup", (_CALLS_EVENT_ID_INDEX,)),
    Migration(3, "control_commands and alerts tables", (_CONTROL_COMMANDS_V3, _ALERTS_V3)),
    Migration(4, "rollups per minute, hour and day", _rollups(_FAMILIES_V4)),
    Migration(
        5,
        "rollups split: calls_by_* (agent, model, pool, task type), workflows_by_* (workflow)",
        _DROP_V4_ROLLUPS + _rollups(ROLLUP_FAMILIES),
    ),
    Migration(
        6,
        "rollups: latency as a log-bucket histogram (latency_hist) instead of quantile states",
        _drop_rollups(ROLLUP_FAMILIES)
        + tuple(_v6(statement) for statement in _rollups(ROLLUP_FAMILIES)),
    ),
    Migration(
        7,
        "task_calls: the calls of each task in order, for the review's escalations",
        (_TASK_CALLS_V7, _TASK_CALLS_VIEW_V7, _TASK_CALLS_BACKFILL_V7),
    ),
    Migration(
        8,
        "rollups: hours fed from the minutes' inserts, days from the hours' (not from calls)",
        _CASCADE_V8,
    ),
)


# -- cluster mode -------------------------------------------------------------------------------
# The migrations above are written for one node. With a cluster name, every statement is
# rewritten: DDL runs ON CLUSTER, *MergeTree engines become Replicated*MergeTree (replica path
# from the table's uuid, so a dropped and re-created table never collides with its old Keeper
# path), and the single-node dedup window becomes the replicated one (same insert tokens). Each
# stored table also gets a `<name>_all` Distributed table for reads across shards; the sink
# writes into the local tables of the node it is connected to.
_CLUSTER_IDENTIFIER = re.compile(r"^[A-Za-z0-9_]+$")
_CREATE = re.compile(r"^(\s*CREATE (?:TABLE|MATERIALIZED VIEW) IF NOT EXISTS \w+)", re.MULTILINE)
_ALTER = re.compile(r"^(\s*ALTER TABLE \w+)")
_DROP = re.compile(r"^(\s*DROP (?:TABLE|VIEW) IF EXISTS \w+)\s*$")
_ENGINE = re.compile(r"^ENGINE = (\w*MergeTree)\s*$", re.MULTILINE)
_DROPPED_TABLE = re.compile(r"^\s*DROP TABLE IF EXISTS (\w+)")
REPLICA_PATH = "'/clickhouse/tables/{uuid}/{shard}', '{replica}'"


def _check_cluster(cluster: str) -> str:
    if not _CLUSTER_IDENTIFIER.match(cluster):
        raise ValueError(f"cluster name must match [A-Za-z0-9_]+, got {cluster!r}")
    return cluster


def cluster_statement(statement: str, cluster: str | None) -> str:
    """``statement`` as run on ``cluster``; unchanged for a single node (cluster None)."""
    if cluster is None:
        return statement
    on = f" ON CLUSTER {_check_cluster(cluster)}"
    out = _CREATE.sub(lambda m: m.group(1) + on, statement, count=1)
    out = _ALTER.sub(lambda m: m.group(1) + on, out, count=1)
    out = _DROP.sub(lambda m: m.group(1) + on + " SYNC", out, count=1)
    out = _ENGINE.sub(lambda m: f"ENGINE = Replicated{m.group(1)}({REPLICA_PATH})", out)
    return out.replace("non_replicated_deduplication_window", "replicated_deduplication_window")


def _stored_tables(migrations: tuple[AnyMigration, ...]) -> list[str]:
    tables: list[str] = []
    for migration in migrations:
        for statement in migration.statements:
            if created := _CREATED_TABLE.match(statement):
                if created.group(1) not in tables:
                    tables.append(created.group(1))
            elif (dropped := _DROPPED_TABLE.match(statement)) and dropped.group(1) in tables:
                tables.remove(dropped.group(1))
    return tables


def distributed_statements(
    cluster: str, migrations: tuple[AnyMigration, ...] = MIGRATIONS
) -> tuple[str, ...]:
    """One `<table>_all` Distributed table per table the migrations leave in place."""
    name = _check_cluster(cluster)
    return tuple(
        f"CREATE TABLE IF NOT EXISTS {table}_all ON CLUSTER {name} AS {table}\n"
        f"ENGINE = Distributed({name}, currentDatabase(), {table})"
        for table in ["schema_migrations", *_stored_tables(migrations)]
    )


def migration_ddl(
    cluster: str | None = None, migrations: tuple[AnyMigration, ...] = MIGRATIONS
) -> list[str]:
    """Every statement a fresh database receives, in order (for review and snapshot tests)."""
    statements = [cluster_statement(_SCHEMA_MIGRATIONS, cluster)]
    statements += [cluster_statement(s, cluster) for m in migrations for s in m.statements]
    if cluster is not None:
        statements += distributed_statements(cluster, migrations)
    return statements


def applied_versions(target: MigrationTarget, cluster: str | None = None) -> set[int]:
    target.command(cluster_statement(_SCHEMA_MIGRATIONS, cluster))
    result = target.writer_query("SELECT DISTINCT version FROM schema_migrations")
    return {int(row[0]) for row in result.rows}


def apply_migrations(
    target: MigrationTarget,
    migrations: tuple[AnyMigration, ...] = MIGRATIONS,
    cluster: str | None = None,
) -> list[int]:
    """Apply the missing versions in order, now, with nothing ingesting meanwhile (a Rebuild
    too, through the steps it takes in the background); return the versions applied by this
    call. With ``cluster``, DDL is rewritten for the cluster (cluster_statement) and the
    Distributed read tables are (re)ensured on every call, since a new migration may add a
    table. The sink itself applies at start only what needs no background (sinks/rebuild.py)."""
    # rebuild.py builds on this module's definitions, hence the import here.
    from .rebuild import Migrator

    return Migrator(target, migrations, cluster=cluster).apply_all()
