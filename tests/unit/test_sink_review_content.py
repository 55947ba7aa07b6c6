"""Escalation failures and budget forecasts in the review: on real chDB, against an
independent recomputation from the events in Python, plus the pure projection rules."""

from __future__ import annotations

import itertools
import re
import uuid
from fractions import Fraction
from typing import Any

import pytest
from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.review.escalation import Escalations, model_ranks
from agentledger.review.forecast import BudgetLine, forecast_budgets
from agentledger.review.insights import build_review
from agentledger.review.query import QueryClient, QueryResult
from agentledger.schemas import CallEvent, CallStatus
from agentledger.sinks.database import ClickHouse
from agentledger.sinks.rows import SourcePosition, call_to_row
from agentledger.sinks.store import SinkTables
from agentledger.sinks.streams import calls_stream

DAY = 86_400_000
HOUR = 3_600_000
T0 = 1_735_689_600_000  # 2025-01-01T00:00:00Z


class LocalClient(QueryClient):
    def __init__(self, db: ClickHouse) -> None:
        self.db = db

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        return self.db.readonly_query(sql, parameters)


# Per token: small 1, mid 5, big 20 nano-USD (each call has 1,000 tokens).
PRICE = {"small": 1_000, "mid": 5_000, "big": 20_000}


def workload() -> list[CallEvent]:
    events: list[CallEvent] = []
    n = 0

    def call(agent: str, task: str, attempt: int, model: str, ok: bool, t: int) -> None:
        nonlocal n
        n += 1
        events.append(
            CallEvent(
                event_id=uuid.UUID(int=n),
                event_time_ms=t,
                agent_id=agent,
                pool="p1" if agent != "solo" else "p2",
                task_type="code",
                task_id=task,
                provider="x",
                requested_model=model,
                used_model=model,
                input_tokens=900,
                output_tokens=100,
                cost_nano_usd=PRICE[model] + attempt,  # distinct costs catch mixed-up rows
                latency_ms=100,
                status=CallStatus.OK if ok else CallStatus.ERROR,
                attempt=attempt,
            )
        )

    t = T0 + HOUR
    # 'esc': small fails, big fails too (failed escalation) - twice; small fails, big rescues
    # (an escalation that worked); small succeeds and big runs anyway (needless); big fails
    # then small (a step down: not an escalation); small fails twice (no escalation).
    for i in range(2):
        call("esc", f"f{i}", 1, "small", False, t + i)
        call("esc", f"f{i}", 2, "big", False, t + 10 + i)
    call("esc", "r", 1, "small", False, t + 20)
    call("esc", "r", 2, "mid", True, t + 21)
    call("esc", "n", 1, "small", True, t + 30)
    call("esc", "n", 2, "big", True, t + 31)
    call("esc", "d", 1, "big", False, t + 40)
    call("esc", "d", 2, "small", True, t + 41)
    call("esc", "s", 1, "small", False, t + 50)
    call("esc", "s", 2, "small", False, t + 51)
    # small -> mid (failed) -> big (failed): two failed escalations in one task.
    call("esc", "chain", 1, "small", False, t + 60)
    call("esc", "chain", 2, "mid", False, t + 61)
    call("esc", "chain", 3, "big", False, t + 62)
    # 'solo' in pool p2 spends on big only.
    for i in range(4):
        call("solo", f"s{i}", 1, "big", True, T0 + 2 * HOUR + i)
    # Previous day: 'esc' had one needless escalation.
    call("esc", "old", 1, "small", True, T0 - HOUR)
    call("esc", "old", 2, "big", True, T0 - HOUR + 1)
    return events


def load(db: ClickHouse, events: list[CallEvent]) -> None:
    rows = [call_to_row(e, SourcePosition("x.calls", 0, i), 0) for i, e in enumerate(events)]
    stream = calls_stream(Settings(topic_prefix="x.", control_key=SecretStr("k" * 32)))
    SinkTables(db).insert(stream, rows, f"x.calls:0:0-{len(rows) - 1}")


