"""The ceiling of the sink's P5 figure: chDB's own insert of the same bytes, no Kafka.

The payloads become the lines the sink sends (`decode_call_json`, so the same bytes and the
same INSERT ... SELECT), inserted in batches of the sink's size into a fresh embedded chDB:
- `bare`: into a copy of `calls` without materialized views (the ceiling the issue names);
- `all_views`: into `calls` with every view of the current schema;
- per view: into `calls` with every view but that one; all views minus that = its cost (a
  view fed by another view's inserts, v8's hour and day rollups, goes when its source goes).
Rows/s is wall clock of the inserts alone (one thread); CPU is this process's user + system.
Each figure is the least of `rounds` passes over the payloads (the pass the other load on the
shared machine disturbed least), the passes interleaved so a burst of load hits every variant
alike, each pass into emptied tables (background merges run as in the sink).
"""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.sinks.call_decode import decode_call_json
from agentledger.sinks.database import ClickHouse
from agentledger.sinks.migrations import apply_migrations
from agentledger.sinks.rows import SourcePosition
from agentledger.sinks.store import SinkTables
from agentledger.sinks.streams import SinkStream, calls_stream

__all__ = ["measure_inserts"]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _views(db: ClickHouse) -> dict[str, str]:
    names = db.writer_query(
        "SELECT name FROM system.tables WHERE database = currentDatabase() "
        "AND engine = 'MaterializedView' ORDER BY name"
    ).rows
    return {
        str(name): str(db.writer_query(f"SHOW CREATE TABLE {name}").rows[0][0]) for (name,) in names
    }


def measure_inserts(
    payloads: list[bytes], batch_rows: int, rounds: int = 3, per_view: bool = True
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="agentledger-ceiling-") as tmp:
        db = ClickHouse.open(f"chdb://{Path(tmp) / 'ch'}")
        try:
            return _measure(db, payloads, batch_rows, rounds, per_view)
        finally:
            db.close()


def _measure(
    db: ClickHouse, payloads: list[bytes], batch_rows: int, rounds: int, per_view: bool
) -> dict[str, Any]:
    apply_migrations(db)
    db.command("CREATE TABLE calls_bare AS calls")
    views = _views(db)
    base = calls_stream(Settings(topic_prefix="c.", control_key=SecretStr("k" * 32)))
    tables = SinkTables(db)
    offsets = iter(range(1 << 62))
    now_ms = time.time_ns() // 1_000_000

    def one_pass(stream: SinkStream) -> tuple[float, float]:
        wall = cpu = 0.0
        for start in range(0, len(payloads), batch_rows):
            first = next(offsets)
            lines = [
                decode_call_json(p, SourcePosition("c.calls", 0, first + i), now_ms).row
                for i, p in enumerate(payloads[start : start + batch_rows])
            ]
            for _ in range(len(lines) - 1):
                next(offsets)
            cpu_0, wall_0 = _cpu(), time.perf_counter()
            tables.insert(stream, lines, f"c.calls:0:{first}-{first + len(lines) - 1}")
            wall += time.perf_counter() - wall_0
            cpu += _cpu() - cpu_0
        return wall, cpu

    def only(names: list[str]) -> Callable[[], None]:
        def arrange() -> None:
            present = set(_views(db))
            for name in present - set(names):
                db.command(f"DROP VIEW {name}")
            for name in names:
                if name not in present:
                    db.command(views[name])

        return arrange

    variants: dict[str, tuple[SinkStream, Callable[[], None]]] = {
        "bare": (_on(base, "calls_bare"), only([])),
        "all_views": (base, only(list(views))),
    }
    if per_view:
        for name in views:
            variants[name] = (base, only([v for v in views if v != name]))
    walls: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    tables_to_empty = [
        str(name)
        for (name,) in db.writer_query(
            "SELECT name FROM system.tables WHERE database = currentDatabase() "
            "AND engine LIKE '%MergeTree' AND name != 'schema_migrations'"
        ).rows
    ]
    for _ in range(rounds):
        for name, (stream, arrange) in variants.items():
            arrange()
            # Every pass starts from empty tables: otherwise later passes insert into larger
            # tables with more merges running, and the variants' order decides their figures.
            for table in tables_to_empty:
                db.command(f"TRUNCATE TABLE {table}")
            wall, cpu = one_pass(stream)
            walls[name].append(wall)
            cpus[name].append(cpu)
    only(list(views))()
    rows = len(payloads)

    def per_row(values: list[float]) -> float:
        return round(min(values) * 1e6 / rows, 2)

    result: dict[str, Any] = {
        "ceiling_batch_rows": batch_rows,
        "ceiling_rounds": rounds,
        "bare_insert_rows_per_s": round(rows / min(walls["bare"])),
        "bare_insert_us_per_row": per_row(walls["bare"]),
        "bare_insert_cpu_us_per_row": per_row(cpus["bare"]),
        "all_views_insert_rows_per_s": round(rows / min(walls["all_views"])),
        "all_views_insert_us_per_row": per_row(walls["all_views"]),
        "all_views_insert_cpu_us_per_row": per_row(cpus["all_views"]),
    }
    if per_view:
        # CPU, not wall: the views' cost is work, and wall time swings with the other load.
        every = per_row(cpus["all_views"])
        result["view_cost_cpu_us_per_row"] = {
            name: round(every - per_row(cpus[name]), 2) for name in views
        }
    return result


def _on(stream: SinkStream, table: str) -> SinkStream:
    import dataclasses

    return dataclasses.replace(stream, table=table)
