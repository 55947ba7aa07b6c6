"""The sink process: migrations, the consumer loop and the query server, with a clean stop."""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

from agentledger.config import Settings
from agentledger.metrics import metrics_listener, render

from .database import ClickHouse, ClickHouseError
from .flood import DlqFlood, FloodGuard
from .metrics import sink_registry
from .migrations import MIGRATIONS, AnyMigration
from .rebuild import Fence, FenceAbort, MigrationError, MigrationStopped, Migrator
from .server import QueryServer
from .store import SinkTables
from .worker import SinkWorker

__all__ = [
    "BATCH_CATCH_UP_ROWS_ENV",
    "BATCH_MAX_MS_ENV",
    "BATCH_MAX_ROWS_ENV",
    "DLQ_MAX_PERCENT_ENV",
    "DLQ_WINDOW_ENV",
    "MIGRATION_NICE_ENV",
    "MIGRATION_RANGE_ROWS_ENV",
    "MIGRATION_THREADS_ENV",
    "open_with_retry",
    "run_sink",
]

log = logging.getLogger(__name__)

# Tuning knobs of the sink only; read here so Settings (shared) needs no new fields.
BATCH_MAX_ROWS_ENV = "AGENTLEDGER_SINK_BATCH_ROWS"
BATCH_MAX_MS_ENV = "AGENTLEDGER_SINK_BATCH_MS"
BATCH_CATCH_UP_ROWS_ENV = "AGENTLEDGER_SINK_CATCH_UP_ROWS"
DLQ_MAX_PERCENT_ENV = "AGENTLEDGER_SINK_DLQ_MAX_PERCENT"
DLQ_WINDOW_ENV = "AGENTLEDGER_SINK_DLQ_WINDOW"
# A background rebuild (sinks/rebuild.py): calls per backfill range, ClickHouse threads and the
# OS nice level of its queries.
MIGRATION_RANGE_ROWS_ENV = "AGENTLEDGER_SINK_MIGRATION_RANGE_ROWS"
MIGRATION_THREADS_ENV = "AGENTLEDGER_SINK_MIGRATION_THREADS"
MIGRATION_NICE_ENV = "AGENTLEDGER_SINK_MIGRATION_NICE"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise SystemExit(f"{name} must be a positive integer, got {raw!r}")
    return value


def run_sink(
    settings: Settings,
    stop: threading.Event | None = None,
    migrations: tuple[AnyMigration, ...] = MIGRATIONS,
) -> int:
    stop = stop if stop is not None else threading.Event()
    batch_rows = _env_int(BATCH_MAX_ROWS_ENV, 10_000)
    batch_ms = _env_int(BATCH_MAX_MS_ENV, 300)
    # 200k rather than 50k (issue 16): in-process, chDB's CPU per row fell from 12.0-12.6 to
    # 8.0-8.4 us (fewer parts per row, fewer merges), the process's from 21.4-22.5 to 17.1-17.8
    # (bench/sink_worker_bench.py, 400k events, alternating runs). Only while behind: ~0.5 GB
    # at most for a batch of records and its lines.
    catch_up_rows = _env_int(BATCH_CATCH_UP_ROWS_ENV, 200_000)
    try:
        flood = FloodGuard(_env_int(DLQ_MAX_PERCENT_ENV, 50), _env_int(DLQ_WINDOW_ENV, 1_000))
    except ValueError as exc:
        raise SystemExit(f"{DLQ_MAX_PERCENT_ENV} / {DLQ_WINDOW_ENV}: {exc}") from None
    tuning = {
        "range_rows": _env_int(MIGRATION_RANGE_ROWS_ENV, 500_000),
        "threads": _env_int(MIGRATION_THREADS_ENV, 1),
        "nice": min(19, _env_int(MIGRATION_NICE_ENV, 10)),
    }
    if settings.embedded_clickhouse:
        (settings.home / "clickhouse").mkdir(parents=True, exist_ok=True)
    database = open_with_retry(
        settings.clickhouse_dsn, stop, cluster=settings.clickhouse_cluster, migrations=migrations
    )
    if database is None:
        return 0
    migrating: _Background | None = None
    try:
        pending = Migrator(database, migrations, cluster=settings.clickhouse_cluster).pending()
        fence = Fence() if pending else None
        worker = SinkWorker(
            settings,
            SinkTables(database),
            stop=stop,
            batch_max_rows=batch_rows,
            batch_max_ms=batch_ms,
            batch_catch_up_rows=catch_up_rows,
            flood=flood,
            between_batches=fence,
        )
        if fence is not None:
            if not database.embedded:
                # Against a shared server other sinks may be inserting: fence only while this
                # one owns every partition (with chDB no other process can write).
                fence = Fence(ready=worker.owns_every_partition)
                worker.between_batches = fence
            migrating = _Background(settings.clickhouse_dsn, migrations, fence, tuning)
        registry = sink_registry(worker.stats)
        server = QueryServer(
            database,
            settings.sink_port,
            settings.api_token_value(),
            health_extra=worker.stats.as_json,
            metrics=functools.partial(render, registry),
            metrics_open=settings.metrics_open,
        )
        server.start()
        extra = metrics_listener(settings, registry)  # only with AGENTLEDGER_METRICS_PORT
        log.info(
            "sink consuming %s, API on 127.0.0.1:%d", settings.topics.calls, settings.sink_port
        )
        if migrating is not None:
            migrating.start()
        # Every row allocates a few dozen short-lived objects (no reference cycles, so
        # refcounting frees them); with the default threshold the cycle collector ran every
        # few dozen rows and walked the whole heap of clickhouse-connect/chdb/pydantic objects.
        # Freezing the start-up heap and collecting gen0 less often cut ~10% of the CPU per row.
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        try:
            worker.run()
        except DlqFlood as exc:
            log.error("sink stopped: %s", exc)
            return 3
        finally:
            log.info("stopping: closing the consumer, the API and ClickHouse")
            if migrating is not None:
                migrating.stop_and_wait()  # before its session and the database close
                migrating = None
            server.stop()
            if extra is not None:
                extra.close()
            worker.close()
    finally:
        if migrating is not None:
            migrating.stop_and_wait()
        database.close()
    return 0


