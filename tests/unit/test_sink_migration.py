"""Background rebuilds (sinks/rebuild.py) against a real chDB with the real sink worker inserting
meanwhile: every rollup equals what `calls` gives, bucket by bucket, after a rebuild that ran
beside ingest, and after one interrupted at each kind of step and resumed.

The history is generated inside ClickHouse (200k calls over 40 days, two month partitions,
through the live views like a sink insert; 60k for the interruptions); the live events go
through `SinkWorker.step` with the in-memory consumer of test_sink_worker and the real
SinkTables.
"""

from __future__ import annotations

import itertools
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agentledger.schemas import CallEvent, CallStatus
from agentledger.sinks.database import ClickHouse
from agentledger.sinks.migrations import (
    LATENCY_BUCKET_SQL,
    MIGRATIONS,
    ROLLUP_FAMILIES,
    ROLLUP_GRAINS,
    Rebuild,
    apply_migrations,
    rebuild_rollups,
)
from agentledger.sinks.rebuild import (
    OPEN_HI,
    OPEN_LO,
    Fence,
    FenceAbort,
    MigrationError,
    Migrator,
    RangePlan,
    plan_ranges,
    progress_lines,
)
from agentledger.sinks.results import QueryResult
from agentledger.sinks.worker import SinkWorker
from tests.unit.test_sink_worker import FakeConsumer, Msg, worker_on_chdb

DAY = 86_400_000
H0 = 1_734_739_200_000  # 2024-12-21T00:00:00Z: the history spans December and January
SPAN = 40 * DAY
VERSION = 9001
REBUILD = rebuild_rollups(VERSION)
WITH_REBUILD = (*MIGRATIONS, REBUILD)

_HISTORY = """
INSERT INTO calls
SELECT 1, generateUUIDv4(number),
    fromUnixTimestamp64Milli(toInt64({start:Int64} + intDiv(number * {span:Int64}, {n:UInt64})),
        'UTC'),
    concat('agent-', toString(number % 37)),
    if(number % 5 = 0, NULL, concat('pool-', toString(number % 3))),
    if(number % 4 = 0, NULL, concat('wf-', toString(number % 301))), NULL, toUInt16(number % 3),
    if(number % 6 = 0, NULL, ['code', 'prose', 'search'][number % 3 + 1]),
    if(number % 2 = 0, NULL, concat('task-', toString(number % 997))),
    'openai', 'gpt-4o', ['gpt-4o', 'gpt-4o-mini', 'o3'][number % 3 + 1],
    100 + number % 1000, 10 + number % 300, 0, 0, toInt64(1000003 * (number % 100000) + 7), true,
    'test', toUInt32(number % 5000), if(number % 11 = 0, 'error', 'ok'), toUInt16(1 + number % 3),
    NULL, 'hist.calls', toUInt32(number % 4), number, now64(3, 'UTC')
FROM numbers({n:UInt64})
"""


def generate_history(db: ClickHouse, n: int) -> None:
    db.command(_HISTORY, {"start": H0, "span": SPAN, "n": n})


_ROLLUP_MEASURES = (
    "sum(calls), sum(failures), sum(retries), sum(input_tokens), sum(output_tokens), "
    "sum(cost_nano_usd), sum(failed_cost_nano_usd), sum(retry_cost_nano_usd), sumMap(latency_hist)"
)
_CALL_MEASURES = (
    "count(), countIf(status != 'ok'), countIf(attempt > 1), sum(input_tokens), "
    "sum(output_tokens), sum(toInt128(cost_nano_usd)), "
    "sumIf(toInt128(cost_nano_usd), status != 'ok'), sumIf(toInt128(cost_nano_usd), attempt > 1), "
    f"sumMap(map({LATENCY_BUCKET_SQL}, toUInt64(1)))"
)
_DIMENSION_SQL = {
    "agent_id": "agent_id",
    "used_model": "used_model",
    "pool": "ifNull(pool, '')",
    "workflow_id": "ifNull(workflow_id, '')",
    "task_type": "ifNull(task_type, '')",
}


Query = Callable[[str], QueryResult]


def _fingerprint(query: Query, grouped: str) -> list[object]:
    """(groups, calls, an order-independent checksum of every group's text) of a GROUP BY."""
    return query(
        "SELECT count(), sum(toUInt64(tupleElement(m, 1))), sum(cityHash64(toString((k, m)))) "
        f"FROM ({grouped})"
    ).rows[0]


