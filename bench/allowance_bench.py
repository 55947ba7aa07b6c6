"""P3: runaway overshoot with allowances, on the real stack (broker, processor, sink).

Cases: (a) 1 thread, (b) 16 threads in one process, (c) 4 processes x 4 threads, all on one
pool budget, each with 5 ms and with 200 ms calls. Every caller is a ``bench.allowance_caller``
process calling gpt-4o-mini with ``max_tokens=1000`` ($0.0006 reserved) and using 500-1,000
output tokens, until refused. Reported per case: the processor's confirmed spend against the
limit (overshoot in % of the limit), the amount by which calls cost more than their
reservations (0 here by construction: actual output never exceeds max_tokens), requests per
call, and the calls/s while budget remained against the same callers on an unbudgeted pool.

``python -m bench.allowance_bench`` (a private broker), or through ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.deploy.stack import Stack
from agentledger.producers.ledger import Ledger
from agentledger.schemas import BudgetPolicy
from agentledger.schemas.topic_specs import topic_specs
from agentledger.topic_admin import ensure_topics

__all__ = ["measure"]

CALL_NANO = 600_000  # what one call reserves
CASES = (("a", 1, 1), ("b", 1, 16), ("c", 4, 4))  # (name, processes, threads each)
LATENCIES = (0.005, 0.2)


def _settings(bootstrap: str, home: Path, ports: tuple[int, int]) -> Settings:
    return Settings(
        kafka=bootstrap,
        home=home,
        topic_prefix=f"ab{uuid.uuid4().hex[:6]}.",
        control_key=SecretStr("bench-control-key-0123456789"),
        api_token=SecretStr("bench-api-token"),
        processor_port=ports[0],
        sink_port=ports[1],
    )


def _env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "AGENTLEDGER_KAFKA": settings.kafka,
            "AGENTLEDGER_TOPIC_PREFIX": settings.topic_prefix,
            "AGENTLEDGER_HOME": str(settings.home),
            "AGENTLEDGER_CONTROL_KEY": settings.control_key_bytes().decode(),
        }
    )
    return env


def _callers(
    settings: Settings, pool: str, processes: int, threads: int, latency: float, seconds: float
) -> list[dict[str, Any]]:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.allowance_caller",
                "--pool",
                pool,
                "--name",
                f"{pool}-p{i}",
                "--threads",
                str(threads),
                "--latency-s",
                str(latency),
                "--min-output",
                "500",
                "--seconds",
                str(seconds),
            ],
            env=_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 180)
        if proc.returncode != 0:
            raise RuntimeError(f"caller failed: {err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _day_spend(settings: Settings, scope: str, expected: int, timeout_s: float = 120) -> int:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    spent = -1
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            f"http://127.0.0.1:{settings.processor_port}/state/{scope}",
            headers={"Authorization": f"Bearer {settings.api_token_value()}"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            report = json.loads(response.read())
        spent = int(next(p for p in report["periods"] if p["period"] == "day")["spend_nano_usd"])
        if spent >= expected:
            return spent
        time.sleep(0.2)
    return spent


def _publish(settings: Settings, policy: BudgetPolicy) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": settings.kafka})
    producer.produce(settings.topics.policies, policy.model_dump_json().encode(), policy.key)
    producer.flush(10)


def _case(
    settings: Settings, name: str, processes: int, threads: int, latency: float
) -> dict[str, Any]:
    callers = processes * threads
    # About 3 s of calls at full speed, and at least 40 calls.
    calls = max(40, int(callers / (latency + 0.0005) * 3))
    limit = calls * CALL_NANO
    tag = f"{name}{int(latency * 1000)}"
    pool = f"budgeted-{tag}"
    _publish(settings, BudgetPolicy(scope=f"pool:{pool}", limit_usd=Decimal(limit) / 10**9))
    time.sleep(1.0)  # the processor and the callers' directory learn the policy
    results = _callers(settings, pool, processes, threads, latency, seconds=600)
    made = sum(r["made"] for r in results)
    shim_spent = sum(r["spent_nano_usd"] for r in results)
    spent = _day_spend(settings, f"pool:{pool}", shim_spent)
    excess = sum(r["excess_nano_usd"] for r in results)
    requests = sum(r["requests"] for r in results)
    # Throughput while budget remains: the same callers for 3 s on a pool whose budget they
    # cannot spend in that time, against 3 s on a pool without a budget.
    steady_pool = f"steady-{tag}"
    _publish(
        settings,
        BudgetPolicy(scope=f"pool:{steady_pool}", limit_usd=Decimal(limit * 1000) / 10**9),
    )
    time.sleep(1.0)
    steady = _callers(settings, steady_pool, processes, threads, latency, seconds=3.0)
    steady_made = sum(r["made"] for r in steady)
    budgeted_rate = sum(r["calls_per_s_after_first"] for r in steady)
    # Requests after each process's first grant: the first is the cold start.
    steady_requests = sum(r["requests_after_first"] for r in steady)
    free = _callers(settings, f"free-{tag}", processes, threads, latency, seconds=3.0)
    free_rate = sum(r["calls_per_s_after_first"] for r in free)
    return {
        "case": f"({name}) {processes} process(es) x {threads} thread(s), "
        f"{latency * 1000:g} ms calls",
        "limit_usd": str(Decimal(limit) / 10**9),
        "spent_usd": str(Decimal(spent) / 10**9),
        "overshoot_percent": round((spent - limit) * 100 / limit, 3),
        "excess_over_reservations_usd": str(Decimal(excess) / 10**9),
        "used_percent": round(spent * 100 / limit, 2),
        "calls": made,
        "requests_per_100_calls_to_exhaustion": round(requests * 100 / max(made, 1), 2),
        "requests_per_100_calls_steady": round(steady_requests * 100 / max(steady_made, 1), 2),
        "calls_per_s_budgeted": round(budgeted_rate, 1),
        "calls_per_s_unbudgeted": round(free_rate, 1),
        "throughput_ratio": round(budgeted_rate / free_rate, 3) if free_rate else None,
    }


def measure(bootstrap: str, home: Path, ports: tuple[int, int]) -> dict[str, Any]:
    settings = _settings(bootstrap, home, ports)
    ensure_topics(bootstrap, topic_specs(settings.topics))
    stack = Stack(settings, progress=lambda _m: None, manage_kafka=False)
    stack.up(timeout_s=180)
    try:
        with Ledger(settings) as ledger:  # the stack is up and answering
            ledger.wait_for_control(60)
        cases = []
        for latency in LATENCIES:
            for name, processes, threads in CASES:
                print(f"  P3 case {name}: {processes}x{threads}, {latency * 1000:g} ms", flush=True)
                cases.append(_case(settings, name, processes, threads, latency))
    finally:
        stack.down()
    worst = max(c["overshoot_percent"] for c in cases)
    return {"worst_overshoot_percent": worst, "cases": cases, "load_before": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    import socket
    import tempfile

    from agentledger.deploy import KafkaBroker

    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args(argv)

    def free() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    with tempfile.TemporaryDirectory(prefix="agentledger-allowance-") as tmp:
        broker = KafkaBroker(state_dir=Path(tmp) / "kafka", port=free(), controller_port=free())
        broker.start()
        try:
            result = measure(broker.bootstrap, Path(tmp) / "home", (free(), free()))
        finally:
            broker.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
