"""`make bench`: measure what we claim, write bench/results.json and print a table.

Starts a private Kafka broker on free loopback ports under a temp dir, so it never touches a
running stack. Every figure records the command that reproduces it.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from agentledger.deploy import KafkaBroker, ensure_topics, topic_specs
from agentledger.schemas import Topics
from agentledger.tables import render_table

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results.json"
COMMAND = "make bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    sys.path.insert(0, str(ROOT.parent))
    from bench import pipeline, shim_overhead

    figures: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="agentledger-bench-") as tmp:
        broker = KafkaBroker(
            state_dir=Path(tmp) / "kafka", port=_free_port(), controller_port=_free_port()
        )
        print("starting a private Kafka broker for the benchmark ...", flush=True)
        broker.start()
        try:
            ensure_topics(broker.bootstrap, topic_specs(Topics("bench.")))
            print("P4: shim overhead per call (3 x 20,000 calls) ...", flush=True)
            started = time.monotonic()
            p4 = shim_overhead.measure(broker.bootstrap, str(Path(tmp) / "home"))
            figures.append(
                {
                    "id": "P4",
                    "name": "shim overhead per call, agent.call() + record(), median",
                    "value": p4["shim_kafka_us"],
                    "unit": "us",
                    "target": "<= 20 us (issue #3)",
                    "details": p4,
                    "seconds": round(time.monotonic() - started, 1),
                    "command": f"{COMMAND}  (bench/shim_overhead.py)",
                }
            )
            count = int(os.environ.get("AGENTLEDGER_BENCH_EVENTS", "50000"))
            print(f"P1/P5: {count:,} trace events through processor and sink ...", flush=True)
            started = time.monotonic()
            p1 = pipeline.measure(
                broker.bootstrap, Path(tmp) / "stack", (_free_port(), _free_port()), count
            )
            seconds = round(time.monotonic() - started, 1)
            command = f"{COMMAND}  (bench/pipeline.py, AGENTLEDGER_BENCH_EVENTS={count})"
            figures.append(
                {
                    "id": "P1",
                    "name": "end-to-end events/s through the processor (produce to committed)",
                    "value": p1.get("processor_events_per_s", "did not finish"),
                    "unit": "events/s",
                    "target": ">= 50,000 events/s (issue #4)",
                    "details": p1,
                    "seconds": seconds,
                    "command": command,
                }
            )
            figures.append(
                {
                    "id": "P5",
                    "name": "sink rows/s into ClickHouse (produce to committed)",
                    "value": p1.get("sink_rows_per_s", "did not finish"),
                    "unit": "rows/s",
                    "target": "(issue #5)",
                    "details": {k: v for k, v in p1.items() if k.startswith(("sink", "events"))},
                    "seconds": seconds,
                    "command": command,
                }
            )
        finally:
            broker.stop()

    result = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpus": _cpus(),
            "platform": platform.platform(),
        },
        "figures": figures,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        render_table(
            ["id", "figure", "value", "target", "command"],
            [
                [f["id"], f["name"], f"{f['value']} {f['unit']}", f["target"], f["command"]]
                for f in figures
            ],
        )
    )
    for figure in figures:
        print(f"{figure['id']} details: {json.dumps(figure['details'])}")
    print(f"written to {RESULTS}")
    return 0


def _cpus() -> int:
    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
