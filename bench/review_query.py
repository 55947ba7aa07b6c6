"""P6: review query latency over N generated calls, by running the sink's own benchmark
(`python -m bench.bench_review`) in a subprocess and reading its figures."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

__all__ = ["command", "measure"]

_FIGURES = {
    "load_s": r"generated\+rolled up in ([\d.]+)s",
    "rollup_stats_ms": r"via rollups: (\d+) ms",
    "full_review_ms": r"full review .*?: (\d+) ms",
    "spend_table_ms": r"spend per agent and model table: (\d+) ms",
    "escalations_task_calls_ms": r"escalations of the top 10 from task_calls: (\d+) ms",
}
# bench_review's "CPU ms, same order: ..." line, in the order it prints the figures.
_CPU_FIGURES = (
    "rollup_stats_cpu_ms",
    "sums_only_cpu_ms",
    "full_review_cpu_ms",
    "spend_table_cpu_ms",
    "escalations_task_calls_cpu_ms",
    "escalations_calls_cpu_ms",
)


def command(calls: int, runs: int, db: str | None = None) -> list[str]:
    keep = ["--db", db] if db else []
    return [
        sys.executable,
        "-m",
        "bench.bench_review",
        "--calls",
        str(calls),
        "--runs",
        str(runs),
        *keep,
    ]


def measure(calls: int = 10_000_000, runs: int = 3, db: str | None = None) -> dict[str, Any]:
    done = subprocess.run(
        command(calls, runs, db), capture_output=True, text=True, timeout=3600, check=True
    )
    result: dict[str, Any] = {"calls": calls, "runs": runs, "output": done.stdout.strip()}
    for name, pattern in _FIGURES.items():
        found = re.search(pattern, done.stdout)
        if found is None:
            raise RuntimeError(f"bench_review printed no {name}: {done.stdout!r}")
        result[name] = float(found.group(1))
    cpu = re.search(r"CPU ms, same order: ([\d, ]+)", done.stdout)
    if cpu is not None:
        values = [float(v) for v in cpu.group(1).split(",")]
        result.update(zip(_CPU_FIGURES, values, strict=False))
    return result
