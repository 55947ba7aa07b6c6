"""P1: processor throughput with policies of every kind active, next to a raw Kafka consume of
the same bytes in the same run.

The processor runs as `agentledger up` runs it: its worker processes (`python -m
agentledger.stream_processors`, one per core unless `--workers N`) started by the stack, alone
(no sink competing for the 2 cores), on a topic prefix of its own, after every worker has
loaded its policies and the group is stable.
`count` trace events are then produced as fast as librdkafka takes them, and the figure is
events / (last offset committed - first event produced). Committed offsets are read from the
broker, so nothing is timed inside the process.

Next to wall-clock events/s it reports the workers' own CPU time per event (utime + stime
from /proc, summed over the workers, startup excluded): on a shared 2-core machine, wall-clock
throughput moves with whatever else runs, CPU time per event much less.

Run alone: `python -m bench.processor_bench [--events N] [--workers N]` (starts its own
private broker), or call `measure(...)` from bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from agentledger.budgets import apply_policies
from agentledger.config import Settings
from agentledger.schemas.policy import PolicyFile
from agentledger.schemas.topic_specs import topic_specs
from agentledger.topic_admin import ensure_topics

from .pipeline import _end_offsets, _payloads, _produce, _settings, raw_consume_seconds

__all__ = ["BENCH_POLICIES", "cpu_seconds", "main", "measure", "wait_processed"]

# One of each kind the processor evaluates per event or per batch: thresholds with every
# action, a spike rule, the retry-loop detector, and pool/workflow/task-type budgets (the
# second hop). Limits are high enough that the run is not stopped half-way.
BENCH_POLICIES: dict[str, Any] = {
    "budgets": [
        {
            "scope": "agent:*",
            "period": "day",
            "limit_usd": 1000,
            "thresholds": [
                {"at_percent": 50, "action": "alert"},
                {"at_percent": 80, "action": "refuse_new_work"},
                {"at_percent": 100, "action": "stop"},
            ],
            "retry_loop": {"max_failures": 5, "window_s": 600, "action": "refuse_new_work"},
        },
        {
            "scope": "agent:*",
            "period": "week",
            "limit_usd": 5000,
            "thresholds": [{"at_percent": 100, "action": "throttle:2"}],
            "spike": {"window": "day", "at_percent": 20},
        },
        {
            "scope": "pool:*",
            "period": "month",
            "limit_usd": 50000,
            "thresholds": [{"at_percent": 100, "action": "route:gpt-4o-mini"}],
        },
        {"scope": "workflow:*", "period": "day", "limit_usd": 20000},
        {"scope": "task_type:*", "period": "week", "limit_usd": 50000},
    ]
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _committed(settings: Settings, group: str, topic: str, ends: dict[int, int]) -> dict[int, int]:
    """The group's committed offset per partition of ``topic`` (0 when none yet)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": settings.kafka, "group.id": group, "enable.auto.commit": False}
    )
    try:
        try:
            offsets = consumer.committed([TopicPartition(topic, p) for p in ends], timeout=10)
        except KafkaException:
            return {}  # the group coordinator is still loading
        return {tp.partition: max(tp.offset, 0) for tp in offsets}
    finally:
        consumer.close()


def _caught_up(committed: dict[int, int], ends: dict[int, int]) -> bool:
    """Every record below ``ends`` committed."""
    return all(committed.get(p, 0) >= end for p, end in ends.items() if end > 0)


