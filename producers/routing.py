"""The routing decision itself, pure: candidates with their stats and constraints in, a choice
with its reasons out. No Kafka, no clock, no global randomness (the caller injects both).

Modes, among the candidates that may take the task (no STOP or REFUSE_NEW_WORK standing for
their scopes, the expected cost within every reported remaining budget) and that have
evidence (at least ``min_samples`` calls, not older than ``max_age_ms``) with a success rate
at or above ``success_floor``:

- budget: the lowest cost per successful call (failed attempts included), then the lowest p50;
- speed: the lowest p50 latency, then the lowest cost;
- balanced: the lowest ``w * cost / best cost + (1 - w) * p50 / best p50``.

Throttled candidates rank after the others. Without any candidate with evidence the decision
says "insufficient evidence" and chooses nothing. Exploration: with probability
``explore_share`` an allowed candidate with thin evidence is chosen instead, so its stats
stay fresh; a blocked or over-budget candidate is never explored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from typing import Any, Protocol, TypeVar

from agentledger.schemas import StatsSummary, format_usd

__all__ = [
    "CandidateView",
    "DecisionStatus",
    "Evidence",
    "Mode",
    "RandomSource",
    "RoutingDecision",
    "RoutingPolicy",
    "decide",
]

T = TypeVar("T")


class Mode(StrEnum):
    BUDGET = "budget"
    SPEED = "speed"
    BALANCED = "balanced"


class DecisionStatus(StrEnum):
    CHOSEN = "chosen"
    EXPLORED = "explored"
    INSUFFICIENT_EVIDENCE = "insufficient_evidence"
    NONE_ALLOWED = "none_allowed"


class Evidence(StrEnum):
    ENOUGH = "enough"
    THIN = "thin"
    STALE = "stale"
    NONE = "none"


class RandomSource(Protocol):
    """``random.Random`` or a test's scripted stand-in."""

    def random(self) -> float: ...

    def choice(self, seq: Sequence[T]) -> T: ...


@dataclass(frozen=True)
class RoutingPolicy:
    min_samples: int = 20
    success_floor: Fraction = Fraction(9, 10)
    explore_share: Fraction = Fraction(1, 20)
    cost_weight: Fraction = Fraction(1, 2)
    """balanced mode: the weight of cost; latency gets the rest"""
    max_age_ms: int | None = 7 * 24 * 3600 * 1000

    def __post_init__(self) -> None:
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples!r}")
        for name in ("success_floor", "explore_share", "cost_weight"):
            value = getattr(self, name)
            if not isinstance(value, Fraction | Decimal | int) or not 0 <= value <= 1:
                raise ValueError(
                    f"{name} must be a Fraction, Decimal or int from 0 to 1 (never a float), "
                    f"got {value!r}"
                )
            object.__setattr__(self, name, Fraction(value))
        if self.max_age_ms is not None and self.max_age_ms <= 0:
            raise ValueError(f"max_age_ms must be None or > 0, got {self.max_age_ms!r}")


@dataclass(frozen=True)
class CandidateView:
    """One candidate as the router sees it: its stats and what stands against it."""

    name: str
    stats: StatsSummary | None
    blocked: tuple[str, ...] = ()
    """why it may not take the task (a STOP, a REFUSE_NEW_WORK, a routed-away model)"""
    throttled: tuple[str, ...] = ()
    remaining_nano_usd: int | None = None
    """the least budget left over its reported scopes; None when no scope reported a limit"""
    remaining_scope: str | None = None


@dataclass(frozen=True)
class CandidateReport:
    name: str
    allowed: bool
    evidence: Evidence
    reasons: tuple[str, ...]
    stats: dict[str, Any] | None


@dataclass(frozen=True)
class RoutingDecision:
    task_type: str | None
    mode: Mode
    status: DecisionStatus
    chosen: str | None
    reasons: tuple[str, ...]
    candidates: tuple[CandidateReport, ...] = field(default=())

    @property
    def stats_used(self) -> dict[str, dict[str, Any] | None]:
        return {c.name: c.stats for c in self.candidates}

    def explain(self) -> str:
        head = f"{self.mode.value} -> {self.chosen or '(none)'} [{self.status.value}]"
        return "; ".join([head, *self.reasons])


