"""P10: a rebuild of the rollups over the 10M-call database while the sink keeps ingesting.

`python -m bench.migration_bench [--db /tmp/migdb] [--calls 10000000] [--window 90]`

The database (bench_review's generated calls, through the live views) is kept at --db and
generated only when absent (~5 min); each phase runs on a fresh copy of it, so the original is
never migrated. Both phases run the real sink process on a private broker, fed without pause by
a producer that keeps ~300k records ahead of it (unique event ids, trace events at the current
time), so the sink always has work and its rate is its capacity at that moment:

- **baseline**: the plain sink (`python -m agentledger.sinks`), rows/s over --window seconds;
- **migration**: the sink with `rebuild_rollups(9001)` appended to its migrations
  (`python -m bench.migration_bench --sink-child`): rows/s from the first fence to the swap,
  the rebuild's wall time and ranges; then the producer stops, the sink drains and stops, and
  the database is checked in-process: `calls` holds every produced event once, and every
  rollup bucket equals what `calls` gives (hour and day grains: every measure; minute grains:
  calls and cost per bucket and key, since the 10M-group GROUP BY with histograms would need
  several GB).

`ratio` = migration rows/s over baseline rows/s (target >= 0.5). On the shared 2-core machine
both swing with the other load: the load averages are recorded with each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from agentledger.config import Settings
from agentledger.review.query import SinkQueryClient
from agentledger.schemas.topic_specs import topic_specs
from agentledger.sinks.database import ClickHouse
from agentledger.sinks.migrations import (
    LATENCY_BUCKET_SQL,
    MIGRATIONS,
    ROLLUP_FAMILIES,
    ROLLUP_GRAINS,
    apply_migrations,
    rebuild_rollups,
)
from agentledger.sinks.rebuild import progress_lines
from agentledger.topic_admin import ensure_topics

from .bench_review import _GENERATE, START
from .pipeline import _payloads, _settings

__all__ = ["main", "measure"]

VERSION = 9001
MAX_AHEAD = 300_000


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def ensure_database(path: Path, calls: int) -> None:
    """Generate `calls` calls at `path` unless a database is there already (slow: minutes)."""
    if (path / "metadata").exists():
        return
    print(f"generating {calls:,} calls into {path} (once; minutes) ...", flush=True)
    started = time.monotonic()
    db = ClickHouse.open(f"chdb://{path}")
    try:
        apply_migrations(db)
        db.command(_GENERATE, {"start": START, "n": calls})
    finally:
        db.close()
    print(f"generated in {time.monotonic() - started:.0f}s", flush=True)


class _Sink:
    def __init__(self, settings: Settings, args: list[str], log_path: Path) -> None:
        self.settings = settings
        self.args = args  # after `python -m`
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_")}
        env.update(
            {
                "AGENTLEDGER_KAFKA": self.settings.kafka,
                "AGENTLEDGER_TOPIC_PREFIX": self.settings.topic_prefix,
                "AGENTLEDGER_HOME": str(self.settings.home),
                "AGENTLEDGER_API_TOKEN": self.settings.api_token_value(),
                "AGENTLEDGER_SINK_PORT": str(self.settings.sink_port),
                "AGENTLEDGER_CONTROL_KEY": self.settings.control_key_bytes().decode(),
                "PYTHONUNBUFFERED": "1",
            }
        )
        # The sink's and the migration's tuning knobs pass through.
        env.update({k: v for k, v in os.environ.items() if k.startswith("AGENTLEDGER_SINK_")})
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent,
            )

    def health(self) -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{self.settings.sink_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body: dict[str, Any] = json.loads(response.read())
                return body
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None

    def done(self) -> int | None:
        health = self.health()
        if health is None:
            return None
        return int(health["rows_inserted"]) + int(health["duplicates_skipped"])

    def cpu_seconds(self) -> float:
        if self.proc is None:
            return 0.0
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=900)  # a backfill range in progress finishes first
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)


class _Producer:
    """Keeps the sink ~MAX_AHEAD records behind: unique ids stamped into a pool of trace
    events (the uuid's bytes replaced, so each record costs a slice and a produce)."""

    def __init__(self, settings: Settings, consumed: list[int]) -> None:
        self.settings = settings
        self.consumed = consumed  # [records the sink has accounted for], set by the sampler
        self.produced = 0
        self.stop = threading.Event()
        pool = _payloads(50_000)
        marker = b'"event_id":"'
        self.pool = [(k, v, v.index(marker) + len(marker)) for k, v in pool]
        self.run_id = uuid.uuid4().int >> 64
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from confluent_kafka import Producer

        producer = Producer(
            {
                "bootstrap.servers": self.settings.kafka,
                "linger.ms": 20,
                "compression.type": "lz4",
                "queue.buffering.max.messages": 1_000_000,
            }
        )
        topic = self.settings.topics.calls
        while not self.stop.is_set():
            if self.produced - self.consumed[0] >= MAX_AHEAD:
                producer.poll(0.05)
                continue
            for _ in range(5_000):
                key, value, at = self.pool[self.produced % len(self.pool)]
                hexed = f"{self.run_id:016x}{self.produced:016x}"
                stamp = f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:]}"
                record = value[:at] + stamp.encode() + value[at + 36 :]
                while True:
                    try:
                        producer.produce(topic, key=key, value=record)
                        break
                    except BufferError:
                        producer.poll(0.05)
                self.produced += 1
            producer.poll(0)
        producer.flush(120)

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(timeout=180)
        return self.produced


