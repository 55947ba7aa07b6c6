"""Issue 6 done-when, through the real broker and processor: the processor keeps routing stats
on the compacted stats topic, and the shim's router follows them and the control topic.

Two agents can summarize; "cheap" costs a tenth of "pricey" with the same success rate, and
"pricey" is three times faster. The cheap agent's daily budget is then spent, and the STOP the
processor publishes makes budget mode fall back.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest

import tests.integration.test_processor_worker as base
from agentledger.config import Settings
from agentledger.producers import Ledger, Router, RoutingPolicy
from agentledger.producers.router import DecisionStatus
from agentledger.routing_demo import run_routing_demo
from agentledger.schemas import (
    BudgetPolicy,
    CallEvent,
    CallStatus,
    ControlAction,
    InvalidMessage,
)

pytestmark = pytest.mark.integration

workers = base.workers
readers = base.readers
Worker = base.Worker

CHEAP_COST, PRICEY_COST = 100_000, 1_000_000
SAMPLES = 40


def event(agent: str, cost: int, latency: int, ok: bool, task_type: str) -> bytes:
    return (
        CallEvent(
            event_id=uuid.uuid4(),
            event_time_ms=base.now_ms(),
            agent_id=agent,
            task_type=task_type,
            provider="openai",
            requested_model="gpt-4o-mini",
            used_model="gpt-4o-mini",
            cost_nano_usd=cost,
            latency_ms=latency,
            status=CallStatus.OK if ok else CallStatus.ERROR,
        )
        .model_dump_json()
        .encode()
    )


@pytest.fixture
def router(stack_settings: Settings) -> Iterator[Router]:
    ledger = Ledger(stack_settings)
    router = Router(
        ledger,
        policy=RoutingPolicy(min_samples=20, explore_share=0),
        rng=random.Random(0),
    )
    yield router
    router.close()
    ledger.close()


def test_router_picks_by_mode_falls_back_under_a_real_stop_and_states_thin_evidence(
    stack_settings: Settings,
    workers: Callable[[], Worker],
    router: Router,
) -> None:
    settings = stack_settings
    base.avoid_midnight()
    producer = base.make_producer(settings)
    calls = settings.topics.calls
    # cheap's 40 calls cost $0.004; five more cross $0.0045.
    base.publish_policy(
        producer, settings, BudgetPolicy(scope="agent:cheap", limit_usd=Decimal("0.0045"))
    )
    worker = workers()
    worker.wait_ready()

    def send(agent: str, cost: int, latency: int, n: int, task_type: str = "summarize") -> None:
        for i in range(n):
            # 95% success for both: the first call of every 20 fails.
            value = event(agent, cost, latency + i % 5, ok=i % 20 != 0, task_type=task_type)
            producer.produce(calls, key=agent.encode(), value=value)
        assert producer.flush(10) == 0

    send("cheap", CHEAP_COST, 900, SAMPLES)
    send("pricey", PRICEY_COST, 300, SAMPLES)
    send("cheap", CHEAP_COST, 900, 3, task_type="translate")
    send("pricey", PRICEY_COST, 300, 3, task_type="translate")

    def samples(agent: str, task_type: str = "summarize") -> int:
        summary = router.stats.summary(f"agent:{agent}", task_type)
        return summary.calls if summary is not None else 0

    router.wait_for_stats(10)
    base.wait_for(
        "the stats of both agents",
        lambda: samples("cheap") == SAMPLES and samples("pricey") == SAMPLES,
    )
    cheap = router.stats.summary("agent:cheap", "summarize")
    assert cheap is not None and cheap.cost_nano_usd == SAMPLES * CHEAP_COST  # exact
    assert cheap.successes == SAMPLES - 2
    # The model's partials (one per calls partition) are other records, maybe read later.
    model = base.wait_for(
        "the model's stats",
        lambda: (
            (m := router.stats.summary("model:gpt-4o-mini", "summarize")) is not None
            and m.calls == 2 * SAMPLES
            and m
        ),
    )
    assert model.cost_nano_usd == SAMPLES * (CHEAP_COST + PRICEY_COST)

    budget = router.choose("summarize", ["cheap", "pricey"], "budget")
    assert (budget.status, budget.chosen) == (DecisionStatus.CHOSEN, "cheap"), budget.explain()
    speed = router.choose("summarize", ["cheap", "pricey"], "speed")
    assert speed.chosen == "pricey", speed.explain()

    base.wait_for("the translate stats", lambda: samples("pricey", "translate") == 3)
    thin = router.choose("translate", ["cheap", "pricey"], "budget")
    assert thin.status is DecisionStatus.INSUFFICIENT_EVIDENCE and thin.chosen is None
    assert "thin evidence: 3 calls < 20" in thin.reasons[-1]

    # cheap spends the rest of its day: the processor publishes a signed STOP.
    send("cheap", CHEAP_COST, 900, 5)
    router.ledger.wait_for_control(10)

    def stopped() -> bool:
        return any(c.action is ControlAction.STOP for c in router.ledger.commands(("agent:cheap",)))

    base.wait_for("the STOP for agent:cheap to reach the shim", stopped)
    fallback = router.choose("summarize", ["cheap", "pricey"], "budget")
    assert fallback.chosen == "pricey", fallback.explain()
    assert any(r.startswith("cheap excluded: STOP on agent:cheap") for r in fallback.reasons)


def test_stats_survive_kill_9_without_counting_twice(
    stack_settings: Settings,
    workers: Callable[[], Worker],
    readers: tuple[base.TopicReader, base.TopicReader],
    router: Router,
) -> None:
    settings = stack_settings
    producer = base.make_producer(settings)
    base.publish_policy(producer, settings, BudgetPolicy(scope="agent:other", limit_usd=Decimal(1)))
    worker = workers()
    worker.wait_ready()
    router.wait_for_stats(10)  # starts the router's stats listener
    for i in range(30):
        value = event("a", 7_000_001, 100 + i, ok=True, task_type="t")
        producer.produce(settings.topics.calls, key=b"a", value=value)
    assert producer.flush(10) == 0

    def calls_of_a() -> int:
        summary = router.stats.summary("agent:a", "t")
        return summary.calls if summary is not None else 0

    base.wait_for("30 calls in the stats", lambda: calls_of_a() == 30)
    worker.kill()
    # Garbage on the stats topic: the next worker's rebuild dead-letters it and goes on.
    base.send(producer, settings.topics.stats, b"junk", b'{"subject": "agent:a"}')
    # The next worker rebuilds from the stats topic; whatever it replays from the calls topic
    # is at or below the published offsets and is skipped.
    second = workers()
    second.wait_ready()
    producer.produce(
        settings.topics.calls, key=b"a", value=event("a", 7_000_001, 100, ok=False, task_type="t")
    )
    assert producer.flush(10) == 0
    base.wait_for("the 31st call in the stats", lambda: calls_of_a() == 31)
    summary = router.stats.summary("agent:a", "t")
    assert summary is not None
    assert (summary.calls, summary.successes) == (31, 30)
    assert summary.cost_nano_usd == 31 * 7_000_001
    _, dlq = readers
    [dead] = base.wait_for(
        "the junk stats record in the dlq",
        lambda: [
            m
            for _, value, _ in dlq.poll()
            if (m := InvalidMessage.model_validate_json(value)).topic == settings.topics.stats
        ],
    )
    assert dead.reason.startswith("not a valid TaskStats")


def test_the_demo_shows_routing_decisions(
    stack_settings: Settings, workers: Callable[[], Worker]
) -> None:
    producer = base.make_producer(stack_settings)
    base.publish_policy(
        producer, stack_settings, BudgetPolicy(scope="agent:other", limit_usd=Decimal(1))
    )
    workers().wait_ready()
    lines: list[str] = []
    assert run_routing_demo(stack_settings, "t1", lines.append), lines
    text = "\n".join(lines)
    # gpt-4o-mini is the cheaper model, the simulated gpt-4o agent the faster one.
    assert "budget   -> summarizer-mini-t1: summarizer-mini-t1 chosen: cheapest" in text, text
    assert "speed    -> summarizer-full-t1" in text, text
    assert "new task type -> insufficient_evidence" in text, text


def test_the_example_coordinator_runs_against_the_stack(
    stack_settings: Settings, workers: Callable[[], Worker]
) -> None:
    settings = stack_settings
    producer = base.make_producer(settings)
    base.publish_policy(producer, settings, BudgetPolicy(scope="agent:other", limit_usd=Decimal(1)))
    workers().wait_ready()
    env = dict(os.environ)
    env.update(
        {
            "AGENTLEDGER_KAFKA": settings.kafka,
            "AGENTLEDGER_TOPIC_PREFIX": settings.topic_prefix,
            "AGENTLEDGER_HOME": str(settings.home),
            "AGENTLEDGER_CONTROL_KEY": settings.control_key_bytes().decode(),
        }
    )
    example = Path(__file__).resolve().parents[2] / "examples" / "coordinator.py"

    def run(tasks: int) -> list[str]:
        done = subprocess.run(
            [sys.executable, str(example), "--tasks", str(tasks), "--mode", "budget"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stderr.splitlines()
        assert f"{tasks} of {tasks} tasks run" in lines, lines[-20:]
        return lines

    # First run: nothing is known, so each agent is learned with 10 tasks (the example's
    # min_samples); the cheaper one wins once both agents' stats have arrived.
    learning = run(60)
    assert any("insufficient evidence" in line for line in learning), learning[:20]
    assert sum("-> writer-mini: learning writer-mini" in line for line in learning) == 10
    with Ledger(settings) as ledger, Router(ledger) as router:
        router.wait_for_stats(10)

        def calls_of(agent: str) -> int:
            summary = router.stats.summary(f"agent:{agent}", "draft")
            return summary.calls if summary is not None else 0

        base.wait_for(
            "both agents' stats", lambda: min(calls_of("writer-mini"), calls_of("writer-4o")) >= 10
        )
    # A second coordinator starts from the published stats: cheapest per success at once.
    informed = run(10)
    chosen = [line for line in informed if "writer-mini chosen: cheapest per success" in line]
    # The router still explores writer-4o now and then (5% of decisions).
    assert len(chosen) >= 5, informed