@dataclass
class _Scored:
    view: CandidateView
    evidence: Evidence
    reasons: list[str]
    allowed: bool = True
    qualified: bool = False


def _usd(nano: Fraction | int) -> str:
    return format_usd(math.ceil(nano))


def _evidence(view: CandidateView, policy: RoutingPolicy, now_ms: int) -> Evidence:
    stats = view.stats
    if stats is None or stats.samples == 0:
        return Evidence.NONE
    if stats.samples < policy.min_samples:
        return Evidence.THIN
    if policy.max_age_ms is not None and now_ms - stats.last_event_time_ms > policy.max_age_ms:
        return Evidence.STALE
    return Evidence.ENOUGH


def _assess(view: CandidateView, policy: RoutingPolicy, now_ms: int) -> _Scored:
    stats = view.stats
    scored = _Scored(view, _evidence(view, policy, now_ms), [])
    reasons = scored.reasons
    if view.blocked:
        scored.allowed = False
        reasons.extend(view.blocked)
    expected = stats.cost_per_success_nano if stats is not None else None
    if view.remaining_nano_usd is not None:
        left = view.remaining_nano_usd
        if left <= 0 or (expected is not None and expected > left):
            scored.allowed = False
            need = f"expected {_usd(expected)} per success" if expected is not None else "any"
            reasons.append(
                f"over budget: {need}, {_usd(max(left, 0))} left in {view.remaining_scope}"
            )
    if view.throttled:
        reasons.extend(view.throttled)
    if scored.evidence is Evidence.NONE:
        reasons.append("no stats yet")
    elif scored.evidence is Evidence.THIN:
        assert stats is not None
        reasons.append(f"thin evidence: {stats.samples} calls < {policy.min_samples}")
    elif scored.evidence is Evidence.STALE:
        reasons.append("stale evidence: no call within max_age_ms")
    if not scored.allowed or scored.evidence is not Evidence.ENOUGH:
        return scored
    assert stats is not None
    rate = stats.success_rate
    assert rate is not None
    if rate < policy.success_floor:
        reasons.append(
            f"success rate {float(rate):.1%} below the floor {float(policy.success_floor):.0%}"
        )
        return scored
    if stats.cost_per_success_nano is None or stats.p50_ms is None:
        reasons.append("cost unknown: no priced successful call")
        return scored
    scored.qualified = True
    return scored


def _rank_key(item: _Scored, mode: Mode) -> tuple[Any, ...]:
    stats = item.view.stats
    assert stats is not None
    cost = stats.cost_per_success_nano
    p50 = stats.p50_ms
    assert cost is not None and p50 is not None
    throttled = bool(item.view.throttled)
    if mode is Mode.BUDGET:
        return (throttled, cost, p50, item.view.name)
    if mode is Mode.SPEED:
        return (throttled, p50, cost, item.view.name)
    raise AssertionError("balanced mode ranks by score")


def _balanced_key(item: _Scored, weight: Fraction, best_cost: Fraction, best_p50: int) -> Any:
    stats = item.view.stats
    assert stats is not None
    cost = stats.cost_per_success_nano
    p50 = stats.p50_ms
    assert cost is not None and p50 is not None
    # +1 keeps the ratios defined for a free model or a 0 ms cache hit.
    score = weight * (cost + 1) / (best_cost + 1) + (1 - weight) * Fraction(p50 + 1, best_p50 + 1)
    return (bool(item.view.throttled), score, item.view.name)


def _report(item: _Scored) -> CandidateReport:
    stats = item.view.stats
    return CandidateReport(
        name=item.view.name,
        allowed=item.allowed,
        evidence=item.evidence,
        reasons=tuple(item.reasons),
        stats=stats.as_dict() if stats is not None else None,
    )


