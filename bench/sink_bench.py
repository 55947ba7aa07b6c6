"""P5: sink throughput (rows/s into ClickHouse) and Kafka-to-queryable lag (p50/p99/max).

The sink runs as the real process (`python -m agentledger.sinks`, embedded chDB) on a broker
given by the caller, alone (no processor competing for the CPU), on a topic prefix of its own.

- Throughput: `count` trace events are produced first; then the sink starts, and the figure is
  rows / (all rows inserted - sink ready to consume). The sink's /health counters decide when
  it is done, so nothing is timed from outside the process except the two instants.
- Lag: a fresh sink run (its lag histogram starts empty) while `lag_events` events are
  produced at a steady `lag_rate` per second (default: half the throughput just measured,
  since lag is only meaningful below capacity); the sink records, per row, the time from the
  broker's append (the calls topic is LogAppendTime) to its insert being acknowledged, i.e.
  the row being queryable. p50/p99/max come from its /health (10 ms buckets, upper edges).

- Ceiling (bench/chdb_ceiling.py, after the sink runs): chDB's insert of the same bytes in
  this process, without Kafka: into `calls` without views (`bare_insert_rows_per_s`, the P5
  ceiling; `sink_vs_bare_insert` = sink rows/s over it), with every view, and each view's CPU.

Run alone: `python -m bench.sink_bench [--events N] [--lag-rate R] [--lag-seconds S]`
(starts its own private broker), or call `measure(...)` from bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from agentledger.config import Settings
from agentledger.schemas.topic_specs import topic_specs
from agentledger.topic_admin import ensure_topics

from .chdb_ceiling import measure_inserts
from .pipeline import _payloads, _produce, _settings, raw_consume_seconds

__all__ = ["main", "measure"]


class _Sink:
    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start and wait until the sink has its partitions; returns that instant (wall
        clock, s)."""
        # The sink's own tuning knobs pass through (to measure e.g. a shorter batch time).
        knobs = (
            "AGENTLEDGER_SINK_BATCH_MS",
            "AGENTLEDGER_SINK_BATCH_ROWS",
            "AGENTLEDGER_SINK_CATCH_UP_ROWS",
        )
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_") or k in knobs
        }
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
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agentledger.sinks"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sink exited at start: {self.log_path.read_text()[-2000:]}")
            health = self.health()
            # Ready = partitions assigned: the group join (the broker delays the first
            # rebalance by 3 s) is start-up, not lag or throughput.
            if health is not None and health.get("assigned"):
                return time.time()
            time.sleep(0.05)
        raise RuntimeError("sink not assigned its partitions after 120 s")

    def health(self) -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{self.settings.sink_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body: dict[str, Any] = json.loads(response.read())
                return body
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def wait_rows(self, expected: int, timeout_s: float) -> tuple[float, dict[str, Any]]:
        """Poll until the sink has accounted for `expected` records; returns the wall-clock
        instant of its last commit (s) and the last health. Polled every 0.5 s: each /health
        runs a count() on the sink's database lock, so frequent polls slow the sink itself."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            health = self.health()
            if health is not None:
                last = health
                done = int(health["rows_inserted"]) + int(health["duplicates_skipped"])
                if done >= expected:
                    return int(health["last_commit_ms"]) / 1000, health
            time.sleep(0.5)
        raise RuntimeError(f"sink accounted for {last.get('rows_inserted')} of {expected} rows")

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads: Python, chDB, librdkafka) the sink process
        has used so far. On a shared 2-core machine wall-clock rows/s swing with the other
        load; CPU per row does not, so the figure is reported next to it."""
        if self.proc is None:
            return 0.0
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # utime and stime are fields 14 and 15 of /proc/<pid>/stat (after "pid (comm)").
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _produce_at_rate(
    bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]], rate: int
) -> float:
    """Produce `payloads` at about `rate` per second in 10 ms slices; returns the seconds."""
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 5,
            "acks": "all",
            "enable.idempotence": True,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    started = time.monotonic()
    per_slice = max(1, rate // 100)
    for index in range(0, len(payloads), per_slice):
        due = started + index / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        for key, value in payloads[index : index + per_slice]:
            while True:
                try:
                    producer.produce(topic, key=key, value=value)
                    break
                except BufferError:
                    producer.poll(0.01)
        producer.poll(0)
    producer.flush(60)
    return time.monotonic() - started


def measure(
    bootstrap: str,
    home: Path,
    port: int,
    count: int = 200_000,
    lag_rate: int = 0,
    lag_seconds: float = 10.0,
    ceiling: bool = True,
) -> dict[str, Any]:
    # The machine's 1-minute load around the run: the figures swing with it on a shared machine.
    load_before = os.getloadavg()[0]
    settings = _settings(bootstrap, home, f"bs{uuid.uuid4().hex[:6]}.", (port, port))
    ensure_topics(bootstrap, topic_specs(settings.topics))
    home.mkdir(parents=True, exist_ok=True)
    payloads = _payloads(count)
    produce_s = _produce(bootstrap, settings.topics.calls, payloads)

    sink = _Sink(settings, home / "sink.log")
    try:
        ready = sink.start()
        cpu_ready = sink.cpu_seconds()
        done, health = sink.wait_rows(count, timeout_s=1_800)
        cpu_s = sink.cpu_seconds() - cpu_ready
    finally:
        sink.stop()
    sink_s = done - ready
    raw_s = raw_consume_seconds(bootstrap, settings.topics.calls, count)
    if lag_rate <= 0:
        # Half the measured throughput: lag is meaningful only below capacity.
        lag_rate = max(100, int(count / sink_s / 2))

    lag_events = int(lag_rate * lag_seconds)
    lag_payloads = _payloads(lag_events)
    sink = _Sink(settings, home / "sink.log")
    try:
        sink.start()
        lag_cpu_ready = sink.cpu_seconds()
        paced_s = _produce_at_rate(bootstrap, settings.topics.calls, lag_payloads, lag_rate)
        _, lag_health = sink.wait_rows(lag_events, timeout_s=600)
        lag_cpu_s = sink.cpu_seconds() - lag_cpu_ready
    finally:
        sink.stop()
    # The ceiling in the same run: chDB's insert of the same bytes, batches of the sink's mean
    # batch size (its processes are stopped, so they do not compete).
    limits: dict[str, Any] = {}
    if ceiling:
        mean_batch = max(1, count // max(1, int(health["batches"])))
        limits = measure_inserts([value for _, value in payloads], mean_batch)
        limits["sink_vs_bare_insert"] = round(count / sink_s / limits["bare_insert_rows_per_s"], 2)
    return {
        **limits,
        "events": count,
        "bytes": sum(len(k) + len(v) for k, v in payloads),
        "produce_s": round(produce_s, 2),
        "sink_s": round(sink_s, 2),
        "sink_rows_per_s": round(count / sink_s),
        "sink_cpu_s": round(cpu_s, 2),
        "sink_cpu_us_per_row": round(cpu_s * 1e6 / count, 1),
        "sink_batches": health["batches"],
        "raw_consume_events_per_s": round(count / raw_s),
        "lag_events": lag_events,
        "lag_rate_per_s": lag_rate,
        "lag_produced_per_s": round(lag_events / paced_s),
        "lag_p50_ms": lag_health["lag_p50_ms"],
        "lag_p99_ms": lag_health["lag_p99_ms"],
        "lag_max_ms": lag_health["lag_max_ms"],
        "lag_rows": lag_health["lag_rows"],
        "lag_cpu_us_per_row": round(lag_cpu_s * 1e6 / lag_events, 1),
        "load_avg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main(argv: list[str] | None = None) -> int:
    from agentledger.deploy import KafkaBroker

    from .run import _free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument(
        "--lag-rate", type=int, default=0, help="events/s; 0: half the measured rows/s"
    )
    parser.add_argument("--lag-seconds", type=float, default=10.0)
    parser.add_argument(
        "--no-ceiling", action="store_true", help="skip chDB's bare insert of the same bytes"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="agentledger-sink-bench-") as tmp:
        broker = KafkaBroker(
            state_dir=Path(tmp) / "kafka", port=_free_port(), controller_port=_free_port()
        )
        broker.start()
        try:
            result = measure(
                broker.bootstrap,
                Path(tmp) / "home",
                _free_port(),
                args.events,
                args.lag_rate,
                args.lag_seconds,
                ceiling=not args.no_ceiling,
            )
        finally:
            broker.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
