"""The example coordinator (examples/coordinator.py) on the router with in-memory control
state and stats: requeue away from stopped agents and to cheaper ones, defer tasks whose
agents are all throttled, careful (budget) mode under an alert."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from agentledger.config import Settings
from agentledger.producers.router import DecisionStatus
from agentledger.schemas import Alert, AlertKind, ControlAction
from tests.unit.test_router import (
    NEVER,
    NOW,
    Scripted,
    book_of,
    calls,
    command,
    make_router,
    workload,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "coordinator.py"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("coordinator_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


AGENTS = {"summarize": ["cheap", "pricey"]}


def test_a_task_meant_for_the_pricey_agent_is_requeued_to_the_cheap_one(
    example: ModuleType, tmp_path: Path
) -> None:
    coordinator = example.Coordinator(make_router(tmp_path, workload()), AGENTS)
    coordinator.submit("summarize", agent="pricey")
    coordinator.submit("summarize", agent="cheap")
    first, second = coordinator.next(), coordinator.next()
    assert (first.action, first.agent) == ("requeued", "cheap")
    assert (second.action, second.agent) == ("run", "cheap")
    assert coordinator.next() is None


def test_stopped_agents_lose_their_tasks(example: ModuleType, tmp_path: Path) -> None:
    router = make_router(tmp_path, workload(), command("agent:cheap", ControlAction.STOP))
    coordinator = example.Coordinator(router, AGENTS)
    coordinator.submit("summarize", agent="cheap")
    dispatch = coordinator.next()
    assert (dispatch.action, dispatch.agent) == ("requeued", "pricey")
    assert "STOP on agent:cheap" in " ".join(dispatch.decision.reasons)


def test_tasks_of_throttled_agents_are_deferred_then_dropped(
    example: ModuleType, tmp_path: Path
) -> None:
    throttle = command("task_type:summarize", ControlAction.THROTTLE, params={"concurrency": 1})
    coordinator = example.Coordinator(make_router(tmp_path, workload(), throttle), AGENTS)
    urgent = coordinator.submit("summarize", priority=0)
    later = coordinator.submit("summarize", priority=5)
    dispatch = coordinator.next()
    assert dispatch.task is urgent and dispatch.action == "deferred"
    # Pushed behind the task that was less urgent.
    assert coordinator.next().task is later
    actions = [coordinator.next().action for _ in range(2 * example.MAX_DEFERRALS)]
    assert actions.count("dropped") == 2 and len(coordinator) == 0


def test_an_alert_turns_a_speed_task_into_a_budget_one(example: ModuleType, tmp_path: Path) -> None:
    alerts = example.AlertWatcher(Settings(home=tmp_path), clock=lambda: NOW)  # not started
    coordinator = example.Coordinator(make_router(tmp_path, workload()), AGENTS, alerts)
    coordinator.submit("summarize", mode="speed")
    assert coordinator.next().agent == "pricey"
    alerts.note(
        Alert(
            kind=AlertKind.THRESHOLD,
            scope="task_type:summarize",
            message="80% of the daily budget",
            issued_at_ms=NOW - 1_000,
        )
    )
    coordinator.submit("summarize", mode="speed")
    careful = coordinator.next()
    assert careful.agent == "cheap" and careful.decision.mode.value == "budget"


def test_without_evidence_work_is_spread_to_learn(example: ModuleType, tmp_path: Path) -> None:
    router = make_router(tmp_path, workload(samples=4), rng=Scripted(*[0.999] * 4))
    coordinator = example.Coordinator(router, AGENTS)
    for _ in range(4):
        coordinator.submit("summarize")
    dispatches = [coordinator.next() for _ in range(4)]
    assert {d.decision.status for d in dispatches} == {DecisionStatus.INSUFFICIENT_EVIDENCE}
    assert sorted(d.agent for d in dispatches) == ["cheap", "cheap", "pricey", "pricey"]


def test_each_candidate_is_learned_with_min_samples_tasks_before_one_is_preferred(
    example: ModuleType, tmp_path: Path
) -> None:
    # pricey's stats arrived first (enough evidence), cheap's not yet: the router alone would
    # send everything to pricey; the coordinator first gives cheap its min_samples tasks.
    book = book_of(calls("pricey", 40, cost=1_000_000, latency=300, failures=0))
    router = make_router(tmp_path, book, rng=Scripted(*[NEVER] * 8), min_samples=5)
    coordinator = example.Coordinator(router, AGENTS)
    for _ in range(8):
        coordinator.submit("summarize")
    dispatches = [coordinator.next() for _ in range(8)]
    assert [d.agent for d in dispatches] == ["cheap"] * 5 + ["pricey"] * 3
    assert (
        dispatches[0]
        .describe()
        .endswith(
            "learning cheap: 1 of 5 tasks sent while its evidence is thin; router: "
            + dispatches[0].decision.reasons[0]
        )
    )
    assert dispatches[5].learning is None
    assert dispatches[5].decision.reasons[0].startswith("pricey chosen: cheapest per success")


def test_with_no_evidence_at_all_the_candidates_take_turns(
    example: ModuleType, tmp_path: Path
) -> None:
    router = make_router(tmp_path, book_of(), rng=Scripted(*[NEVER] * 6), min_samples=3)
    coordinator = example.Coordinator(router, AGENTS)
    for _ in range(6):
        coordinator.submit("summarize")
    dispatches = [coordinator.next() for _ in range(6)]
    assert sorted(d.agent for d in dispatches) == ["cheap"] * 3 + ["pricey"] * 3
    assert all(d.decision.status is DecisionStatus.INSUFFICIENT_EVIDENCE for d in dispatches)
