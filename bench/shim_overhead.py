"""P4: the shim's overhead per call on the caller's thread, next to a bare confluent-kafka
produce of the same payload, measured in the same process and run.

Each figure is the median of per-iteration perf_counter_ns() deltas over N iterations after a
warm-up; the payload is one real CallEvent as the shim would send it.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.producers import Ledger
from agentledger.producers.transport import InMemoryTransport, KafkaTransport

WARMUP = 2_000


def _median_ns(step: Callable[[], None], iterations: int) -> float:
    for _ in range(WARMUP):
        step()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        step()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples)


def measure(bootstrap: str, home: str, iterations: int = 20_000) -> dict[str, Any]:
    from confluent_kafka import Producer

    settings = Settings(
        kafka=bootstrap,
        home=home,  # type: ignore[arg-type]
        topic_prefix="bench.",
        control_key=SecretStr("bench-control-key-0123456789"),
    )
    topic = settings.topics.calls

    def shim_step(ledger: Ledger) -> Callable[[], None]:
        agent = ledger.agent("bench-agent", workflow="wf-bench", pool="bench")

        def step() -> None:
            with agent.call(provider="openai", model="gpt-4o-mini") as call:
                call.record(input_tokens=1200, output_tokens=300)

        return step

    memory = Ledger(settings, transport=InMemoryTransport(), start_control_listener=False)
    in_memory_ns = _median_ns(shim_step(memory), iterations)
    memory.close()

    kafka_transport = KafkaTransport(bootstrap)
    kafka = Ledger(settings, transport=kafka_transport, start_control_listener=False)
    kafka_ns = _median_ns(shim_step(kafka), iterations)
    kafka.close()

    # The same calls in two budgeted scopes (agent and pool), admitted against allowances that
    # a local stand-in for the processor grants in full: the admission's own cost per call.
    budgeted = _budgeted_ledger(settings, KafkaTransport(bootstrap))
    budgeted_ns = _median_ns(shim_step(budgeted), iterations)
    budgeted.close()

    with memory_payload(settings) as (key, value):
        producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "linger.ms": 5,
                "acks": "all",
                "enable.idempotence": True,
                "compression.type": "lz4",
            }
        )

        def bare() -> None:
            producer.produce(topic, key=key, value=value)
            producer.poll(0)

        bare_ns = _median_ns(bare, iterations)
        producer.flush(30)

    return {
        "iterations": iterations,
        "load_average_1m": round(os.getloadavg()[0], 1),
        "shim_in_memory_us": round(in_memory_ns / 1000, 2),
        "shim_kafka_us": round(kafka_ns / 1000, 2),
        "bare_produce_us": round(bare_ns / 1000, 2),
        "shim_minus_bare_us": round((kafka_ns - bare_ns) / 1000, 2),
        "shim_kafka_budgeted_us": round(budgeted_ns / 1000, 2),
    }


class _GrantAll:
    """Answers every allowance request in full, from a thread (as the processor would)."""

    def __init__(self) -> None:
        import queue
        import threading

        self.allowances: Any = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=self._run, daemon=True).start()

    def send(self, request: Any) -> bool:
        self._queue.put(request)
        return True

    def _run(self) -> None:
        from agentledger.schemas import AllowanceGrant, BudgetGrant

        while True:
            request = self._queue.get()
            used = max((c.used_nano_usd for c in request.claims), default=0)
            grant = AllowanceGrant(
                holder=request.holder,
                seq=request.seq,
                scope=request.scope,
                budgets=(
                    BudgetGrant(
                        budget="day:0",
                        period="day",
                        granted_nano_usd=used + request.want_nano_usd,
                        limit_nano_usd=10**18,
                        spend_nano_usd=0,
                        outstanding_nano_usd=used + request.want_nano_usd,
                    ),
                ),
                ttl_ms=3_600_000,
                issued_at_ms=0,
            )
            self.allowances.on_grant(grant)


def _budgeted_ledger(settings: Settings, transport: KafkaTransport) -> Ledger:
    from agentledger.producers.allowance import Allowances
    from agentledger.producers.budget_directory import BudgetDirectory
    from agentledger.schemas import BudgetPolicy

    directory = BudgetDirectory()
    for scope in ("agent:bench-agent", "pool:bench"):
        policy = BudgetPolicy(scope=scope, limit_usd=1_000_000)
        directory.apply(policy.key.encode(), policy.model_dump_json().encode())
    directory.loaded.set()
    authority = _GrantAll()
    allowances = Allowances(
        "bench-holder", authority.send, reply_partitions=6, clock_ms=lambda: time.time_ns() // 10**6
    )
    authority.allowances = allowances
    allowances.start()
    return Ledger(
        settings,
        transport=transport,
        start_control_listener=False,
        allowances=allowances,
        budgets=directory,
    )


class memory_payload:
    """One real event as the shim serialises it, captured through the in-memory transport."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __enter__(self) -> tuple[bytes, bytes]:
        transport = InMemoryTransport()
        ledger = Ledger(self.settings, transport=transport, start_control_listener=False)
        with ledger.agent("bench-agent", workflow="wf-bench", pool="bench").call(
            provider="openai", model="gpt-4o-mini"
        ) as call:
            call.record(input_tokens=1200, output_tokens=300)
        ledger.close()
        _topic, key, value = transport.messages[0]
        return key, value

    def __exit__(self, *_: object) -> None:
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    """P4 alone: ``.venv/bin/python bench/shim_overhead.py [iterations] [--bootstrap host:port]``
    (without --bootstrap, against a private broker it starts and stops)."""
    from agentledger.deploy import KafkaBroker
    from agentledger.schemas import Topics
    from agentledger.schemas.topic_specs import topic_specs
    from agentledger.topic_admin import ensure_topics

    args = sys.argv[1:]
    bootstrap = None
    if "--bootstrap" in args:
        at = args.index("--bootstrap")
        bootstrap = args[at + 1]
        del args[at : at + 2]
    iterations = int(args[0]) if args else 20_000
    with tempfile.TemporaryDirectory(prefix="agentledger-p4-") as tmp:
        if bootstrap is not None:
            ensure_topics(bootstrap, topic_specs(Topics("bench.")))
            result = measure(bootstrap, str(Path(tmp) / "home"), iterations)
        else:
            broker = KafkaBroker(
                state_dir=Path(tmp) / "kafka", port=_free_port(), controller_port=_free_port()
            )
            broker.start()
            try:
                ensure_topics(broker.bootstrap, topic_specs(Topics("bench.")))
                result = measure(broker.bootstrap, str(Path(tmp) / "home"), iterations)
            finally:
                broker.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