def assert_rollups_exact(db: ClickHouse | Query) -> None:
    """Every bucket of every rollup holds what `calls` gives for it, every measure included
    (`db`: a database, or the query function of a client of the sink's)."""
    query = db.readonly_query if isinstance(db, ClickHouse) else db
    for family, dims in ROLLUP_FAMILIES.items():
        for grain, bucket_fn in ROLLUP_GRAINS.items():
            keys = ", ".join(dims)
            rollup = (
                f"SELECT (toDateTime(bucket), {keys}) AS k, ({_ROLLUP_MEASURES}) AS m "
                f"FROM {family}_{grain} GROUP BY bucket, {keys}"
            )
            exprs = ", ".join(f"toString({_DIMENSION_SQL[d]})" for d in dims)
            from_calls = (
                f"SELECT (toDateTime({bucket_fn}(event_time, 'UTC')), {exprs}) AS k, "
                f"({_CALL_MEASURES}) AS m FROM calls GROUP BY k"
            )
            assert _fingerprint(query, rollup) == _fingerprint(query, from_calls), (
                f"{family}_{grain}"
            )


def live_event(n: int) -> bytes:
    # Times inside the history (so inside ranges the backfill reads) and after it.
    minute = (n * 7919) % (SPAN // 60_000)
    time_ms = H0 + SPAN + n * 1000 if n % 5 == 0 else H0 + minute * 60_000 + n % 60 * 1000
    return (
        CallEvent(
            event_id=uuid.uuid4(),
            event_time_ms=time_ms,
            agent_id=f"agent-{n % 37}",
            pool=None if n % 5 == 0 else f"pool-{n % 3}",
            workflow_id=None if n % 4 == 0 else f"wf-{n % 301}",
            task_type=None if n % 6 == 0 else "code",
            task_id=None if n % 2 else f"task-{n % 997}",
            provider="openai",
            requested_model="gpt-4o",
            used_model=("gpt-4o", "gpt-4o-mini", "o3")[n % 3],
            input_tokens=100 + n % 1000,
            output_tokens=10 + n % 300,
            cost_nano_usd=1_000_000_007 * (n % 1000) + 11,
            latency_ms=n % 5000,
            attempt=1 + n % 3,
            status=CallStatus.OK if n % 7 else CallStatus.ERROR,
        )
        .model_dump_json()
        .encode()
    )


@dataclass
class Ingest:
    """Feeds the worker batches of live events (with a spool replay now and then)."""

    worker: SinkWorker
    consumer: FakeConsumer
    sent: list[bytes] = field(default_factory=list)
    offsets: list[int] = field(default_factory=lambda: [0, 0])

    def batch(self, size: int = 400) -> None:
        messages = []
        for _ in range(size):
            n = len(self.sent)
            # Every 40th record re-sends an earlier event at a new offset: it must count once.
            value = self.sent[n // 2] if n % 40 == 39 else live_event(n)
            self.sent.append(value)
            partition = n % 2
            messages.append(Msg("x.calls", partition, self.offsets[partition], value))
            self.offsets[partition] += 1
        self.consumer.queued = messages
        assert self.worker.step()

    @property
    def unique(self) -> int:
        return len(set(self.sent))


def start_worker(db: ClickHouse, fence: Fence | None) -> Ingest:
    worker, consumer, _ = worker_on_chdb(db, batch_max_rows=1000, batch_max_ms=20)
    consumer.assign_partitions("x.calls", [0, 1])
    worker.between_batches = fence
    return Ingest(worker, consumer)


@dataclass
class Background:
    migrator: Migrator
    fence: Fence
    thread: threading.Thread | None = None
    applied: list[int] | None = None
    error: BaseException | None = None

    def start(self) -> None:
        def run() -> None:
            try:
                self.applied = self.migrator.run(self.fence)
            except BaseException as exc:  # the test reads it
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class Crash(Exception):
    """A failpoint: the migrator dies here (its thread ends; the worker goes on)."""


def _history(tmp_path: Path, calls: int) -> Iterator[tuple[str, ClickHouse]]:
    dsn = f"chdb://{tmp_path / 'ch'}"
    database = ClickHouse.open(dsn)
    try:
        apply_migrations(database)
        generate_history(database, calls)
        yield dsn, database
    finally:
        database.close()


@pytest.fixture
def history(tmp_path: Path) -> Iterator[tuple[str, ClickHouse]]:
    yield from _history(tmp_path, 200_000)


@pytest.fixture
def small_history(tmp_path: Path) -> Iterator[tuple[str, ClickHouse]]:
    """60k calls, 8k-call ranges (SMALL_RANGES): as many steps to interrupt, in less time."""
    yield from _history(tmp_path, 60_000)


SMALL_RANGES = 8_000


def _ingest_while(ingest: Ingest, background: Background, minimum: int = 3) -> None:
    batches = 0
    while (background.alive() or batches < minimum) and not ingest.worker.stop.is_set():
        ingest.batch()
        batches += 1
    assert background.thread is not None
    background.thread.join(timeout=60)


def test_a_rebuild_beside_live_ingest_leaves_every_rollup_exact(
    history: tuple[str, ClickHouse],
) -> None:
    dsn, db = history
    fence = Fence()
    ingest = start_worker(db, fence)
    ingest.batch()
    session = ClickHouse.open(dsn)
    try:
        migrator = Migrator(session, WITH_REBUILD, range_rows=20_000)
        marks: list[tuple[str, int]] = []
        lines: list[str] = []

        def mark(_version: int, step: str) -> None:
            marks.append((step, ingest.worker.stats.rows_inserted))
            if step == "range 4" and not lines:
                lines.extend(progress_lines(session.writer_query))

        migrator.failpoint = mark
        background = Background(migrator, fence)
        background.start()
        _ingest_while(ingest, background)
        ingest.batch()
    finally:
        session.close()
    assert background.error is None and background.applied == [VERSION]
    steps = dict(marks)
    # Rows went in between the two fences, i.e. ingest went on while the backfill ran.
    assert steps["swap"] > steps["start views"]
    assert re.fullmatch(
        rf"migration {VERSION} rebuilding calls_by_minute, .*workflows_by_day: \d+% "
        r"\([\d.]+k of 200\.\dk rows, 4 of 1\d ranges\)",
        lines[0],
    ), lines
    assert progress_lines(db.readonly_query) == []
    calls = db.readonly_query("SELECT count(), uniqExact(event_id) FROM calls").rows
    assert calls == [[200_000 + ingest.unique] * 2]
    assert ingest.worker.stats.duplicates_skipped == len(ingest.sent) - ingest.unique > 0
    assert_rollups_exact(db)
    # The live views are the new ones under their final names, and nothing temporary is left.
    names = {r[0] for r in db.readonly_query("SELECT name FROM system.tables").rows}
    assert not [n for n in names if "__m" in n]
    comments = dict(db.readonly_query("SELECT name, comment FROM system.tables").rows)
    assert {t: comments[t] for t in REBUILD.tables} == dict.fromkeys(REBUILD.tables, REBUILD.marker)
    versions = db.readonly_query("SELECT max(version) FROM schema_migrations").rows
    assert versions == [[VERSION]]
    # Inserts after the swap feed the new tables.
    ingest.batch()
    assert_rollups_exact(db)


def _crash_at(point: str, kind: type[BaseException]) -> Callable[[int, str], None]:
    def failpoint(_version: int, step: str) -> None:
        if step == point:
            raise kind(f"failpoint at {step}")

    return failpoint


@pytest.mark.parametrize(
    ("point", "kind"),
    [
        ("start views", Crash),  # inside the first fence: snapshot made, no view yet
        ("range 3", Crash),  # between two ranges
        ("range 5 calls_by_minute_mv", Crash),  # half a range: one root view inserted
        ("exchange workflows_by_minute", FenceAbort),  # half swapped: the sink stops
        ("final views", FenceAbort),  # tables swapped, no views at all for a moment
    ],
)
def test_a_rebuild_interrupted_anywhere_resumes_and_ends_exact(
    small_history: tuple[str, ClickHouse], point: str, kind: type[BaseException]
) -> None:
    dsn, db = small_history
    fence = Fence()
    ingest = start_worker(db, fence)
    session = ClickHouse.open(dsn)
    try:
        migrator = Migrator(session, WITH_REBUILD, range_rows=SMALL_RANGES)
        migrator.failpoint = _crash_at(point, kind)
        background = Background(migrator, fence)
        background.start()
        _ingest_while(ingest, background, minimum=1)
    finally:
        session.close()
    assert isinstance(background.error, kind), background.error
    if kind is FenceAbort:
        # The worker refused to insert into a half-swapped schema (and stopped), as the
        # process does before it exits; the next start finishes the swap before consuming.
        assert ingest.worker.stop.is_set()
        assert Migrator(db, WITH_REBUILD).prepare() == [VERSION]
        assert progress_lines(db.readonly_query) == []
        ingest = start_worker(db, None)
        ingest.offsets = [10_000, 10_000]
        ingest.batch()
        assert_rollups_exact(db)
        return
    # The migrator restarts (as at the next start of the sink) while ingest goes on.
    ingest.batch()
    session = ClickHouse.open(dsn)
    try:
        assert Migrator(session, WITH_REBUILD).prepare() == []  # not with rows to backfill
        background = Background(Migrator(session, WITH_REBUILD, range_rows=SMALL_RANGES), fence)
        background.start()
        _ingest_while(ingest, background)
    finally:
        session.close()
    assert background.error is None and background.applied == [VERSION]
    assert_rollups_exact(db)


def test_a_rebuild_on_an_empty_calls_table_is_applied_at_start(tmp_path: Path) -> None:
    database = ClickHouse.open(f"chdb://{tmp_path / 'ch'}")
    try:
        assert Migrator(database, WITH_REBUILD).prepare() == [m.version for m in WITH_REBUILD]
        assert Migrator(database, WITH_REBUILD).pending() == []
        assert progress_lines(database.readonly_query) == []
        ingest = start_worker(database, None)
        ingest.batch()
        assert_rollups_exact(database)
    finally:
        database.close()


def test_a_rebuild_missing_a_view_of_its_tables_fails_and_changes_nothing(
    small_history: tuple[str, ClickHouse],
) -> None:
    _dsn, db = small_history
    # Only the minute rollup: calls_by_hour_mv reads it and would read the old table after
    # the swap (on a server, where views follow the table, not its name).
    table, view = REBUILD.creates[0], REBUILD.creates[3]
    assert "calls_by_minute\n" in table and view.startswith(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS calls_by_minute_mv TO calls_by_minute "
    )
    minute = Rebuild(VERSION, "minutes only", (table, view))
    fence = Fence()
    ingest = start_worker(db, fence)
    background = Background(Migrator(db, (*MIGRATIONS, minute)), fence)
    background.start()
    _ingest_while(ingest, background, minimum=1)
    assert isinstance(background.error, MigrationError)
    assert "calls_by_hour_mv" in str(background.error)
    names = {r[0] for r in db.readonly_query("SELECT name FROM system.tables").rows}
    assert not [n for n in names if "__m" in n]
    assert_rollups_exact(db)


def test_ranges_cover_every_time_once_and_never_cross_a_month() -> None:
    hour = 3_600_000
    dec31 = 1_735_603_200_000  # 2024-12-31T00:00:00Z
    units = [(dec31 + i * hour, dec31 + (i + 1) * hour, 10) for i in range(30)]
    units.append((dec31 + 100 * hour, dec31 + 101 * hour, 500))  # an hour above the limit
    plan = plan_ranges(units, 100)
    assert plan[0].lo_ms == OPEN_LO and plan[-1].hi_ms == OPEN_HI
    assert all(a.hi_ms == b.lo_ms for a, b in itertools.pairwise(plan))
    assert sum(p.rows for p in plan) == 800
    assert all(p.rows <= 100 for p in plan if p.rows != 500)
    jan1 = dec31 + 24 * hour
    assert jan1 in {p.lo_ms for p in plan}  # a range starts at the month
    assert plan_ranges([], 100) == [RangePlan(0, OPEN_LO, OPEN_HI, 0)]


def test_a_rebuild_must_feed_every_table_from_its_source_or_its_own_tables() -> None:
    table = REBUILD.table_creates[0]
    with pytest.raises(ValueError, match="every table needs a view"):
        Rebuild(1, "no view", (table,))
    stray = "CREATE MATERIALIZED VIEW IF NOT EXISTS v TO calls_by_minute AS\nSELECT * FROM alerts"
    with pytest.raises(ValueError, match=r"must\s+read calls or a table of the rebuild"):
        Rebuild(1, "bad source", (table, stray))
    assert REBUILD.renamed(REBUILD.view_creates[1]).startswith(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS calls_by_hour_mv__m9001 TO calls_by_hour__m9001"
    )
    assert "FROM calls_by_minute__m9001" in REBUILD.renamed(REBUILD.view_creates[1])