def _phase_settings(bootstrap: str, work: Path, name: str, port: int, source: Path) -> Settings:
    home = work / name
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    started = time.monotonic()
    subprocess.run(["cp", "-a", str(source), str(home / "clickhouse")], check=True)
    print(f"{name}: copied the database in {time.monotonic() - started:.0f}s", flush=True)
    settings = _settings(bootstrap, home, f"mb{uuid.uuid4().hex[:6]}.", (port, port))
    ensure_topics(bootstrap, topic_specs(settings.topics))
    return settings


def _wait_assigned(sink: _Sink, timeout_s: float = 1_200) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not sink.alive():
            raise RuntimeError(f"sink exited: {sink.log_path.read_text()[-3000:]}")
        health = sink.health()
        if health is not None and health.get("assigned"):
            return
        time.sleep(0.5)
    raise RuntimeError("sink not assigned its partitions")


def _baseline(bootstrap: str, work: Path, port: int, source: Path, window: float) -> dict[str, Any]:
    settings = _phase_settings(bootstrap, work, "baseline", port, source)
    consumed = [0]
    producer = _Producer(settings, consumed)
    sink = _Sink(settings, ["agentledger.sinks"], work / "baseline.log")
    producer.thread.start()
    sink.start()
    try:
        _wait_assigned(sink)
        time.sleep(10)  # warm-up: the first batches and the catch-up batch size
        load_before = _load()
        first, cpu0, t0 = sink.done() or 0, sink.cpu_seconds(), time.monotonic()
        while time.monotonic() - t0 < window:
            consumed[0] = sink.done() or consumed[0]
            time.sleep(1)
        last, cpu1, t1 = sink.done() or 0, sink.cpu_seconds(), time.monotonic()
        rows = last - first
    finally:
        producer.finish()
        sink.stop()
        shutil.rmtree(settings.home, ignore_errors=True)
    return {
        "rows_per_s": round(rows / (t1 - t0)),
        "rows": rows,
        "seconds": round(t1 - t0, 1),
        "sink_cpu_us_per_row": round((cpu1 - cpu0) * 1e6 / max(1, rows), 1),
        "load_before": load_before,
        "load_after": _load(),
    }


def _migration(bootstrap: str, work: Path, port: int, source: Path) -> dict[str, Any]:
    settings = _phase_settings(bootstrap, work, "migration", port, source)
    consumed = [0]
    producer = _Producer(settings, consumed)
    sink = _Sink(settings, ["bench.migration_bench", "--sink-child"], work / "migration.log")
    client = SinkQueryClient(f"http://127.0.0.1:{settings.sink_port}", settings.api_token_value())
    producer.thread.start()
    sink.start()
    result: dict[str, Any] = {}
    try:
        _wait_assigned(sink)
        fenced: tuple[int, float, float] | None = None
        last_line = ""
        load_before = _load()
        started = time.monotonic()
        while True:
            consumed[0] = sink.done() or consumed[0]
            lines = progress_lines(client.query)
            if lines:
                last_line = lines[0]
            if fenced is None and lines and "rebuilding" in lines[0]:
                fenced = (consumed[0], sink.cpu_seconds(), time.monotonic())
                print(f"migration: {lines[0]}", flush=True)
            version = client.query("SELECT max(version) FROM schema_migrations").rows[0][0]
            if version == VERSION:
                break
            if not sink.alive():
                raise RuntimeError(f"sink exited: {sink.log_path.read_text()[-3000:]}")
            if time.monotonic() - started > 3_600:
                raise RuntimeError(f"migration not done after an hour: {last_line}")
            time.sleep(2)
        swapped = (sink.done() or consumed[0], sink.cpu_seconds(), time.monotonic())
        if fenced is None:
            raise RuntimeError("the migration finished before its progress was seen")
        rows = swapped[0] - fenced[0]
        result = {
            "rows_per_s": round(rows / (swapped[2] - fenced[2])),
            "rows": rows,
            "migration_s": round(swapped[2] - fenced[2], 1),
            "sink_cpu_us_per_row_incl_migration": round(
                (swapped[1] - fenced[1]) * 1e6 / max(1, rows), 1
            ),
            "last_progress": last_line,
            "load_before": load_before,
            "load_after": _load(),
        }
        produced = producer.finish()
        deadline = time.monotonic() + 900
        while (sink.done() or 0) < produced and time.monotonic() < deadline:
            time.sleep(1)
        result["produced"] = produced
    finally:
        producer.finish()
        sink.stop()
    result.update(_check(settings, produced=result.get("produced", -1)))
    shutil.rmtree(settings.home, ignore_errors=True)
    return result


