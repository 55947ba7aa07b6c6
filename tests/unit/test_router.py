"""The router's decisions without a broker: stats as the processor's aggregator publishes them,
commands as the control listener applies them (signed), an injected clock and random source.

The workload of issue 6: two agents can summarize; "cheap" costs a tenth of "pricey" with the
same success rate, and "pricey" is three times faster.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction
from typing import TypeVar

import pytest

from agentledger.config import Settings
from agentledger.producers import (
    ControlState,
    InMemoryTransport,
    Ledger,
    Router,
    RoutingPolicy,
    StatsBook,
)
from agentledger.producers.router import Candidate, DecisionStatus
from agentledger.producers.routing import CandidateView, Evidence, Mode, decide
from agentledger.schemas import CallEvent, CallStatus, ControlAction, ControlCommand, sign_command
from agentledger.stream_processors.stats import StatsAggregator
from tests.conftest import TEST_CONTROL_KEY

KEY = TEST_CONTROL_KEY.encode()
NOW = 1_790_000_000_000
T = TypeVar("T")


class Scripted:
    """A random source that returns the given draws and picks the first element."""

    def __init__(self, *draws: float) -> None:
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0)

    def choice(self, seq: Sequence[T]) -> T:
        return seq[0]


NEVER = 0.999  # a draw above every explore share used here


def calls(
    agent: str, n: int, cost: int, latency: int, failures: int = 1, task_type: str = "summarize"
) -> list[CallEvent]:
    """``n`` calls of ``agent``, the first ``failures`` of them failed."""
    return [
        CallEvent(
            event_id=uuid.uuid4(),
            event_time_ms=NOW - 60_000 + i,
            agent_id=agent,
            task_type=task_type,
            provider="openai",
            requested_model=f"{agent}-model",
            used_model=f"{agent}-model",
            cost_nano_usd=cost,
            latency_ms=latency + i % 7,
            status=CallStatus.ERROR if i < failures else CallStatus.OK,
        )
        for i in range(n)
    ]


def book_of(*streams: list[CallEvent]) -> StatsBook:
    """Stats as they reach a router: aggregated by the processor, sent as JSON records."""
    agg = StatsAggregator(clock=lambda: NOW)
    offset = 0
    for events in streams:
        for event in events:
            agg.observe(offset % 3, offset, event.model_dump_json().encode())
            offset += 1
    book = StatsBook()
    for record in agg.take_dirty():
        assert book.apply(record.model_dump_json().encode())
    return book


def workload(samples: int = 40) -> StatsBook:
    failures = samples // 20  # 95% success for both
    return book_of(
        calls("cheap", samples, cost=100_000, latency=900, failures=failures),
        calls("pricey", samples, cost=1_000_000, latency=300, failures=failures),
    )


def command(
    scope: str,
    action: ControlAction,
    *,
    spend: int | None = None,
    limit: int | None = None,
    params: dict[str, str | int] | None = None,
    key: bytes = KEY,
) -> bytes:
    cmd = ControlCommand(
        scope=scope,
        action=action,
        reason=f"{action.value} for the test",
        params=params or {},
        spend_nano_usd=spend,
        limit_nano_usd=limit,
        issued_at_ms=NOW - 1_000,
    )
    return sign_command(cmd, key).model_dump_json().encode()


def make_router(
    tmp_path: object,
    book: StatsBook,
    *commands: bytes,
    rng: Scripted | None = None,
    **policy: object,
) -> Router:
    control = ControlState(KEY)
    for raw in commands:
        control.apply(raw)
    ledger = Ledger(
        Settings(home=tmp_path),  # type: ignore[arg-type]
        transport=InMemoryTransport(),
        control=control,
        clock=lambda: NOW,
        start_control_listener=False,
    )
    return Router(
        ledger,
        policy=RoutingPolicy(**policy),  # type: ignore[arg-type]
        stats=book,
        rng=rng or Scripted(NEVER),
        start_listener=False,
    )


CANDIDATES = ["cheap", "pricey"]


def test_budget_mode_picks_the_ten_times_cheaper_agent(tmp_path: object) -> None:
    decision = make_router(tmp_path, workload()).choose("summarize", CANDIDATES, "budget")
    assert decision.status is DecisionStatus.CHOSEN and decision.chosen == "cheap"
    assert decision.reasons[0].startswith("cheap chosen: cheapest per success")
    used = decision.stats_used
    assert used["cheap"] is not None and used["pricey"] is not None
    # 40 calls at $0.0001 for 38 successes, exactly.
    assert used["cheap"]["cost_per_success_usd"] == "0.000105263158"
    assert used["cheap"]["success_rate"] == used["pricey"]["success_rate"] == "0.9500"
    assert used["pricey"]["samples"] == 40
    assert any(r.startswith("alternative pricey") for r in decision.reasons)


def test_speed_mode_picks_the_faster_agent(tmp_path: object) -> None:
    decision = make_router(tmp_path, workload()).choose("summarize", CANDIDATES, Mode.SPEED)
    assert decision.chosen == "pricey"
    stats = decision.stats_used
    assert stats["pricey"] is not None and stats["cheap"] is not None
    assert stats["pricey"]["p50_ms"] < stats["cheap"]["p50_ms"]
    assert "fastest p50" in decision.reasons[0]


def test_balanced_mode_weighs_cost_against_latency(tmp_path: object) -> None:
    book = workload()
    # Half and half: 10x the cost outweighs 3x the latency.
    assert make_router(tmp_path, book).choose("summarize", CANDIDATES, "balanced").chosen == "cheap"
    latency_only = make_router(tmp_path, book, cost_weight=Fraction(0))
    assert latency_only.choose("summarize", CANDIDATES, "balanced").chosen == "pricey"
    cost_heavy = make_router(tmp_path, book, cost_weight=Decimal("0.9"))
    assert cost_heavy.choose("summarize", CANDIDATES, "balanced").chosen == "cheap"


def test_a_signed_stop_on_the_cheap_agent_makes_budget_mode_fall_back(tmp_path: object) -> None:
    stop = command("agent:cheap", ControlAction.STOP)
    decision = make_router(tmp_path, workload(), stop).choose("summarize", CANDIDATES)
    assert decision.chosen == "pricey"
    assert "cheap excluded: STOP on agent:cheap: stop for the test" in decision.reasons
    [cheap] = [c for c in decision.candidates if c.name == "cheap"]
    assert not cheap.allowed and cheap.stats is not None  # its stats are still reported


def test_a_forged_stop_is_ignored(tmp_path: object) -> None:
    forged = command("agent:cheap", ControlAction.STOP, key=b"not-the-key-0123456789abcdef")
    assert make_router(tmp_path, workload(), forged).choose("summarize", CANDIDATES).chosen == (
        "cheap"
    )


@pytest.mark.parametrize(
    ("scope", "action"),
    [
        ("agent:cheap", ControlAction.REFUSE_NEW_WORK),
        ("pool:batch", ControlAction.STOP),
        ("task_type:summarize", ControlAction.STOP),
    ],
)
def test_refusing_and_pool_or_task_type_scopes_exclude(
    tmp_path: object, scope: str, action: ControlAction
) -> None:
    router = make_router(tmp_path, workload(), command(scope, action))
    candidates = [Candidate("cheap", pool="batch"), Candidate("pricey")]
    decision = router.choose("summarize", candidates)
    if scope.startswith("task_type"):
        # Stops both: nobody may take a summarize task.
        assert decision.status is DecisionStatus.NONE_ALLOWED and decision.chosen is None
    else:
        assert decision.chosen == "pricey"


def test_a_throttled_candidate_is_deprioritised(tmp_path: object) -> None:
    throttle = command("agent:cheap", ControlAction.THROTTLE, params={"concurrency": 2})
    decision = make_router(tmp_path, workload(), throttle).choose("summarize", CANDIDATES)
    assert decision.chosen == "pricey"
    assert "cheap deprioritised: throttled to 2 concurrent calls on agent:cheap" in decision.reasons
    # Throttled but alone: still chosen, and said so.
    alone = make_router(tmp_path, workload(), throttle).choose("summarize", ["cheap"])
    assert alone.chosen == "cheap"
    assert any("throttled but no unthrottled" in r for r in alone.reasons)


def test_thin_evidence_is_stated_instead_of_guessed(tmp_path: object) -> None:
    decision = make_router(tmp_path, workload(samples=5)).choose("summarize", CANDIDATES)
    assert decision.status is DecisionStatus.INSUFFICIENT_EVIDENCE
    assert decision.chosen is None
    assert "insufficient evidence" in decision.reasons[-1]
    assert "thin evidence: 5 calls < 20" in decision.reasons[-1]
    assert {c.evidence for c in decision.candidates} == {Evidence.THIN}
    # No stats at all for a new candidate.
    unknown = make_router(tmp_path, StatsBook()).choose("summarize", ["new-agent"])
    assert unknown.status is DecisionStatus.INSUFFICIENT_EVIDENCE
    assert "no stats yet" in unknown.reasons[-1]


def test_only_candidates_with_evidence_are_ranked(tmp_path: object) -> None:
    book = book_of(
        calls("cheap", 5, cost=100_000, latency=900, failures=0),
        calls("pricey", 40, cost=1_000_000, latency=300, failures=2),
    )
    decision = make_router(tmp_path, book).choose("summarize", CANDIDATES, "budget")
    assert decision.chosen == "pricey"
    [cheap] = [c for c in decision.candidates if c.name == "cheap"]
    assert cheap.evidence is Evidence.THIN and cheap.allowed


def test_stale_evidence_counts_as_thin(tmp_path: object) -> None:
    router = make_router(tmp_path, workload(), max_age_ms=1_000)
    decision = router.choose("summarize", CANDIDATES)
    assert decision.status is DecisionStatus.INSUFFICIENT_EVIDENCE
    assert "stale evidence" in decision.reasons[-1]


def test_success_floor_excludes_a_cheap_agent_that_fails(tmp_path: object) -> None:
    book = book_of(
        calls("cheap", 40, cost=100_000, latency=900, failures=20),
        calls("pricey", 40, cost=1_000_000, latency=300, failures=2),
    )
    decision = make_router(tmp_path, book).choose("summarize", CANDIDATES, "budget")
    assert decision.chosen == "pricey"
    [cheap] = [c for c in decision.candidates if c.name == "cheap"]
    assert "success rate 50.0% below the floor 90%" in cheap.reasons
    lenient = make_router(tmp_path, book, success_floor=Decimal("0.4"))
    assert lenient.choose("summarize", CANDIDATES, "budget").chosen == "cheap"


def test_exploration_picks_a_thin_alternative_at_the_configured_share(tmp_path: object) -> None:
    book = book_of(
        calls("cheap", 40, cost=100_000, latency=900, failures=2),
        calls("pricey", 3, cost=1_000_000, latency=300, failures=0),
    )
    explored = make_router(tmp_path, book, rng=Scripted(0.01)).choose("summarize", CANDIDATES)
    assert explored.status is DecisionStatus.EXPLORED and explored.chosen == "pricey"
    assert explored.reasons[-1].startswith("exploring pricey (thin evidence)")
    # A draw above the share (5% by default) exploits.
    exploited = make_router(tmp_path, book, rng=Scripted(0.06)).choose("summarize", CANDIDATES)
    assert exploited.status is DecisionStatus.CHOSEN and exploited.chosen == "cheap"
    # Exploration off.
    off = make_router(tmp_path, book, rng=Scripted(0.0), explore_share=0)
    assert off.choose("summarize", CANDIDATES).chosen == "cheap"


def test_exploration_never_picks_a_stopped_or_over_budget_candidate(tmp_path: object) -> None:
    book = book_of(
        calls("cheap", 40, cost=100_000, latency=900, failures=2),
        calls("pricey", 3, cost=1_000_000, latency=300, failures=0),
    )
    stop = command("agent:pricey", ControlAction.STOP)
    stopped = make_router(tmp_path, book, stop, rng=Scripted(0.0)).choose("summarize", CANDIDATES)
    assert stopped.chosen == "cheap" and stopped.status is DecisionStatus.CHOSEN
    # $0.0005 left on pricey's budget, a pricey call costs $0.001: not explored either.
    report = command(
        "agent:pricey",
        ControlAction.ROUTE,
        spend=9_999_500_000,
        limit=10_000_000_000,
        params={"from": "x", "to": "y"},
    )
    tight = make_router(tmp_path, book, report, rng=Scripted(0.0)).choose("summarize", CANDIDATES)
    assert tight.chosen == "cheap" and tight.status is DecisionStatus.CHOSEN
    assert any("over budget: expected $0.001 per success" in r for r in tight.reasons)


def test_speed_mode_stays_within_the_remaining_budget(tmp_path: object) -> None:
    report = command(
        "pool:batch",
        ControlAction.THROTTLE,
        spend=4_999_500_000,
        limit=5_000_000_000,
        params={"concurrency": 50},
    )
    router = make_router(tmp_path, workload(), report)
    candidates = [Candidate("cheap", pool="batch"), Candidate("pricey", pool="batch")]
    decision = router.choose("summarize", candidates, "speed")
    assert decision.chosen == "cheap"
    [pricey] = [c for c in decision.candidates if c.name == "pricey"]
    assert "over budget: expected $0.001052632 per success, $0.0005 left in pool:batch" in (
        pricey.reasons
    )


def test_model_candidates_honour_the_callers_scopes_and_routes(tmp_path: object) -> None:
    book = workload()  # model stats exist too: cheap-model, pricey-model
    route = command(
        "pool:research", ControlAction.ROUTE, params={"from": "pricey-model", "to": "cheap-model"}
    )
    router = make_router(tmp_path, book, route)
    caller = router.ledger.agent("planner", pool="research")
    models = ["cheap-model", "pricey-model"]
    decision = router.choose("summarize", models, "speed", kind="model", caller=caller)
    assert decision.chosen == "cheap-model"
    assert any("ROUTE on pool:research sends pricey-model calls" in r for r in decision.reasons)
    free = make_router(tmp_path, book).choose("summarize", models, "speed", kind="model")
    assert free.chosen == "pricey-model"


def test_bad_arguments_name_the_problem(tmp_path: object) -> None:
    router = make_router(tmp_path, workload())
    with pytest.raises(ValueError, match="mode must be one of budget, speed, balanced"):
        router.choose("summarize", CANDIDATES, "cheapest")
    with pytest.raises(ValueError, match="task_type must be"):
        router.choose("has space", CANDIDATES)
    with pytest.raises(ValueError, match="agent id must be"):
        router.choose("summarize", ["ok", "not ok"])
    with pytest.raises(ValueError, match="distinct"):
        router.choose("summarize", ["cheap", "cheap"])
    with pytest.raises(ValueError, match="explore_share must be a Fraction"):
        RoutingPolicy(explore_share=0.05)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_samples must be >= 1"):
        RoutingPolicy(min_samples=0)
    with pytest.raises(ValueError, match="at least one candidate"):
        decide("t", [], Mode.BUDGET, RoutingPolicy(), NOW, Scripted())


def test_decide_is_pure_over_views() -> None:
    views = [CandidateView("x", None), CandidateView("y", None, blocked=("STOP on agent:y: z",))]
    decision = decide("t", views, Mode.SPEED, RoutingPolicy(), NOW, Scripted(NEVER))
    assert decision.status is DecisionStatus.INSUFFICIENT_EVIDENCE
    assert decision.reasons[0] == "y excluded: STOP on agent:y: z; no stats yet"
    assert "speed -> (none) [insufficient_evidence]" in decision.explain()
