"""What the routing-stats agent costs the processor.

1. In process: ``StatsAggregator.observe`` per event (validation + two partial updates) and
   one publish of every dirty partial, medians over the trace workload.
2. The real processor (``python -m agentledger.stream_processors``) on a private broker, with
   and without routing stats (the second started with ``register_stats`` replaced by a no-op:
   the spend agent then counts no stats and nothing is published), alternating: events/s
   from the first produce to the group's commit at the end.

    .venv/bin/python -m bench.routing_stats --events 20000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from statistics import median
from typing import Any

from agentledger.deploy import KafkaBroker
from agentledger.schemas.topic_specs import topic_specs
from agentledger.stream_processors.stats import StatsAggregator
from agentledger.topic_admin import ensure_topics
from bench.pipeline import _end_offsets, _group_done, _payloads, _produce, _settings
from bench.run import _free_port

__all__ = ["main", "observe_cost", "processor_rate"]

WITHOUT_STATS = (
    "import agentledger.stream_processors.app as app; "
    "app.register_stats = lambda *args, **kwargs: None; "
    "from agentledger.stream_processors.__main__ import main; main()"
)


def observe_cost(payloads: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    runs = []
    publish = []
    for _ in range(3):
        agg = StatsAggregator(clock=lambda: time.time_ns() // 1_000_000)
        started = time.perf_counter_ns()
        for offset, (_key, value) in enumerate(payloads):
            agg.observe(offset % 6, offset, value)
        runs.append((time.perf_counter_ns() - started) / len(payloads) / 1000)
        started = time.perf_counter_ns()
        dirty = agg.take_dirty()
        for record in dirty:
            record.model_dump_json()
        publish.append((time.perf_counter_ns() - started) / 1e6)
    return {
        "observe_us_per_event": round(median(runs), 2),
        "partials": len(dirty),
        "publish_all_partials_ms": round(median(publish), 1),
    }


def processor_rate(
    bootstrap: str, home: Path, payloads: list[tuple[bytes, bytes]], with_stats: bool
) -> float:
    settings = _settings(
        bootstrap, home, f"rs{uuid.uuid4().hex[:6]}.", (_free_port(), _free_port())
    )
    ensure_topics(bootstrap, topic_specs(settings.topics))
    env = dict(os.environ)
    env.update(
        {
            "AGENTLEDGER_KAFKA": bootstrap,
            "AGENTLEDGER_TOPIC_PREFIX": settings.topic_prefix,
            "AGENTLEDGER_HOME": str(home),
            "AGENTLEDGER_CONTROL_KEY": settings.control_key_bytes().decode(),
            "AGENTLEDGER_API_TOKEN": settings.api_token_value(),
            "AGENTLEDGER_PROCESSOR_PORT": str(settings.processor_port),
        }
    )
    home.mkdir(parents=True, exist_ok=True)
    args = ["-m", "agentledger.stream_processors"] if with_stats else ["-c", WITHOUT_STATS]
    with (home / "processor.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                url = f"http://127.0.0.1:{settings.processor_port}/health"
                with urllib.request.urlopen(url, timeout=2) as response:
                    if json.loads(response.read()).get("policies_loaded"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"processor did not start; see {home / 'processor.log'}")
            time.sleep(0.2)
        produce_s = _produce(bootstrap, settings.topics.calls, payloads)
        produced_at = time.monotonic()
        ends = _end_offsets(bootstrap, settings.topics.calls)
        group = f"{settings.topic_prefix}processor"
        while not _group_done(bootstrap, group, settings.topics.calls, ends):
            if time.monotonic() - produced_at > 900:
                raise RuntimeError("processor did not finish within 900 s")
            time.sleep(0.2)
        return len(payloads) / (time.monotonic() - produced_at + produce_s)
    finally:
        proc.kill()
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    payloads = _payloads(args.events)
    result: dict[str, Any] = {"events": args.events, **observe_cost(payloads)}
    print(json.dumps(result), flush=True)
    rates: dict[str, list[int]] = {"with_stats": [], "without_stats": []}
    with tempfile.TemporaryDirectory(prefix="agentledger-rs-") as tmp:
        broker = KafkaBroker(
            state_dir=Path(tmp) / "kafka", port=_free_port(), controller_port=_free_port()
        )
        broker.start()
        try:
            for n in range(args.rounds):
                # Alternate which variant runs first: the machine's load drifts.
                for with_stats in (True, False) if n % 2 == 0 else (False, True):
                    key = "with_stats" if with_stats else "without_stats"
                    home = Path(tmp) / f"{key}-{n}"
                    rate = processor_rate(broker.bootstrap, home, payloads, with_stats)
                    rates[key].append(round(rate))
                    print(f"round {n + 1}: {key}: {rate:,.0f} events/s", flush=True)
        finally:
            broker.stop()
    result["processor_events_per_s"] = rates
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
