"""P2 and P3: how fast and how tightly budgets are enforced, on the real stack (processor and
sink as processes, on the benchmark's private broker), through the real shim.

P2, enforcement latency: a probe agent (a glob budget smaller than one call) makes one call;
the time from the moment its event is handed to the transport to the moment the same shim
refuses (``check_budget()`` raises BudgetExceeded, i.e. the signed STOP has been read from the
control topic and applied) is one sample. Probes run one after another while a background
load of trace events (other agents) flows through the same processor at a fixed rate.

P3, runaway overshoot: 16 threads, each its own agent in one pool, call in a loop (200 ms per
call, max_tokens honoured) until refused. Overshoot = settled pool spend - limit, as % of the
limit. Once with a plain budget (STOP at 100% only: nothing to reserve against before the STOP)
and once with a threshold at 10% (throttle:16, which never binds 16 callers but carries the
processor's spend report, so the shim's local reservation applies from then on). The callers
make ~80 calls/s together: the STOP-only overshoot is about that rate times the enforcement
latency (P2).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.request
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from agentledger.budgets import apply_policies
from agentledger.config import Settings
from agentledger.deploy.stack import Stack
from agentledger.producers import AgentLedger, BudgetExceeded, Ledger
from agentledger.schemas import BudgetPolicy, PolicyFile, Threshold
from agentledger.schemas.topic_specs import topic_specs
from agentledger.topic_admin import ensure_topics
from agentledger.traces import load_trace
from agentledger.workload import plan_to_events, replay_trace

__all__ = ["measure", "run_callers"]

CALLERS = 16
MINI = {"provider": "openai", "model": "gpt-4o-mini"}
CALL_NANO = 600_000  # 1,000 output tokens of gpt-4o-mini
P3_LIMIT_NANO = 100 * CALL_NANO  # $0.06
REPORT_AT_PERCENT = 10
# 16 callers x 200 ms: ~80 calls/s, a fast runaway the processor keeps up with. At 20 ms (800
# calls/s) the runaway outruns the processor itself (P1: a few hundred events/s on this
# machine), so every command comes later the longer it runs and no ceiling holds.
LLM_LATENCY_S = 0.2
P2_WARM_UP_S = 30.0


def _settings(bootstrap: str, home: Path, ports: tuple[int, int]) -> Settings:
    return Settings(
        kafka=bootstrap,
        home=home,
        topic_prefix=f"be{uuid.uuid4().hex[:6]}.",
        control_key=SecretStr("bench-control-key-0123456789"),
        api_token=SecretStr("bench-api-token"),
        processor_port=ports[0],
        sink_port=ports[1],
    )


class _Background:
    """Trace events of 64 other agents, produced at ``rate`` events/s until stopped."""

    def __init__(self, settings: Settings, rate: int) -> None:
        from confluent_kafka import Producer

        self.topic = settings.topics.calls
        self.rate = rate
        self.sent = 0
        self.producer = Producer(
            {"bootstrap.servers": settings.kafka, "linger.ms": 5, "acks": "all"}
        )
        trace = load_trace("conv", limit=20_000)
        # Real token sizes; arrival gaps squeezed away (the pace is set by ``rate``).
        self.plan = replay_trace(
            trace, agents=64, pools=4, workflows=8, prefix="bg", speedup=1_000_000
        )
        self.elapsed_s = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # Serialised once; each send swaps in a fresh event id (the plan repeats, the events
        # must not). Building events per send held the generator to a few thousand per second.
        now_ms = time.time_ns() // 1_000_000
        templates = [
            (event.model_dump_json().encode(), str(event.event_id).encode(), event.agent_id)
            for event in plan_to_events(self.plan, start_ms=now_ms - 60_000)
        ]
        produce, poll = self.producer.produce, self.producer.poll
        started = time.monotonic()
        n = 0
        while not self.stop.is_set():
            for _ in range(100):
                value, old_id, key = templates[n % len(templates)]
                value = value.replace(old_id, str(uuid.uuid4()).encode(), 1)
                while True:
                    try:
                        produce(self.topic, value, key)
                        break
                    except BufferError:
                        poll(0.05)
                n += 1
            poll(0)
            ahead = started + n / self.rate - time.monotonic()
            if ahead > 0:
                self.stop.wait(ahead)
        self.producer.flush(30)
        self.sent = n
        self.elapsed_s = time.monotonic() - started

    def __enter__(self) -> _Background:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(60)


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _p2(settings: Settings, ledger: Ledger, probes: int, rate: int) -> dict[str, Any]:
    limit = Decimal(CALL_NANO // 2) / 10**9
    apply_policies(
        settings, PolicyFile(budgets=[BudgetPolicy(scope="agent:p2-*", limit_usd=limit)])
    )
    time.sleep(2)  # every worker reloads the policies topic
    samples: list[float] = []
    with _Background(settings, rate) as background:
        # Let the load settle, and the broker warm up: a just-started JVM spends the first
        # half minute compiling (its C2 thread took 59% of a core at 10k events/s), which a
        # running deployment does not; measured, the first probe then took 1.5-2 s.
        time.sleep(P2_WARM_UP_S)
        for i in range(probes):
            agent = ledger.agent(f"p2-{i}")
            # Recorded after the fact (as a callback such as LiteLLM's does): a call through
            # agent.call() would be refused by its allowance before it is made (P3), and P2
            # measures the STOP's round trip.
            now_ms = time.time_ns() // 1_000_000
            agent.record_finished(
                **MINI, started_ms=now_ms, ended_ms=now_ms, input_tokens=0, output_tokens=1000
            )
            emitted = time.perf_counter()
            deadline = emitted + 60
            while time.perf_counter() < deadline:
                try:
                    agent.check_budget()
                except BudgetExceeded:
                    samples.append((time.perf_counter() - emitted) * 1000)
                    break
                time.sleep(0.001)
            time.sleep(0.5)
    result: dict[str, Any] = {
        "probes": probes,
        "refused": len(samples),
        "background_events_per_s": rate,
        "background_events_sent": background.sent,
        "background_events_per_s_achieved": round(background.sent / background.elapsed_s)
        if background.elapsed_s
        else 0,
    }
    if samples:
        result |= {
            "p50_ms": round(statistics.median(samples), 1),
            "p99_ms": round(_percentile(samples, 0.99), 1),
            "max_ms": round(max(samples), 1),
            "min_ms": round(min(samples), 1),
        }
    return result


def run_callers(
    agents: list[AgentLedger], stop_after_s: float, llm_latency_s: float = LLM_LATENCY_S
) -> tuple[int, int]:
    """Every agent calls gpt-4o-mini (1,000 output tokens, ``llm_latency_s`` each) in its own
    thread until refused or ``stop_after_s``; return the calls made and the callers refused.
    The overshoot test (tests/integration/test_producer_overshoot.py) runs it too."""
    made = refused = 0
    lock = threading.Lock()
    deadline = time.monotonic() + stop_after_s

    def caller(agent: AgentLedger) -> None:
        nonlocal made, refused
        while time.monotonic() < deadline:
            try:
                with agent.call(**MINI, max_tokens=1000) as call:  # type: ignore[arg-type]
                    time.sleep(llm_latency_s)
                    call.record(output_tokens=1000)
            except BudgetExceeded:
                with lock:
                    refused += 1
                return
            with lock:
                made += 1

    threads = [threading.Thread(target=caller, args=(a,)) for a in agents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(stop_after_s + 30)
    return made, refused


def _day_spend(settings: Settings, scope: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{settings.processor_port}/state/{scope}",
        headers={"Authorization": f"Bearer {settings.api_token_value()}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - http://127.0.0.1 built here
        report = json.loads(response.read())
    return int(next(p for p in report["periods"] if p["period"] == "day")["spend_nano_usd"])


def _settled(settings: Settings, scope: str, expected: int, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    spent = _day_spend(settings, scope)
    while spent != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        spent = _day_spend(settings, scope)
    return spent


def _p3(settings: Settings, ledger: Ledger) -> dict[str, Any]:
    limit = Decimal(P3_LIMIT_NANO) / 10**9
    staged = [
        Threshold(at_percent=Decimal(REPORT_AT_PERCENT), action=f"throttle:{CALLERS}"),
        Threshold(at_percent=Decimal(100), action="stop"),
    ]
    apply_policies(
        settings,
        PolicyFile(
            budgets=[
                BudgetPolicy(scope="pool:p3-stoponly", limit_usd=limit),
                BudgetPolicy(scope="pool:p3-reserved", limit_usd=limit, thresholds=tuple(staged)),
            ]
        ),
    )
    time.sleep(2)
    result: dict[str, Any] = {
        "callers": CALLERS,
        "limit_usd": str(limit),
        "call_usd": "0.0006",
        "call_latency_ms": int(LLM_LATENCY_S * 1000),
        "report_at_percent": REPORT_AT_PERCENT,
    }
    for pool in ("p3-stoponly", "p3-reserved"):
        agents = [ledger.agent(f"{pool}-{i}", pool=pool) for i in range(CALLERS)]
        started = time.monotonic()
        made, refused = run_callers(agents, stop_after_s=120)
        took = time.monotonic() - started
        ledger.transport.flush(30)
        spent = _settled(settings, f"pool:{pool}", made * CALL_NANO)
        result[pool] = {
            "calls": made,
            "callers_refused": refused,
            "seconds": round(took, 2),
            "spent_usd": str(Decimal(spent) / 10**9),
            "overshoot_percent": round((spent - P3_LIMIT_NANO) * 100 / P3_LIMIT_NANO, 1),
        }
    return result


def measure(
    bootstrap: str,
    home: Path,
    ports: tuple[int, int],
    *,
    probes: int,
    rate: int,
    with_p3: bool = True,
) -> dict[str, Any]:
    """{"P2": ..., "P3": ...} measured on one stack (P3 here: STOP only, without allowances;
    ``with_p3=False`` leaves it out)."""
    settings = _settings(bootstrap, home, ports)
    ensure_topics(bootstrap, topic_specs(settings.topics))
    stack = Stack(settings, progress=lambda _m: None, manage_kafka=False)
    stack.up(timeout_s=180)
    try:
        with Ledger(settings) as ledger:
            if not ledger.wait_for_control(60):
                raise RuntimeError("the shim never caught up with the control topic")
            p2 = _p2(settings, ledger, probes, rate)
            p3 = _p3(settings, ledger) if with_p3 else None
    finally:
        stack.down()
    return {"P2": p2, "P3": p3}
