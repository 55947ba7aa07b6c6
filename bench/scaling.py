"""P7: processor throughput with 1, 2, ... workers in one consumer group (the scaling curve).

For each worker count the same number of trace events goes through fresh topics (12 calls
partitions by default): the workers are started as the real processes (`python -m
agentledger.stream_processors`, each on its own web port) and are healthy before the load is
produced; a run is done when the data plane's group has committed every calls record and every
second-hop delta they wrote; CPU is the workers' utime + stime over the run.
Only processors run (no sink), so the curve shows the processor alone; the broker and the
producer share the same cores, as they would on one machine.

`bench/run.py` calls :func:`figure`; `python bench/scaling.py` runs it alone on a private broker
and writes bench/scaling.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["figure", "measure"]

ROOT = Path(__file__).resolve().parent
COMMAND = "python bench/scaling.py"


def _run(bootstrap: str, home: Path, port: int, workers: int, count: int) -> dict[str, Any]:
    from agentledger.deploy.stack import Stack
    from agentledger.schemas.topic_specs import topic_specs
    from agentledger.topic_admin import ensure_topics
    from bench import pipeline, processor_bench

    settings = pipeline._settings(
        bootstrap, home / f"w{workers}", f"bs{uuid.uuid4().hex[:6]}.", (port, port + 1)
    ).model_copy(update={"processors": workers})
    ensure_topics(bootstrap, topic_specs(settings.topics))
    stack = Stack(settings, progress=lambda _m: None, manage_kafka=False)
    names = [s.name for s in stack.services if s.module == "agentledger.stream_processors"]
    payloads = pipeline._payloads(count)
    try:
        for name in names:
            stack.start_service(name, timeout_s=180)
        _wait_stable(bootstrap, f"{settings.topic_prefix}processor-calls", workers)
        pids = [pid for name in names if (pid := stack.pid_of(name)) is not None]
        cpu_before = sum(processor_bench.cpu_seconds(pid) for pid in pids)
        started = time.monotonic()
        produce_s = pipeline._produce(bootstrap, settings.topics.calls, payloads)
        _calls_s, seconds = processor_bench.wait_processed(settings, started)
        cpu_s = sum(processor_bench.cpu_seconds(pid) for pid in pids) - cpu_before
    finally:
        for name in names:
            stack.stop_service(name)
    row: dict[str, Any] = {"workers": workers, "events": count, "produce_s": round(produce_s, 2)}
    if seconds is not None:
        row["seconds"] = round(seconds, 2)
        row["events_per_s"] = round(count / seconds)
    row["cpu_us_per_event"] = round(1e6 * cpu_s / count, 1)
    return row


def _wait_stable(bootstrap: str, group: str, members: int, timeout_s: float = 180) -> None:
    """Block until the group is Stable with ``members`` members, so the load does not meet a
    rebalance (joins are measured by the tests, not here)."""
    from confluent_kafka import ConsumerGroupState, KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            (future,) = admin.describe_consumer_groups([group]).values()
            description = future.result(timeout=10)
        except KafkaException:
            description = None
        if (
            description is not None
            and description.state == ConsumerGroupState.STABLE
            and len(description.members) == members
        ):
            return
        time.sleep(0.5)
    raise RuntimeError(f"group {group} not stable with {members} members in {timeout_s:.0f}s")


def measure(
    bootstrap: str,
    home: Path,
    port: int,
    count: int = 10_000,
    workers: tuple[int, ...] = (1, 2),
) -> dict[str, Any]:
    """The scaling curve: one row per worker count, plus the speed-up over one worker."""
    rows = []
    for i, n in enumerate(workers):
        rows.append(_run(bootstrap, home, port + 100 * i, n, count))
        print(f"  {n} worker(s): {json.dumps(rows[-1])}", flush=True)
    base = rows[0].get("events_per_s")
    for row in rows:
        if base and row.get("events_per_s"):
            row["speedup"] = round(row["events_per_s"] / base, 2)
    return {"cpus": os.cpu_count() or 0, "curve": rows}


def figure(bootstrap: str, home: Path, port: int) -> dict[str, Any]:
    """The P7 entry for bench/results.json."""
    count = int(os.environ.get("AGENTLEDGER_BENCH_SCALING_EVENTS", "100000"))
    workers = tuple(
        int(n) for n in os.environ.get("AGENTLEDGER_BENCH_SCALING_WORKERS", "1,2,4").split(",")
    )
    started = time.monotonic()
    result = measure(bootstrap, home, port, count, workers)
    curve = result["curve"]
    return {
        "id": "P7",
        "name": "processor events/s by workers in one group (scaling curve)",
        "value": " / ".join(f"{r['workers']}w {r.get('events_per_s', '-')}" for r in curve),
        "unit": "events/s",
        "target": "1, 2 and 4 workers: events/s and CPU per event for each (issue #15)",
        "details": result,
        "seconds": round(time.monotonic() - started, 1),
        "command": f"{COMMAND}  (AGENTLEDGER_BENCH_SCALING_EVENTS={count}, "
        f"AGENTLEDGER_BENCH_SCALING_WORKERS={','.join(map(str, workers))})",
    }


def main() -> int:
    import socket

    sys.path.insert(0, str(ROOT.parent))
    from agentledger.deploy import KafkaBroker

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    with tempfile.TemporaryDirectory(prefix="agentledger-scaling-") as tmp:
        broker = KafkaBroker(Path(tmp) / "kafka", port=free_port(), controller_port=free_port())
        broker.start()
        try:
            result = figure(broker.bootstrap, Path(tmp) / "stack", free_port())
        finally:
            broker.stop()
    (ROOT / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