_ALL = (
    "sum(calls), sum(failures), sum(retries), sum(input_tokens), sum(output_tokens), "
    "sum(cost_nano_usd), sum(failed_cost_nano_usd), sum(retry_cost_nano_usd), sumMap(latency_hist)",
    "count(), countIf(status != 'ok'), countIf(attempt > 1), sum(input_tokens), "
    "sum(output_tokens), sum(toInt128(cost_nano_usd)), sumIf(toInt128(cost_nano_usd), "
    "status != 'ok'), sumIf(toInt128(cost_nano_usd), attempt > 1), "
    f"sumMap(map({LATENCY_BUCKET_SQL}, toUInt64(1)))",
)
_LEAN = ("sum(calls), sum(cost_nano_usd)", "count(), sum(toInt128(cost_nano_usd))")
_DIMENSIONS = {
    "agent_id": "agent_id",
    "used_model": "used_model",
    "pool": "ifNull(pool, '')",
    "workflow_id": "ifNull(workflow_id, '')",
    "task_type": "ifNull(task_type, '')",
}


def _check(settings: Settings, produced: int) -> dict[str, Any]:
    """In-process, after the sink stopped: every produced event once, rollups == calls."""
    started = time.monotonic()
    db = ClickHouse.open(settings.clickhouse_dsn)
    try:
        query = db.readonly_query
        calls, unique, live = query(
            "SELECT count(), uniqExact(event_id), countIf(_topic != 'bench.calls') FROM calls"
        ).rows[0]
        mismatched = []
        for family, dims in ROLLUP_FAMILIES.items():
            keys = ", ".join(dims)
            exprs = ", ".join(f"toString({_DIMENSIONS[d]})" for d in dims)
            for grain, fn in ROLLUP_GRAINS.items():
                rollup_m, calls_m = _LEAN if grain == "minute" else _ALL
                sides = (
                    f"SELECT (toDateTime(bucket), {keys}) AS k, ({rollup_m}) AS m "  # noqa: S608 - our names
                    f"FROM {family}_{grain} GROUP BY bucket, {keys}",
                    f"SELECT (toDateTime({fn}(event_time, 'UTC')), {exprs}) AS k, ({calls_m}) AS m "  # noqa: S608 - our names
                    "FROM calls GROUP BY k",
                )
                prints = [
                    query(
                        "SELECT count(), sum(toUInt64(tupleElement(m, 1))), "  # noqa: S608 - our SQL
                        f"sum(cityHash64(toString((k, m)))) FROM ({side})"
                    ).rows[0]
                    for side in sides
                ]
                if prints[0] != prints[1]:
                    mismatched.append(f"{family}_{grain}: {prints[0]} != {prints[1]}")
        versions = query("SELECT max(version) FROM schema_migrations").rows[0][0]
    finally:
        db.close()
    return {
        "calls": calls,
        "live_calls": live,
        "calls_unique": calls == unique,
        "live_calls_equal_produced": live == produced,
        "rollups_exact": not mismatched,
        "mismatched": mismatched,
        "schema_version": versions,
        "check_s": round(time.monotonic() - started, 1),
    }


def measure(bootstrap: str, work: Path, port: int, db: Path, calls: int, window: float) -> Any:
    ensure_database(db, calls)
    print(f"P10 baseline: the plain sink, {window:.0f}s of saturated ingest ...", flush=True)
    baseline = _baseline(bootstrap, work, port, db, window)
    print(f"P10 baseline: {baseline}", flush=True)
    print("P10 migration: the sink rebuilding every rollup while ingesting ...", flush=True)
    migration = _migration(bootstrap, work, port, db)
    print(f"P10 migration: {migration}", flush=True)
    return {
        "ratio": round(migration["rows_per_s"] / max(1, baseline["rows_per_s"]), 2),
        "baseline": baseline,
        "migration": migration,
        "database": str(db),
        "calls": calls,
    }


def _sink_child() -> int:
    import logging

    from agentledger.sinks.service import install_signal_handlers, run_sink

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()
    install_signal_handlers(stop)
    return run_sink(Settings(), stop, (*MIGRATIONS, rebuild_rollups(VERSION)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sink-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", default="/tmp/migdb")  # noqa: S108 - a benchmark's scratch data
    parser.add_argument("--calls", type=int, default=10_000_000)
    parser.add_argument("--window", type=float, default=90.0)
    args = parser.parse_args(argv)
    if args.sink_child:
        return _sink_child()
    from agentledger.deploy import KafkaBroker

    from .run import _free_port

    with tempfile.TemporaryDirectory(prefix="agentledger-migbench-") as tmp:
        broker = KafkaBroker(
            state_dir=Path(tmp) / "kafka", port=_free_port(), controller_port=_free_port()
        )
        broker.start()
        try:
            result = measure(
                broker.bootstrap, Path(tmp), _free_port(), Path(args.db), args.calls, args.window
            )
        finally:
            broker.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
