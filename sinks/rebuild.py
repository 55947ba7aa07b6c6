"""Migrations that never stop ingest: a `Rebuild` runs in the background while the sink writes.

Why this is exact (each call counted once in every new table):
- **The fence.** Some steps run at a *fence*: on the worker's thread between two batches, when
  every chunk of the previous batch is acknowledged and the next one is not started, so no
  insert is in flight (`Fence`, called by `SinkWorker` at each batch boundary). With chDB the
  sink is the only process that can write, and with a server the fence also waits until this
  sink owns every partition of its topics (`SinkWorker.owns_every_partition`), so no other
  sink is inserting.
- **Start (one fence).** Create the new tables under temporary names, snapshot `calls` (a table
  with the same structure, each partition attached from `calls`: hard links, no copy), then
  create the new views. Every insert before the fence is in the snapshot and fed none of the
  new views; every insert after it feeds them and is not in the snapshot. A retry of a chunk
  first sent before the fence cannot straddle it (the fence waits for the whole batch), and a
  batch replayed after a crash skips the offsets that landed (the worker's landed-offsets
  check), so nothing is inserted twice into `calls` either way.
- **Backfill (no fence, its own session).** The snapshot is static: it is split into ranges of
  `time_column` (whole hours, or minutes when an hour holds more than a range's rows, never
  across a month), planned once and stored, and each range is inserted through the root
  views' SELECT with `insert_deduplication_token = "agentledger-migration-<v>:<view>:<range>"`
  as one block (squashed), with dedup in dependent views: a range interrupted after some of
  its parts were written is re-sent with the same token and only the missing parts land (the
  cascaded hour and day tables dedup on their own; verified, sinks/README.md). The range is
  recorded done after its inserts, so a crash re-sends at most the range in progress.
- **Swap (second fence).** Record "swapping" (after which the swap is always finished, at the
  next start if need be, before anything is consumed), EXCHANGE TABLES each old table with
  its new one (readers switch atomically, and both are complete at this moment), replace the
  old and temporary views by the new views under their final names, drop the old tables and
  the snapshot, record the version in `schema_migrations`.

Progress lives in `migration_progress` (a state row per migration, a row per range), which
`agentledger status` reads through the sink's query server (`progress_lines`).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from .database import ClickHouseError
from .migrations import (
    MIGRATIONS,
    AnyMigration,
    MigrationTarget,
    Rebuild,
    applied_versions,
    cluster_statement,
    distributed_statements,
)
from .results import QueryResult

__all__ = [
    "PROGRESS_TABLE",
    "DirectFence",
    "Fence",
    "FenceAbort",
    "MigrationError",
    "MigrationStopped",
    "Migrator",
    "RangePlan",
    "plan_ranges",
    "progress_lines",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

PROGRESS_TABLE = "migration_progress"
_PROGRESS_DDL = """
CREATE TABLE IF NOT EXISTS migration_progress
(
    version UInt32,
    step LowCardinality(String),
    range_index UInt32,
    state LowCardinality(String),
    lo_ms Int64,
    hi_ms Int64,
    rows UInt64,
    tables String,
    error String,
    seq UInt64,
    updated_at DateTime64(3, 'UTC') DEFAULT now64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(seq)
ORDER BY (version, step, range_index)
"""
# step 'state' (range_index 0): waiting -> backfilling -> swapping -> done; rows = the snapshot's
# rows, tables = what is rebuilt, error = the last failure ('' once a step succeeds again).
# step 'range': planned -> done; lo_ms/hi_ms its bounds (OPEN at either end), rows its rows.
WAITING, BACKFILLING, SWAPPING, DONE = "waiting", "backfilling", "swapping", "done"
OPEN_LO, OPEN_HI = -(1 << 63), (1 << 63) - 1

# One block per range insert, however many rows (a range is bounded by range_rows), so the dedup
# token names the whole range: without squashing, INSERT ... SELECT writes one part per output
# block (256 for a two-level GROUP BY, measured) and a retry could split differently.
# `create_table_query` of a view with a target: "CREATE MATERIALIZED VIEW db.name TO db.target".
_VIEW_TARGET = re.compile(r"CREATE MATERIALIZED VIEW (?:\w+\.)?(\w+) TO (?:\w+\.)?(\w+)\b")
_SQUASH = {"min_insert_block_size_rows": 10**12, "min_insert_block_size_bytes": 10**15}


class MigrationError(RuntimeError):
    """A migration cannot proceed as defined (not retried: the sink keeps ingesting with the
    schema it has, and `agentledger status` shows the error)."""


# ClickHouse's codes for SQL that can never succeed as written (BAD_ARGUMENTS, ILLEGAL_TYPE_OF_
# ARGUMENT, UNKNOWN_FUNCTION, UNKNOWN_IDENTIFIER, UNKNOWN_TABLE, SYNTAX_ERROR, ILLEGAL_AGGREGATION,
# NOT_AN_AGGREGATE): a definition error, not an outage, so it is not retried.
_DEFINITION_ERRORS = frozenset({36, 43, 46, 47, 60, 62, 184, 215})


class MigrationStopped(Exception):
    """Stop was requested; the migration resumes where it was at the next start."""


class FenceAbort(Exception):
    """Raised out of a fence when the schema is left half swapped (ClickHouse failed and stop
    was requested): the worker must not insert again in this process. The next start finishes
    the swap before anything is consumed."""


@dataclass
class _Request:
    action: Callable[[], object]
    done: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    result: object = None
    error: BaseException | None = None


class Fence:
    """Runs a migration step on the sink worker's thread between two batches.

    The migrator calls `run(action, stop)` and blocks; the worker calls the fence (`__call__`)
    at each batch boundary, which runs a pending action there and then. `ready` (optional)
    must also hold, e.g. "this sink owns every partition"."""

    def __init__(self, ready: Callable[[], bool] | None = None) -> None:
        self._lock = threading.Lock()
        self._request: _Request | None = None
        self._ready = ready
        self.waiting_since: float | None = None

    def run(self, action: Callable[[], T], stop: threading.Event) -> T:
        request = _Request(action)
        with self._lock:
            self._request = request
            self.waiting_since = time.monotonic()
        try:
            while not request.done.wait(0.2):
                if stop.is_set():
                    with self._lock:
                        if not request.started:
                            self._request = None
                            raise MigrationStopped
        finally:
            self.waiting_since = None
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    def __call__(self) -> bool:
        """At a batch boundary (worker thread): run the pending action, if any. False means
        the worker must stop inserting (FenceAbort)."""
        with self._lock:
            request = self._request
            if request is None or (self._ready is not None and not self._ready()):
                return True
            request.started = True
            self._request = None
        try:
            request.result = request.action()
        except FenceAbort as exc:
            request.error = exc
            return False
        except BaseException as exc:  # noqa: BLE001 - handed to the migrator's thread, which decides
            request.error = exc
        finally:
            request.done.set()
        return True


class DirectFence(Fence):
    """For a migration with nothing ingesting meanwhile (start-up, `apply_migrations`)."""

    def run(self, action: Callable[[], T], stop: threading.Event) -> T:
        return action()


@dataclass(frozen=True)
class RangePlan:
    index: int
    lo_ms: int
    hi_ms: int
    rows: int
    done: bool = False


def _month(ms: int) -> tuple[int, int]:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.year, moment.month


def plan_ranges(units: Sequence[tuple[int, int, int]], range_rows: int) -> list[RangePlan]:
    """Consecutive (start_ms, end_ms, rows) units (hours or minutes, ascending, non-empty)
    merged into ranges of at most `range_rows` rows (a bigger unit is a range of its own),
    never across a month; the first range is open below and the last open above, so every
    row of the snapshot falls in exactly one range whatever its time."""
    ranges: list[list[int]] = []
    for start, end, rows in units:
        if ranges:
            last = ranges[-1]
            if last[2] + rows <= range_rows and _month(start) == _month(last[0]):
                last[1], last[2] = end, last[2] + rows
                continue
        ranges.append([start, end, rows])
    if not ranges:
        return [RangePlan(0, OPEN_LO, OPEN_HI, 0)]
    plans = []
    for index, (start, _end, rows) in enumerate(ranges):
        lo = OPEN_LO if index == 0 else start
        hi = ranges[index + 1][0] if index + 1 < len(ranges) else OPEN_HI
        plans.append(RangePlan(index, lo, hi, rows))
    return plans


def _range_filter(time_column: str, lo: int, hi: int) -> tuple[str, dict[str, object]]:
    conditions: list[str] = []
    parameters: dict[str, object] = {}
    if lo != OPEN_LO:
        conditions.append(f"{time_column} >= fromUnixTimestamp64Milli({{lo:Int64}}, 'UTC')")
        parameters["lo"] = lo
    if hi != OPEN_HI:
        conditions.append(f"{time_column} < fromUnixTimestamp64Milli({{hi:Int64}}, 'UTC')")
        parameters["hi"] = hi
    return (" AND ".join(conditions) or "1"), parameters


class Migrator:
    """Applies `migrations` in order: `prepare` at start (what needs no background), `run`
    in the background with a `Fence` from the worker, `apply_all` blocking (nothing ingests).

    `target` is the migrator's own session: a backfill runs for seconds per range and must not
    hold the worker's database lock. On a cluster a Rebuild runs as blocking DDL."""

    def __init__(
        self,
        target: MigrationTarget,
        migrations: tuple[AnyMigration, ...] = MIGRATIONS,
        *,
        cluster: str | None = None,
        range_rows: int = 500_000,
        threads: int = 1,
        nice: int = 10,
        stop: threading.Event | None = None,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
    ) -> None:
        versions = [m.version for m in migrations]
        if versions != sorted(set(versions)):
            raise ValueError(f"migration versions must be unique and increasing, got {versions}")
        if range_rows < 1 or threads < 1 or not 0 <= nice <= 19:
            raise ValueError(
                f"range_rows and threads must be >= 1 and nice 0..19, got {range_rows}, "
                f"{threads}, {nice}"
            )
        self.target = target
        self.migrations = migrations
        self.cluster = cluster
        self.range_rows = range_rows
        # The backfill's queries: one thread at a lower OS priority (ClickHouse's
        # os_thread_priority = nice), so the sink's inserts keep the CPU they need.
        self.backfill_settings: dict[str, int] = {
            **_SQUASH,
            "deduplicate_blocks_in_dependent_materialized_views": 1,
            "max_threads": threads,
            "os_thread_priority": nice,
        }
        self.stop = stop if stop is not None else threading.Event()
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._seq = 0
        # Test hook: called with (version, step name) before each step of a rebuild; raising
        # from it simulates a crash at that point.
        self.failpoint: Callable[[int, str], None] | None = None

    # -- entry points ---------------------------------------------------------------------

    def apply_all(self) -> list[int]:
        """Every missing migration, now (nothing may ingest meanwhile)."""
        applied = self.prepare()
        return applied + self.run(DirectFence())

    def prepare(self) -> list[int]:
        """At start, before the worker consumes: apply plain migrations, and rebuilds whose
        source is still empty (plain DDL, nothing to backfill), up to the first rebuild that
        needs the background; finish a swap a crash interrupted. Returns the versions
        applied; `pending()` tells what `run` has left."""
        done = applied_versions(self.target, self.cluster)
        applied: list[int] = []
        for migration in self.migrations:
            if migration.version in done:
                continue
            if isinstance(migration, Rebuild) and self.cluster is None:
                self._ensure_progress_table()
                state = self._state(migration.version)[0]
                if state == SWAPPING:
                    log.info("migration %d: finishing its interrupted swap", migration.version)
                    try:
                        self._swap(migration)
                    except MigrationError as exc:
                        # The sink still starts (calls stay exact); status shows the error.
                        log.error("%s", exc)
                        self._note_error(migration, str(exc))
                        break
                elif state in (None, WAITING) and self._count(migration.source) == 0:
                    # Nothing to backfill: the plain DDL takes moments.
                    self._apply_statements(migration)
                    if state is not None:
                        self._set_state(migration, DONE, 0)
                else:
                    break
            else:
                self._apply_statements(migration)
            applied.append(migration.version)
        if self.cluster is not None:
            for statement in distributed_statements(self.cluster, self.migrations):
                self.target.command(statement)
        return applied

    def pending(self) -> list[AnyMigration]:
        done = applied_versions(self.target, self.cluster)
        return [m for m in self.migrations if m.version not in done]

    def run(self, fence: Fence) -> list[int]:
        """The missing migrations in order (background: a plain one runs at a fence, a rebuild
        as the module docstring says). Raises MigrationStopped when stopped."""
        applied: list[int] = []
        for migration in self.pending():
            if isinstance(migration, Rebuild) and self.cluster is None:
                self._rebuild(migration, fence)
            else:
                fence.run(functools.partial(self._apply_statements, migration), self.stop)
            applied.append(migration.version)
            log.info("migration %d applied: %s", migration.version, migration.name)
        return applied

    # -- plain DDL ------------------------------------------------------------------------

    def _apply_statements(self, migration: AnyMigration) -> None:
        for statement in migration.statements:
            self.target.command(cluster_statement(statement, self.cluster))
        self._record_applied(migration)

    def _record_applied(self, migration: AnyMigration) -> None:
        self.target.command(
            "INSERT INTO schema_migrations (version, name) VALUES ({v:UInt32}, {n:String})",
            {"v": migration.version, "n": migration.name},
        )

    # -- rebuild --------------------------------------------------------------------------

    def _rebuild(self, rebuild: Rebuild, fence: Fence) -> None:
        version = rebuild.version
        self._retry(self._ensure_progress_table, "creating migration_progress")
        state, total = self._retry(lambda: self._state(version), "reading migration state")[:2]
        if state is None:
            self._retry(lambda: self._set_state(rebuild, WAITING, 0), "recording the state")
        if state in (None, WAITING):
            log.info(
                "migration %d: waiting for a batch boundary to start rebuilding %s",
                version,
                ", ".join(rebuild.tables),
            )
            total = self._retry(
                lambda: fence.run(lambda: self._start(rebuild), self.stop),
                f"starting migration {version}",
                rebuild,
            )
            state = BACKFILLING
        if state == BACKFILLING:
            plan = self._retry(lambda: self._plan(rebuild), f"planning migration {version}")
            started, done_rows = time.monotonic(), 0
            for item in plan:
                if item.done:
                    done_rows += item.rows
                    continue
                self._step(version, f"range {item.index}")
                self._retry(
                    functools.partial(self._backfill, rebuild, item),
                    f"migration {version} range {item.index}",
                    rebuild,
                )
                done_rows += item.rows
                log.info(
                    "migration %d rebuilding: %d of %d rows (%.0f%%), %.0fs",
                    version,
                    done_rows,
                    total,
                    100 * done_rows / max(1, total),
                    time.monotonic() - started,
                )
                if self.stop.is_set():
                    raise MigrationStopped
        self._step(version, "swap")
        self._retry(
            lambda: fence.run(lambda: self._swap(rebuild), self.stop),
            f"swapping in migration {version}",
            rebuild,
        )

    def _start(self, rebuild: Rebuild) -> int:
        """At the fence: new tables, snapshot, new views, then the state that says so. Returns
        the snapshot's rows."""
        self._step(rebuild.version, "start")
        command = self.target.command
        try:
            for statement in rebuild.leftovers:
                command(statement)
            self._check_dependants(rebuild)
            for name, statement in zip(rebuild.tables, rebuild.table_creates, strict=True):
                command(rebuild.renamed(statement))
                # No query parameters in a COMMENT clause; the marker is our own constant.
                command(f"ALTER TABLE {rebuild.temporary(name)} MODIFY COMMENT '{rebuild.marker}'")
            command(f"CREATE TABLE {rebuild.snapshot} AS {rebuild.source}")
            for partition in self._partitions(rebuild.source):
                command(
                    f"ALTER TABLE {rebuild.snapshot} ATTACH PARTITION ID {{p:String}} "
                    f"FROM {rebuild.source}",
                    {"p": partition},
                )
            self._step(rebuild.version, "start views")
            for statement in rebuild.view_creates:
                command(rebuild.renamed(statement))
        except ClickHouseError:
            # Views left behind would feed tables the next attempt drops: harmless, but
            # they cost every insert until then.
            for view in rebuild.views:
                try:
                    command(f"DROP VIEW IF EXISTS {rebuild.temporary(view.name)}")
                except ClickHouseError:
                    break
            raise
        total = self._count(rebuild.snapshot)
        # The commit point: from here the snapshot and the views are the backfill's basis. If
        # this record is lost, the next attempt drops everything and starts over (still at a
        # fence, so the rows the views fed meanwhile go with their tables).
        self._set_state(rebuild, BACKFILLING, total)
        log.info(
            "migration %d: fence passed; %s fed by their new views, %d rows to backfill",
            rebuild.version,
            ", ".join(rebuild.tables),
            total,
        )
        return total

    def _check_dependants(self, rebuild: Rebuild) -> None:
        """Every view that reads or writes a rebuilt table must be replaced or dropped by the
        rebuild, or it would keep feeding (or reading) an old table after the swap."""
        known = {v.name for v in rebuild.views} | {
            s.split()[-1] for s in rebuild.drops if s.lstrip().upper().startswith("DROP VIEW")
        }
        rebuilt = set(rebuild.tables)
        result = self.target.writer_query(
            "SELECT name, dependencies_table, create_table_query FROM system.tables "
            "WHERE database = currentDatabase()"
        )
        for name, readers, create in result.rows:
            found = [str(r) for r in readers] if name in rebuilt else []
            written = _VIEW_TARGET.match(str(create))
            if written is not None and written.group(2) in rebuilt:
                found.append(str(written.group(1)))
            for view in found:
                if view not in known:
                    raise MigrationError(
                        f"migration {rebuild.version}: view {view} reads or writes a table the "
                        f"migration rebuilds ({name}); add the view to the rebuild or its drops"
                    )

    def _plan(self, rebuild: Rebuild) -> list[RangePlan]:
        version: dict[str, object] = {"v": rebuild.version}
        stored = self.target.writer_query(
            f"SELECT range_index, lo_ms, hi_ms, rows, state = 'done' FROM {PROGRESS_TABLE} "  # noqa: S608 - our table name
            "FINAL WHERE version = {v:UInt32} AND step = 'range' ORDER BY range_index",
            version,
        )
        if stored.rows:
            return [
                RangePlan(int(i), int(lo), int(hi), int(n), bool(d))
                for i, lo, hi, n, d in stored.rows
            ]
        units = self._units(rebuild, 3_600_000, "1", {})
        split: list[tuple[int, int, int]] = []
        for start, end, rows in units:
            if rows <= self.range_rows:
                split.append((start, end, rows))
                continue
            where, parameters = _range_filter(rebuild.time_column, start, end)
            split += self._units(rebuild, 60_000, where, parameters)
        plan = plan_ranges(split, self.range_rows)
        self.target.command(
            f"INSERT INTO {PROGRESS_TABLE} (version, step, range_index, state, lo_ms, hi_ms, "  # noqa: S608 - our table name
            "rows, tables, error, seq) SELECT {v:UInt32}, 'range', toUInt32(i - 1), 'planned', "
            "lo, hi, n, '', '', {seq:UInt64} FROM (SELECT {los:Array(Int64)} AS los, "
            "{his:Array(Int64)} AS his, {ns:Array(UInt64)} AS ns) "
            "ARRAY JOIN los AS lo, his AS hi, ns AS n, arrayEnumerate(los) AS i",
            {
                **version,
                "seq": self._next_seq(),
                "los": [p.lo_ms for p in plan],
                "his": [p.hi_ms for p in plan],
                "ns": [p.rows for p in plan],
            },
        )
        log.info(
            "migration %d: %d rows of %s in %d ranges",
            rebuild.version,
            sum(p.rows for p in plan),
            rebuild.snapshot,
            len(plan),
        )
        return plan

    def _units(
        self, rebuild: Rebuild, unit_ms: int, where: str, parameters: dict[str, object]
    ) -> list[tuple[int, int, int]]:
        # Arithmetic on milliseconds rather than toStartOfHour: the same for DateTime and
        # DateTime64 columns. Times are >= 0 (CallEvent), so intDiv floors.
        result = self.target.writer_query(
            f"SELECT intDiv(toUnixTimestamp64Milli(toDateTime64({rebuild.time_column}, 3, "  # noqa: S608 - our names
            f"'UTC')), {unit_ms}) * {unit_ms} AS u, count() FROM {rebuild.snapshot} "
            f"WHERE {where} GROUP BY u ORDER BY u",
            parameters,
        )
        return [(int(u), int(u) + unit_ms, int(n)) for u, n in result.rows]

    def _backfill(self, rebuild: Rebuild, item: RangePlan) -> None:
        where, parameters = _range_filter(rebuild.time_column, item.lo_ms, item.hi_ms)
        source = f"(SELECT * FROM {rebuild.snapshot} WHERE {where})"  # noqa: S608 - our names
        for view in rebuild.roots:
            token = f"agentledger-migration-{rebuild.version}:{view.name}:{item.index}"
            settings = ", ".join(f"{k} = {v}" for k, v in self.backfill_settings.items())
            self.target.command(
                f"{rebuild.backfill(view, source, rebuild.temporary(view.target))}\n"
                f"SETTINGS insert_deduplication_token = {{token:String}}, {settings}",
                {**parameters, "token": token},
            )
            self._step(rebuild.version, f"range {item.index} {view.name}")
        self.target.command(
            f"INSERT INTO {PROGRESS_TABLE} (version, step, range_index, state, lo_ms, hi_ms, "  # noqa: S608 - our table name
            "rows, tables, error, seq) VALUES ({v:UInt32}, 'range', {i:UInt32}, 'done', "
            "{lo:Int64}, {hi:Int64}, {n:UInt64}, '', '', {seq:UInt64})",
            {
                "v": rebuild.version,
                "i": item.index,
                "lo": item.lo_ms,
                "hi": item.hi_ms,
                "n": item.rows,
                "seq": self._next_seq(),
            },
        )

    def _swap(self, rebuild: Rebuild) -> None:
        """At the fence (or at start). Once "swapping" is recorded every step is repeated until
        it succeeds: the schema must not stay half swapped while the worker inserts."""
        total = self._state(rebuild.version)[1]
        self._set_state(rebuild, SWAPPING, total)
        delay = self.retry_initial_s
        while True:
            try:
                self._swap_steps(rebuild)
                break
            except ClickHouseError as exc:
                log.warning(
                    "migration %d: swap failed, retrying in %.1fs: %s", rebuild.version, delay, exc
                )
                if self.stop.wait(delay):
                    raise FenceAbort(f"migration {rebuild.version}: stopped mid-swap") from exc
                delay = min(delay * 2, self.retry_max_s)
        self._set_state(rebuild, DONE, total)
        log.info("migration %d: swapped in %s", rebuild.version, ", ".join(rebuild.tables))

    def _swap_steps(self, rebuild: Rebuild) -> None:
        command = self.target.command
        comments = dict(
            self.target.writer_query(
                "SELECT name, comment FROM system.tables WHERE database = currentDatabase()"
            ).rows
        )
        for table in rebuild.tables:
            self._step(rebuild.version, f"exchange {table}")
            if comments.get(table) == rebuild.marker:
                continue  # exchanged before an interruption
            if rebuild.temporary(table) not in comments:
                raise MigrationError(
                    f"migration {rebuild.version}: {rebuild.temporary(table)} is missing, "
                    f"cannot swap it in for {table}"
                )
            if table in comments:
                command(f"EXCHANGE TABLES {table} AND {rebuild.temporary(table)}")
            else:
                command(f"RENAME TABLE {rebuild.temporary(table)} TO {table}")
        # Nothing inserts at the fence, so no insert sees the views half replaced.
        for view in rebuild.views:
            command(f"DROP VIEW IF EXISTS {view.name}")
            command(f"DROP VIEW IF EXISTS {rebuild.temporary(view.name)}")
        for statement in rebuild.drops:
            command(statement)
        self._step(rebuild.version, "final views")
        for statement in rebuild.view_creates:
            command(statement)
        for table in rebuild.tables:
            command(f"DROP TABLE IF EXISTS {rebuild.temporary(table)}")  # the old data now
        command(f"DROP TABLE IF EXISTS {rebuild.snapshot}")
        if rebuild.version not in applied_versions(self.target):
            self._record_applied(rebuild)

    # -- bookkeeping ----------------------------------------------------------------------

    def _ensure_progress_table(self) -> None:
        self.target.command(_PROGRESS_DDL)

    def _state(self, version: int) -> tuple[str | None, int, str]:
        result = self.target.writer_query(
            f"SELECT state, rows, error FROM {PROGRESS_TABLE} FINAL "  # noqa: S608 - our table name
            "WHERE version = {v:UInt32} AND step = 'state'",
            {"v": version},
        )
        if not result.rows:
            return None, 0, ""
        state, rows, error = result.rows[0]
        return str(state), int(rows), str(error)

    def _set_state(self, rebuild: Rebuild, state: str, rows: int, error: str = "") -> None:
        self.target.command(
            f"INSERT INTO {PROGRESS_TABLE} (version, step, range_index, state, lo_ms, hi_ms, "  # noqa: S608 - our table name
            "rows, tables, error, seq) VALUES ({v:UInt32}, 'state', 0, {s:String}, 0, 0, "
            "{n:UInt64}, {t:String}, {e:String}, {seq:UInt64})",
            {
                "v": rebuild.version,
                "s": state,
                "n": rows,
                "t": ", ".join(rebuild.tables),
                "e": error[:1000],
                "seq": self._next_seq(),
            },
        )

    def _next_seq(self) -> int:
        # ReplacingMergeTree keeps the highest seq; nanoseconds, strictly increasing here.
        self._seq = max(self._seq + 1, time.time_ns())
        return self._seq

    def _count(self, table: str) -> int:
        result = self.target.writer_query(f"SELECT count() FROM {table}")  # noqa: S608 - our table name
        return int(result.rows[0][0])

    def _partitions(self, table: str) -> list[str]:
        result = self.target.writer_query(
            "SELECT DISTINCT partition_id FROM system.parts WHERE database = currentDatabase() "
            "AND table = {t:String} AND active ORDER BY partition_id",
            {"t": table},
        )
        return [str(row[0]) for row in result.rows]

    def _step(self, version: int, step: str) -> None:
        if self.failpoint is not None:
            self.failpoint(version, step)

    def _retry(self, action: Callable[[], T], what: str, rebuild: Rebuild | None = None) -> T:
        """ClickHouse failures are retried with backoff until stop (the sink keeps ingesting
        meanwhile, or is itself retrying); the state row carries the last error."""
        delay = self.retry_initial_s
        failed = False
        while True:
            try:
                result = action()
            except ClickHouseError as exc:
                if exc.code in _DEFINITION_ERRORS:
                    raise MigrationError(f"{what}: {exc}") from exc
                failed = True
                log.warning("%s failed, retrying in %.1fs: %s", what, delay, str(exc)[:500])
                if rebuild is not None:
                    self._note_error(rebuild, f"{what}: {exc}")
                if self.stop.wait(delay):
                    raise MigrationStopped from exc
                delay = min(delay * 2, self.retry_max_s)
                continue
            if failed and rebuild is not None:
                self._note_error(rebuild, "")
            return result

    def _note_error(self, rebuild: Rebuild, error: str) -> None:
        try:
            state, rows, _ = self._state(rebuild.version)
            if state is not None:
                self._set_state(rebuild, state, rows, error)
        except ClickHouseError:
            pass  # ClickHouse is down: the log line says it


def _short(n: int) -> str:
    for size, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:.1f}".rstrip("0").rstrip(".") + suffix
    return str(n)