def _after_last_records(bootstrap: str, topic: str, ends: dict[int, int]) -> dict[int, int]:
    """Per partition, the offset after its last committed record: what a group that read it
    all has committed. Not the end offset: transaction markers follow the last record, one
    per transaction that wrote there, and two workers' transactions may end interleaved."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-tail-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
        }
    )
    found = {p: 0 for p in ends}
    try:
        # Markers are few per partition here (one per cycle that wrote there): 1,000 back
        # reaches a record unless a partition holds none.
        consumer.assign(
            [TopicPartition(topic, p, max(end - 1000, 0)) for p, end in ends.items() if end > 0]
        )
        left = {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + 60
        while left and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=1000, timeout=0.5):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        left.discard(message.partition())
                    continue
                partition, offset = message.partition(), message.offset()
                if partition is not None and offset is not None:
                    found[partition] = offset + 1
    finally:
        consumer.close()
    return found


def wait_processed(
    settings: Settings, started: float, timeout_s: float = 900.0
) -> tuple[float | None, float | None]:
    """Seconds from ``started`` until the data plane committed every calls record, and until
    its second hop committed every delta those wrote (None: not within the timeout). Call it
    once the load is produced."""
    import threading

    ends = _end_offsets(settings.kafka, settings.topics.calls)
    calls_group = f"{settings.topic_prefix}processor-calls"
    scopes_group = calls_group
    scopes_topic = f"{settings.topic_prefix}processor-scopes"
    calls_s: float | None = None
    scope_ends: dict[int, int] = {}
    # Where the second hop must get to is found by reading the scopes topic's tail, which
    # takes a moment: meanwhile its committed offsets are polled and kept with their times.
    targets: list[dict[int, int]] = []
    history: list[tuple[float, dict[int, int]]] = []
    last_report = time.monotonic()
    while time.monotonic() - started < timeout_s:
        now = time.monotonic()
        if calls_s is None:
            committed = _committed(settings, calls_group, settings.topics.calls, ends)
            if _caught_up(committed, ends):
                calls_s = now - started
                # Every delta of those calls is committed by now: in the same transactions.
                scope_ends = _end_offsets(settings.kafka, scopes_topic)
                threading.Thread(
                    target=lambda ends=scope_ends: targets.append(
                        _after_last_records(settings.kafka, scopes_topic, ends)
                    ),
                    daemon=True,
                ).start()
        if calls_s is not None:
            history.append((now, _committed(settings, scopes_group, scopes_topic, scope_ends)))
            if targets:
                for at, hop in history:
                    if _caught_up(hop, targets[0]):
                        return calls_s, at - started
        if now - last_report >= 10:
            where = "second hop" if calls_s is not None else "calls"
            print(f"   processor: waiting for the {where} to commit", flush=True)
            last_report = now
        time.sleep(0.1)
    return calls_s, None


def _healthy(port: int) -> bool:
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            body: dict[str, Any] = json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return False
    plane = body.get("data_plane") or {}
    return bool(body.get("policies_loaded")) and bool(plane.get("partitions"))


def measure(
    bootstrap: str,
    home: Path,
    ports: tuple[int, int],
    count: int = 100_000,
    workers: int | None = None,
) -> dict[str, Any]:
    """``count`` events through ``workers`` processor processes (None: what `agentledger up`
    runs on this machine, one per core), started as the stack starts them."""
    from agentledger.deploy.stack import Stack, default_processors, worker_ports

    from .scaling import _wait_stable

    settings = _settings(bootstrap, home, f"pb{uuid.uuid4().hex[:6]}.", ports)
    if workers is None:
        workers = default_processors(settings.calls_partitions)
    settings = settings.model_copy(update={"processors": workers})
    ensure_topics(bootstrap, topic_specs(settings.topics))
    apply_policies(settings, PolicyFile.model_validate(BENCH_POLICIES))
    payloads = _payloads(count)
    stack = Stack(settings, progress=lambda _m: None, manage_kafka=False)
    names = [s.name for s in stack.services if s.module == "agentledger.stream_processors"]
    web_ports = worker_ports(settings.processor_port, workers)
    try:
        for name in names:
            stack.start_service(name, timeout_s=180)
        deadline = time.monotonic() + 180
        while not all(_healthy(port) for port in web_ports):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processors did not load their policies: see {stack.log_dir}")
            time.sleep(0.2)
        _wait_stable(bootstrap, f"{settings.topic_prefix}processor-calls", workers)
        time.sleep(2)  # let the group settle its assignment before the clock starts
        pids = [pid for name in names if (pid := stack.pid_of(name)) is not None]
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        started = time.monotonic()
        produce_s = _produce(bootstrap, settings.topics.calls, payloads)
        calls_s, done_s = wait_processed(settings, started)
        cpu_s = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    finally:
        for name in names:
            stack.stop_service(name)
    # The data planes' own account of where their cycles' time went (a line every 10 s).
    timings = [
        line.split("] ", 3)[-1].strip()
        for log_path in sorted(stack.log_dir.glob("processor*.log"))
        for line in log_path.read_text(errors="replace").splitlines()
        if "data plane, last" in line
    ]
    raw_s = raw_consume_seconds(bootstrap, settings.topics.calls, count)
    result: dict[str, Any] = {
        "events": count,
        "workers": workers,
        "policies": len(BENCH_POLICIES["budgets"]),
        "produce_s": round(produce_s, 2),
        "raw_consume_events_per_s": round(count / raw_s),
        "processor_cpu_s": round(cpu_s, 2),
        "processor_cpu_us_per_event": round(1e6 * cpu_s / count, 1),
        "data_plane_timings": timings[-3:],
    }
    if calls_s is not None:
        result["calls_committed_s"] = round(calls_s, 2)
        result["calls_events_per_s"] = round(count / calls_s)
    if done_s is not None:
        result["processor_s"] = round(done_s, 2)
        result["processor_events_per_s"] = round(count / done_s)
        result["processor_vs_raw"] = round((count / done_s) / (count / raw_s), 4)
    return result


def main(argv: list[str] | None = None) -> int:
    from agentledger.deploy import KafkaBroker

    from .run import _free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument(
        "--workers", type=int, default=None, help="processor processes (default: one per core)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="agentledger-pbench-") as tmp:
        broker = KafkaBroker(
            state_dir=Path(tmp) / "kafka", port=_free_port(), controller_port=_free_port()
        )
        broker.start(timeout_s=120)
        try:
            result = measure(
                broker.bootstrap,
                Path(tmp) / "home",
                (_free_port(), _free_port()),
                args.events,
                args.workers,
            )
        finally:
            broker.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
