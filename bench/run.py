"""`make bench`: measure what we claim, write bench/results.json and print a table.

Starts a private Kafka broker on free loopback ports under a temp dir, so it never touches a
running stack. Every figure records the command that reproduces it.

AGENTLEDGER_BENCH_ONLY=P2,P3 runs only those figures and merges them into the existing
results.json. Other knobs: AGENTLEDGER_BENCH_EVENTS (P1), AGENTLEDGER_BENCH_SINK_EVENTS,
AGENTLEDGER_BENCH_SINK_LAG_RATE and AGENTLEDGER_BENCH_SINK_LAG_SECONDS (P5),
AGENTLEDGER_BENCH_P2_RATE and AGENTLEDGER_BENCH_P2_PROBES (P2), AGENTLEDGER_BENCH_REVIEW_CALLS and
AGENTLEDGER_BENCH_REVIEW_DB (P6: a directory to keep the generated database in and reuse),
AGENTLEDGER_BENCH_OTLP_SPANS (P8), AGENTLEDGER_BENCH_MIGRATION_DB (P10: the 10M-call database,
generated there once when absent) and AGENTLEDGER_BENCH_MIGRATION_WINDOW (P10's baseline seconds).
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
from typing import Any

from agentledger.deploy import KafkaBroker
from agentledger.schemas import Topics
from agentledger.schemas.topic_specs import topic_specs
from agentledger.tables import render_table
from agentledger.topic_admin import ensure_topics

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results.json"
COMMAND = "make bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wanted() -> set[str] | None:
    only = os.environ.get("AGENTLEDGER_BENCH_ONLY")
    return {part.strip().upper() for part in only.split(",")} if only else None


def _merged(figures: list[dict[str, object]]) -> list[dict[str, object]]:
    """The new figures, plus those of the last results.json this run did not measure."""
    if _wanted() is None or not RESULTS.exists():
        return figures
    new = {f["id"] for f in figures}
    old = json.loads(RESULTS.read_text()).get("figures", [])
    kept = [f for f in old if f.get("id") not in new]
    return sorted(kept + figures, key=lambda f: str(f["id"]))


def main(argv: list[str] | None = None) -> int:
    import argparse

    # No options: the figures are chosen by AGENTLEDGER_BENCH_ONLY (see above); --help says so
    # instead of starting a 20-minute run.
    argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        epilog=__doc__.split("\n\n", 2)[-1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)
    sys.path.insert(0, str(ROOT.parent))
    from bench import (
        allowance_bench,
        enforcement,
        framework_overhead,
        migration_bench,
        otlp_receiver,
        processor_bench,
        review_query,
        scaling,
        shim_overhead,
        sink_bench,
    )

    wanted = _wanted()

    load_before: dict[str, float] = {}

    def run(figure: str) -> bool:
        if wanted is not None and figure not in wanted:
            return False
        # The load other work puts on this shared machine as the figure starts.
        load_before[figure] = round(os.getloadavg()[0], 2)
        return True

    figures: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="agentledger-bench-") as tmp:
        broker = KafkaBroker(
            state_dir=Path(tmp) / "kafka", port=_free_port(), controller_port=_free_port()
        )
        print("starting a private Kafka broker for the benchmark ...", flush=True)
        broker.start()
        try:
            ensure_topics(broker.bootstrap, topic_specs(Topics("bench.")))
            if run("P4"):
                figures.append(_p4(shim_overhead, broker.bootstrap, Path(tmp)))
            if run("P1"):
                figures.append(_p1(processor_bench, broker.bootstrap, Path(tmp)))
            if run("P5"):
                figures.append(_p5(sink_bench, broker.bootstrap, Path(tmp)))
            if run("P2"):
                figures.append(_p2(enforcement, broker.bootstrap, Path(tmp)))
            if run("P3"):
                figures.append(_p3(allowance_bench, broker.bootstrap, Path(tmp)))
            if run("P8"):
                figures.append(_p8_otlp(otlp_receiver, broker.bootstrap, Path(tmp)))
            if run("P10"):
                figures.append(_p10(migration_bench, broker.bootstrap, Path(tmp)))
            if run("P7"):
                print("P7: processor scaling curve (1, 2 and 4 workers) ...", flush=True)
                figures.append(
                    scaling.figure(broker.bootstrap, Path(tmp) / "scaling", _free_port())
                )
        finally:
            broker.stop()
    if run("P6"):
        figures.append(_p6(review_query))
    if run("P9"):
        figures.append(_p8(framework_overhead))

    result = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpus": _cpus(),
            "platform": platform.platform(),
        },
        "figures": _merged(
            [{**f, "load_average_1m_before": load_before.get(str(f["id"]))} for f in figures]
        ),
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


def _p4(shim_overhead: Any, bootstrap: str, tmp: Path) -> dict[str, object]:
    print("P4: shim overhead per call (3 x 20,000 calls) ...", flush=True)
    started = time.monotonic()
    p4 = shim_overhead.measure(bootstrap, str(tmp / "home"))
    return {
        "id": "P4",
        "name": "shim overhead per call, agent.call() + record(), median",
        "value": p4["shim_kafka_us"],
        "unit": "us",
        "target": "<= 20 us (issue #3)",
        "details": p4,
        "seconds": round(time.monotonic() - started, 1),
        "command": f"{COMMAND}  (bench/shim_overhead.py)",
    }


def _p1(processor_bench: Any, bootstrap: str, tmp: Path) -> dict[str, object]:
    count = int(os.environ.get("AGENTLEDGER_BENCH_EVENTS", "600000"))
    print(f"P1: {count:,} trace events through the processor, every policy kind on ...")
    started = time.monotonic()
    p1 = processor_bench.measure(bootstrap, tmp / "processor", (_free_port(), _free_port()), count)
    return {
        "id": "P1",
        "name": "events/s through the processor (produce to committed), its workers as `up` "
        "runs them (one per core), alone, with policies",
        "value": p1.get("processor_events_per_s", "did not finish"),
        "unit": "events/s",
        "target": ">= 50,000 events/s, >= 0.25 of the raw consume in the same run (issue #15)",
        "details": p1,
        "seconds": round(time.monotonic() - started, 1),
        "command": f".venv/bin/python -m bench.processor_bench --events {count}",
    }


def _p5(sink_bench: Any, bootstrap: str, tmp: Path) -> dict[str, object]:
    count = int(os.environ.get("AGENTLEDGER_BENCH_SINK_EVENTS", "600000"))
    lag_rate = int(os.environ.get("AGENTLEDGER_BENCH_SINK_LAG_RATE", "10000"))
    lag_seconds = float(os.environ.get("AGENTLEDGER_BENCH_SINK_LAG_SECONDS", "20"))
    print(
        f"P5: {count:,} trace events through the sink, chDB's bare insert of the same bytes, "
        f"then the sink's lag at {lag_rate:,}/s ..."
    )
    started = time.monotonic()
    p5 = sink_bench.measure(bootstrap, tmp / "sink", _free_port(), count, lag_rate, lag_seconds)
    return {
        "id": "P5",
        "name": "sink rows/s into embedded ClickHouse (every view on) against chDB's bare insert "
        "of the same bytes in the same run, and Kafka-to-queryable lag p99",
        "value": f"{p5.get('sink_rows_per_s')} rows/s = {p5.get('sink_vs_bare_insert')} of "
        f"{p5.get('bare_insert_rows_per_s')} bare, lag p99 {p5.get('lag_p99_ms')} ms at "
        f"{lag_rate}/s",
        "unit": "",
        "target": ">= 200,000 rows/s, or >= 0.8 of the bare insert when that is below 200,000; "
        "lag p99 <= 1 s at 10,000 rows/s (issue 16)",
        "details": p5,
        "seconds": round(time.monotonic() - started, 1),
        "command": f".venv/bin/python -m bench.sink_bench --events {count} "
        f"--lag-rate {lag_rate} --lag-seconds {lag_seconds:g}",
    }


def _p2(enforcement: Any, bootstrap: str, tmp: Path) -> dict[str, object]:
    # The load: 10,000 background events/s (AGENTLEDGER_BENCH_P2_RATE to change it);
    # the figure reports the rate the generator achieved beside it.
    rate = int(os.environ.get("AGENTLEDGER_BENCH_P2_RATE", "10000"))
    probes = int(os.environ.get("AGENTLEDGER_BENCH_P2_PROBES", "40"))
    print(f"P2: {probes} enforcement probes under {rate} events/s ...", flush=True)
    started = time.monotonic()
    found = enforcement.measure(
        bootstrap,
        tmp / "enforce",
        (_free_port(), _free_port()),
        probes=probes,
        rate=rate,
        with_p3=False,
    )
    p2 = found["P2"]
    return {
        "id": "P2",
        "name": f"enforcement latency, event emitted -> STOP applied in the shim, "
        f"under {rate} events/s",
        "value": f"p50 {p2.get('p50_ms')} / p99 {p2.get('p99_ms')}",
        "unit": "ms",
        "target": "p99 <= 200 ms at 10,000 events/s of background load (issue #15)",
        "details": p2,
        "seconds": round(time.monotonic() - started, 1),
        "command": f"AGENTLEDGER_BENCH_ONLY=P2 AGENTLEDGER_BENCH_P2_RATE={rate} "
        f"AGENTLEDGER_BENCH_P2_PROBES={probes} {COMMAND}  (bench/enforcement.py)",
    }


def _p3(allowance_bench: Any, bootstrap: str, tmp: Path) -> dict[str, object]:
    print("P3: overshoot with allowances, 6 cases (1, 16 and 4x4 callers; 5 and 200 ms) ...")
    started = time.monotonic()
    p3 = allowance_bench.measure(bootstrap, tmp / "allowances", (_free_port(), _free_port()))
    ratios = [c["throughput_ratio"] for c in p3["cases"] if c["throughput_ratio"] is not None]
    return {
        "id": "P3",
        "name": "runaway overshoot with allowances, worst of 6 cases, % of the limit",
        "value": f"{p3['worst_overshoot_percent']} (throughput ratio min {min(ratios)})",
        "unit": "%",
        "target": "<= 1% over the limit; calls/s while budget remains >= 0.9 of unbudgeted",
        "details": p3,
        "seconds": round(time.monotonic() - started, 1),
        "command": f"AGENTLEDGER_BENCH_ONLY=P3 {COMMAND}  (bench/allowance_bench.py)",
    }


def _p8(framework_overhead: Any) -> dict[str, object]:
    print("P9: shim overhead per call through LangChain, OpenAI Agents, pydantic-ai ...")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agentledger-p8-") as tmp:
        p8 = framework_overhead.measure(str(Path(tmp) / "home"))
    return {
        "id": "P9",
        "name": "shim overhead per model call through each framework integration, median",
        "value": " / ".join(
            f"{name} {p8[name]['overhead_us']}"
            for name in ("langchain", "openai_agents", "pydantic_ai")
        ),
        "unit": "us",
        "target": "reported (issue #18)",
        "details": p8,
        "seconds": round(time.monotonic() - started, 1),
        "command": ".venv/bin/python -m bench.framework_overhead",
    }


def _p8_otlp(otlp_receiver: Any, bootstrap: str, tmp: Path) -> dict[str, object]:
    spans = int(os.environ.get("AGENTLEDGER_BENCH_OTLP_SPANS", "50000"))
    print(f"P8: {spans:,} GenAI spans through the OTLP receiver into Kafka ...", flush=True)
    started = time.monotonic()
    p8 = otlp_receiver.measure(bootstrap, tmp / "otlp", spans=spans, batch=512, clients=2)
    return {
        "id": "P8",
        "name": "OTLP receiver spans/s (protobuf, 512-span exports, 2 clients) into Kafka, and "
        "receiver CPU per span",
        "value": f"{p8['spans_per_s']} spans/s, {p8['cpu_us_per_span']} us CPU/span",
        "unit": "",
        "target": "measured (issue #17)",
        "details": p8,
        "seconds": round(time.monotonic() - started, 1),
        "command": f".venv/bin/python -m bench.otlp_receiver --spans {spans} --batch 512",
    }


def _p6(review_query: Any) -> dict[str, object]:
    calls = int(os.environ.get("AGENTLEDGER_BENCH_REVIEW_CALLS", "10000000"))
    # A directory to keep the generated database in (generating 10M calls takes minutes); a
    # database already there is reused as it is, its pending migrations applied.
    keep = os.environ.get("AGENTLEDGER_BENCH_REVIEW_DB") or None
    print(f"P6: review queries over {calls:,} generated calls ...", flush=True)
    started = time.monotonic()
    load = os.getloadavg()[0]
    p6 = review_query.measure(calls=calls, runs=3, db=keep)
    p6["load_avg_1m_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return {
        "id": "P6",
        "name": f"review over {calls:,} calls, median of 3: spenders query (rollups) and the "
        "full review with escalations",
        "value": f"{p6['rollup_stats_ms']:.0f} ms spenders, {p6['full_review_ms']:.0f} ms full",
        "unit": "",
        "target": "<= 200 ms each (issue 16)",
        "details": {k: v for k, v in p6.items() if k != "output"},
        "seconds": round(time.monotonic() - started, 1),
        "command": " ".join([".venv/bin/python", *review_query.command(calls, 3, keep)[1:]]),
    }


def _p10(migration_bench: Any, bootstrap: str, tmp: Path) -> dict[str, object]:
    db = Path(os.environ.get("AGENTLEDGER_BENCH_MIGRATION_DB", "/tmp/migdb"))  # noqa: S108
    window = float(os.environ.get("AGENTLEDGER_BENCH_MIGRATION_WINDOW", "90"))
    print(f"P10: rebuild of every rollup over 10M calls ({db}) while ingesting ...", flush=True)
    started = time.monotonic()
    p10 = migration_bench.measure(
        bootstrap, tmp / "migration", _free_port(), db, 10_000_000, window
    )
    migration = p10["migration"]
    return {
        "id": "P10",
        "name": "sink rows/s while a migration rebuilds every rollup over 10M calls, over rows/s "
        "without one; counts exact afterwards",
        "value": f"{p10['ratio']} ({migration['rows_per_s']} vs {p10['baseline']['rows_per_s']} "
        f"rows/s, rebuild {migration['migration_s']} s, exact: {migration['rollups_exact']})",
        "unit": "",
        "target": ">= 0.5 of the normal rate, counts exact (issue #16)",
        "details": p10,
        "seconds": round(time.monotonic() - started, 1),
        "command": f".venv/bin/python -m bench.migration_bench --db {db} --window {window:.0f}",
    }


def _cpus() -> int:
    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