def _describe(item: _Scored) -> str:
    stats = item.view.stats
    assert stats is not None
    cost = stats.cost_per_success_nano
    rate = stats.success_rate
    assert cost is not None and rate is not None
    return (
        f"{item.view.name}: {_usd(cost)} per success, p50 {stats.p50_ms} ms, "
        f"p95 {stats.p95_ms} ms, success {float(rate):.1%} over {stats.samples} calls"
    )


def decide(
    task_type: str | None,
    candidates: Sequence[CandidateView],
    mode: Mode,
    policy: RoutingPolicy,
    now_ms: int,
    rng: RandomSource,
) -> RoutingDecision:
    if not candidates:
        raise ValueError("decide() needs at least one candidate")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidates must be distinct, got {names}")
    mode = Mode(mode)
    items = [_assess(c, policy, now_ms) for c in candidates]
    reports = tuple(_report(i) for i in items)
    reasons: list[str] = []
    for item in items:
        if not item.allowed:
            reasons.append(f"{item.view.name} excluded: {'; '.join(item.reasons)}")
    allowed = [i for i in items if i.allowed]
    qualified = [i for i in allowed if i.qualified]

    def result(status: DecisionStatus, chosen: str | None) -> RoutingDecision:
        return RoutingDecision(task_type, mode, status, chosen, tuple(reasons), reports)

    if not allowed:
        reasons.append("no candidate may take the task")
        return result(DecisionStatus.NONE_ALLOWED, None)

    best: _Scored | None = None
    if qualified:
        if mode is Mode.BALANCED:
            best_cost = min(_cost(i) for i in qualified)
            best_p50 = min(_p50(i) for i in qualified)
            ranked = sorted(
                qualified, key=lambda i: _balanced_key(i, policy.cost_weight, best_cost, best_p50)
            )
        else:
            ranked = sorted(qualified, key=lambda i: _rank_key(i, mode))
        best = ranked[0]

    thin = [i for i in allowed if i.evidence is not Evidence.ENOUGH and i is not best]
    if thin and policy.explore_share > 0 and Fraction(rng.random()) < policy.explore_share:
        pick = rng.choice(thin)
        reasons.append(
            f"exploring {pick.view.name} ({pick.evidence.value} evidence), "
            f"{float(policy.explore_share):.0%} of decisions keep alternatives' stats fresh"
        )
        return result(DecisionStatus.EXPLORED, pick.view.name)

    if best is None:
        thin_names = ", ".join(f"{i.view.name} ({'; '.join(i.reasons)})" for i in allowed)
        reasons.append(
            f"insufficient evidence: no allowed candidate has >= {policy.min_samples} recent "
            f"calls with success >= {float(policy.success_floor):.0%} and a known cost: "
            f"{thin_names}"
        )
        return result(DecisionStatus.INSUFFICIENT_EVIDENCE, None)

    why = {
        Mode.BUDGET: "cheapest per success above the success floor",
        Mode.SPEED: "fastest p50 within budget above the success floor",
        Mode.BALANCED: f"best of {float(policy.cost_weight):.0%} cost / "
        f"{float(1 - policy.cost_weight):.0%} latency",
    }[mode]
    reasons.insert(0, f"{best.view.name} chosen: {why}: {_describe(best)}")
    for item in qualified:
        if item is not best:
            reasons.append(f"alternative {_describe(item)}")
    if best.view.throttled:
        reasons.append(f"{best.view.name} is throttled but no unthrottled candidate qualifies")
    for item in items:
        if item.allowed and item.view.throttled and item is not best:
            reasons.append(f"{item.view.name} deprioritised: {'; '.join(item.view.throttled)}")
    return result(DecisionStatus.CHOSEN, best.view.name)


def _cost(item: _Scored) -> Fraction:
    stats = item.view.stats
    assert stats is not None and stats.cost_per_success_nano is not None
    return stats.cost_per_success_nano


def _p50(item: _Scored) -> int:
    stats = item.view.stats
    assert stats is not None and stats.p50_ms is not None
    return stats.p50_ms