def recompute_escalations(
    events: list[CallEvent], since: int, until: int
) -> dict[str, Escalations]:
    """Straight from the definition, over Python objects."""
    totals: dict[str, tuple[int, int]] = {}
    for e in events:
        c, tok = totals.get(e.used_model, (0, 0))
        totals[e.used_model] = (c + e.cost_nano_usd, tok + e.input_tokens + e.output_tokens)
    rate = {m: Fraction(c, tok) for m, (c, tok) in totals.items()}
    tasks: dict[tuple[str, str], list[CallEvent]] = {}
    for e in events:
        if e.task_id is not None:
            tasks.setdefault((e.agent_id, e.task_id), []).append(e)
    found: dict[str, list[int]] = {}
    for (agent, _task), calls in tasks.items():
        calls.sort(key=lambda e: (e.attempt, e.event_time_ms))
        for before, after in itertools.pairwise(calls):
            if not since <= after.event_time_ms < until:
                continue
            if rate[after.used_model] <= rate[before.used_model]:
                continue
            acc = found.setdefault(agent, [0, 0, 0, 0, 0])
            acc[0] += 1
            if before.status != CallStatus.OK and after.status != CallStatus.OK:
                acc[1] += 1
                acc[2] += after.cost_nano_usd
            if before.status == CallStatus.OK:
                acc[3] += 1
                acc[4] += after.cost_nano_usd
    return {agent: Escalations(*acc) for agent, acc in found.items()}


def test_escalations_match_an_independent_recomputation(db: ClickHouse) -> None:
    events = workload()
    load(db, events)
    review = build_review(LocalClient(db), T0, T0 + DAY, by="agent")
    assert review.escalations == recompute_escalations(events, T0, T0 + DAY)
    assert review.previous_escalations == recompute_escalations(events, T0 - DAY, T0)
    esc = review.escalations["esc"]
    # f0, f1 and chain's big call after failed mid, chain's mid after failed small; r; n.
    assert (esc.escalated, esc.failed, esc.needless) == (6, 4, 1)
    assert esc.needless_cost_nano_usd == PRICE["big"] + 2
    assert review.previous_escalations["esc"].needless == 1


def test_model_ranks_are_by_exact_cost_per_token() -> None:
    ranks = model_ranks({"a": (3, 1), "b": (1, 3), "c": (6, 2), "free": (0, 5), "none": (5, 0)})
    assert ranks == {"b": 2, "a": 3, "c": 3, "free": 1}


def test_budget_forecast_in_the_review_matches_the_events(db: ClickHouse) -> None:
    events = workload()
    load(db, events)
    as_of = T0 + 6 * HOUR
    budgets = [
        BudgetLine("agent:esc", "day", T0, T0 + DAY, 100_000),
        BudgetLine("agent:*", "day", T0, T0 + DAY, 50_000),
        BudgetLine("pool:p2", "day", T0, T0 + DAY, 1_000_000),
        BudgetLine("agent:esc", "week", T0 - 2 * DAY, T0 + 5 * DAY, 10_000_000),
    ]
    review = build_review(LocalClient(db), T0, as_of, by="agent", budgets=budgets)
    spent_today = {
        a: sum(e.cost_nano_usd for e in events if e.agent_id == a and e.event_time_ms >= T0)
        for a in ("esc", "solo")
    }
    got = {(f.scope, f.period): f for f in review.budgets}
    # 'agent:*' expands to solo only: esc has an exact day budget.
    assert set(got) == {
        ("agent:esc", "day"),
        ("agent:solo", "day"),
        ("pool:p2", "day"),
        ("agent:esc", "week"),
    }
    esc_day = got[("agent:esc", "day")]
    assert esc_day.spent_nano_usd == spent_today["esc"]
    assert esc_day.forecast_nano_usd == spent_today["esc"] * 4  # 6 h of 24 h
    assert esc_day.over
    assert got[("agent:solo", "day")].spent_nano_usd == spent_today["solo"]
    assert got[("pool:p2", "day")].spent_nano_usd == spent_today["solo"]
    week = got[("agent:esc", "week")]
    spent_week = sum(e.cost_nano_usd for e in events if e.agent_id == "esc")
    assert week.spent_nano_usd == spent_week
    assert week.forecast_nano_usd == spent_week * (7 * DAY) // (2 * DAY + 6 * HOUR)
    shares = [f.forecast_nano_usd / f.limit_nano_usd for f in review.budgets]
    assert shares == sorted(shares, reverse=True)


