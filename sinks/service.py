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
from .migrations import apply_migrations
from .server import QueryServer
from .store import SinkTables
from .worker import SinkWorker

__all__ = [
    "BATCH_CATCH_UP_ROWS_ENV",
    "BATCH_MAX_MS_ENV",
    "BATCH_MAX_ROWS_ENV",
    "DLQ_MAX_PERCENT_ENV",
    "DLQ_WINDOW_ENV",
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


def run_sink(settings: Settings, stop: threading.Event | None = None) -> int:
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
    if settings.embedded_clickhouse:
        (settings.home / "clickhouse").mkdir(parents=True, exist_ok=True)
    database = open_with_retry(settings.clickhouse_dsn, stop, cluster=settings.clickhouse_cluster)
    if database is None:
        return 0
    try:
        worker = SinkWorker(
            settings,
            SinkTables(database),
            stop=stop,
            batch_max_rows=batch_rows,
            batch_max_ms=batch_ms,
            batch_catch_up_rows=catch_up_rows,
            flood=flood,
        )
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
            server.stop()
            if extra is not None:
                extra.close()
            worker.close()
    finally:
        database.close()
    return 0


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
) -> ClickHouse | None:
    """Open ClickHouse and apply the migrations, retrying with backoff while it is unreachable
    (a server still starting, a chDB path another process holds); None if stop is requested
    first. Nothing is consumed before this succeeds, so waiting loses nothing."""
    delay = initial_s
    attempt = 0
    while True:
        attempt += 1
        database: ClickHouse | None = None
        try:
            database = opener(dsn)
            applied = apply_migrations(database, cluster=cluster)
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