class _Background:
    """The migrations left after start, on a thread with its own ClickHouse session (a range
    of the backfill runs for seconds and must not hold the worker's database lock)."""

    def __init__(
        self,
        dsn: str,
        migrations: tuple[AnyMigration, ...],
        fence: Fence,
        tuning: dict[str, int],
    ) -> None:
        self.dsn = dsn
        self.migrations = migrations
        self.fence = fence
        self.tuning = tuning
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sink-migrations", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop_and_wait(self) -> None:
        self.stop.set()
        # A range in progress finishes first (seconds); an interrupted one is re-sent anyway.
        self.thread.join(timeout=600)

    def _run(self) -> None:
        session = open_with_retry(self.dsn, self.stop, migrations=())
        if session is None:
            return
        try:
            migrator = Migrator(
                session,
                self.migrations,
                stop=self.stop,
                range_rows=self.tuning["range_rows"],
                threads=self.tuning["threads"],
                nice=self.tuning["nice"],
            )
            applied = migrator.run(self.fence)
            log.info("background migrations done: %s", applied or "none left")
        except MigrationStopped:
            log.info("migrations stopped; they resume where they were at the next start")
        except MigrationError as exc:
            log.error("migration failed (ingest goes on with the current schema): %s", exc)
        except FenceAbort as exc:
            log.error("%s; the next start finishes the swap", exc)
        except Exception:
            log.exception("background migrations failed (ingest goes on)")
        finally:
            session.close()


def _describe(dsn: str) -> str:
    # Never log credentials of a server DSN.
    return dsn if dsn.startswith("chdb:") else dsn.split("@")[-1]


def open_with_retry(
    dsn: str,
    stop: threading.Event,
    *,
    opener: Callable[[str], ClickHouse] = ClickHouse.open,
    initial_s: float = 0.5,
    max_s: float = 15.0,
    cluster: str | None = None,
    migrations: tuple[AnyMigration, ...] = MIGRATIONS,
) -> ClickHouse | None:
    """Open ClickHouse and apply the migrations that need no background (`Migrator.prepare`),
    retrying with backoff while it is unreachable (a server still starting, a chDB path
    another process holds); None if stop is requested first. Nothing is consumed before this
    succeeds, so waiting loses nothing."""
    delay = initial_s
    attempt = 0
    while True:
        attempt += 1
        database: ClickHouse | None = None
        try:
            database = opener(dsn)
            applied = Migrator(database, migrations, cluster=cluster).prepare()
        except ClickHouseError as exc:
            if database is not None:
                database.close()
            log.warning(
                "ClickHouse %s unreachable at start (attempt %d), retrying in %.1fs: %s",
                _describe(dsn),
                attempt,
                delay,
                str(exc)[:300],
            )
            if stop.wait(delay):
                log.info("stop requested while waiting for ClickHouse")
                return None
            delay = min(delay * 2, max_s)
            continue
        log.info(
            "ClickHouse %s ready (migrations applied now: %s)",
            database.description,
            applied or "none",
        )
        return database


def install_signal_handlers(stop: threading.Event) -> None:
    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: finishing the current batch", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