def test_forecast_rules_without_a_database() -> None:
    def spend(dimension: str, lo: int, hi: int) -> dict[str, int]:
        assert dimension == "agent"
        return {"a": 300, "b": 0} if hi > lo else {}

    over = forecast_budgets(spend, [BudgetLine("agent:a", "day", 0, 100, 1_000)], as_of_ms=250)
    # The period is over: the forecast is what was spent.
    assert (over[0].spent_nano_usd, over[0].forecast_nano_usd) == (300, 300)
    early = forecast_budgets(spend, [BudgetLine("agent:a", "day", 0, 100, 1_000)], as_of_ms=30)
    assert early[0].forecast_nano_usd == 1_000  # 300 * 100 // 30
    assert not early[0].over
    nothing = forecast_budgets(spend, [BudgetLine("agent:b", "day", 0, 100, 10)], as_of_ms=50)
    assert nothing[0].forecast_nano_usd == 0


@pytest.mark.parametrize(
    ("scope", "start", "end", "limit", "match"),
    [
        ("user:a", 0, 1, 1, "scope"),
        ("agent:", 0, 1, 1, "scope"),
        ("agent:a", 5, 5, 1, "end after"),
        ("agent:a", 0, 1, 0, "positive"),
    ],
)
def test_budget_lines_are_checked(scope: str, start: int, end: int, limit: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BudgetLine(scope, "day", start, end, limit)


def test_the_text_review_shows_escalations_and_budget_forecasts(db: ClickHouse) -> None:
    from agentledger.review_report import render_review

    load(db, workload())
    budgets = [BudgetLine("agent:esc", "day", T0, T0 + DAY, 100_000)]
    text = render_review(build_review(LocalClient(db), T0, T0 + 6 * HOUR, budgets=budgets))
    # esc: 6 escalations (1 before), 4 failed (0 before), 1 needless (1 before).
    assert re.search(r"^esc\s+6 \(1\)\s+4 \(0\)\s+\S+\s+1 \(1\)\s", text, re.M), text
    assert re.search(r"^agent:esc\s+day\s.*\s\d+%\s+OVER$", text, re.M), text


def test_budget_lines_from_policies_use_the_policy_period_and_timezone() -> None:
    from agentledger.review_report import budget_lines
    from agentledger.schemas import BudgetPolicy

    policies = [
        BudgetPolicy.model_validate(p)
        for p in (
            {"scope": "agent:esc", "period": "day", "limit_usd": "2.5"},
            {"scope": "pool:*", "period": "week", "limit_usd": "10", "timezone": "Europe/Paris"},
            {"scope": "agent:a", "period": "rolling", "window": "24h", "limit_usd": "1"},
            {"scope": "workflow:w", "period": "run", "limit_usd": "1"},
        )
    ]
    as_of = T0 + 6 * HOUR  # Wednesday 2025-01-01 06:00 UTC
    lines = budget_lines(policies, as_of)
    assert lines == [
        BudgetLine("agent:esc", "day", T0, T0 + DAY, 2_500_000_000),
        # Monday 2024-12-30 00:00 in Paris is 2024-12-29 23:00 UTC.
        BudgetLine("pool:*", "week", T0 - 2 * DAY - HOUR, T0 + 5 * DAY - HOUR, 10_000_000_000),
        BudgetLine("agent:a", "rolling:24h", as_of - DAY, as_of, 1_000_000_000),
    ]