def progress_lines(query: Callable[[str], QueryResult]) -> list[str]:
    """One line per unfinished migration, e.g. "migration 9 rebuilding calls_by_hour: 41%
    (4.1M of 10M rows)", from `migration_progress` (none if the table does not exist)."""
    exists = query(
        "SELECT count() FROM system.tables WHERE database = currentDatabase() "
        "AND name = 'migration_progress'"
    )
    if not int(str(exists.rows[0][0])):
        return []  # a database no rebuild ever ran on
    result = query(
        "SELECT s.version, s.state, s.rows, s.tables, s.error, r.done_rows, r.done, "
        "r.planned FROM (SELECT version, state, rows, tables, error "
        "FROM migration_progress FINAL WHERE step = 'state' AND state != 'done') AS s "
        "LEFT JOIN (SELECT version, sumIf(rows, state = 'done') AS done_rows, "
        "countIf(state = 'done') AS done, count() AS planned "
        "FROM migration_progress FINAL WHERE step = 'range' GROUP BY version) AS r "
        "USING (version) ORDER BY s.version"
    )
    lines = []
    for version, state, rows, tables, error, done_rows, done, planned in result.rows:
        total, finished = int(str(rows)), int(str(done_rows or 0))
        if state == WAITING:
            line = f"migration {version} waiting for a batch boundary to rebuild {tables}"
        elif state == SWAPPING:
            line = f"migration {version} swapping in {tables}"
        else:
            percent = 100 * finished // total if total else 100
            line = (
                f"migration {version} rebuilding {tables}: {percent}% "
                f"({_short(finished)} of {_short(total)} rows, {done or 0} of {planned or 0} "
                "ranges)"
            )
        if error:
            line += f"; last error: {str(error)[:200]}"
        lines.append(line)
    return lines
