"""Graduated thresholds (BudgetPolicy v2): actions, alerts once per crossing, precedence,
RESUME at the period boundary, and v1 records still meaning 'stop at 100%'."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from agentledger.schemas import (
    AlertKind,
    BudgetPolicy,
    CallEvent,
    ControlAction,
    Period,
    Severity,
    parse_policy_file,
)
from agentledger.stream_processors.counting import apply_cost, apply_event
from agentledger.stream_processors.decisions import evaluate
from agentledger.stream_processors.periods import DAY_MS, period_window
from agentledger.stream_processors.state import SpendState


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


NOON = ms("2026-03-04T12:00:00")
DAY = period_window(Period.DAY, NOON)
USD = 1_000_000_000


def spent(nano: int, at_ms: int = NOON, state: SpendState | None = None) -> SpendState:
    state = state or SpendState()
    offset = state.applied.get(0, -1) + 1
    return apply_cost(
        state,
        event_id=None,
        event_time_ms=at_ms,
        cost_nano_usd=nano,
        partition=0,
        offset=offset,
        now_ms=at_ms,
    )


def book(*items: BudgetPolicy) -> dict[str, BudgetPolicy]:
    return {p.key: p for p in items}


def graduated(scope: str = "agent:r1", **extra: Any) -> BudgetPolicy:
    return BudgetPolicy.model_validate(
        {
            "scope": scope,
            "period": "day",
            "limit_usd": 5,
            "thresholds": [
                {"at_percent": 100, "action": "stop"},
                {"at_percent": 50, "action": "alert"},
                {"at_percent": 80, "action": "refuse_new_work"},
            ],
            **extra,
        }
    )


def settle(state: SpendState, policies: dict[str, BudgetPolicy], now: int) -> Any:
    """What the app does: evaluate, keep the alerted crossings and the published command."""
    decision = evaluate(state, policies, "agent:r1", now)
    state = replace(state, alerted=decision.alerted)
    if decision.command is not None:
        state = replace(state, last_command=decision.command)
    return state, decision


def test_thresholds_are_sorted_and_the_default_is_stop_at_100() -> None:
    policy = graduated()
    assert [t.at_percent for t in policy.thresholds] == [50, 80, 100]
    plain = BudgetPolicy.model_validate_json(
        '{"schema_version": 1, "scope": "agent:x", "limit_usd": "5"}'
    )
    assert [(t.at_percent, t.action) for t in plain.effective_thresholds] == [
        (Decimal(100), "stop")
    ]


def test_graduated_actions_alert_once_each_and_escalate() -> None:
    policies = book(graduated())
    state, decision = settle(spent(2 * USD), policies, NOON)
    assert (decision.command, decision.alerts) == (None, ())

    state, decision = settle(spent(USD // 2, state=state), policies, NOON)  # 50%
    assert decision.command is None
    [alert] = decision.alerts
    assert (alert.kind, alert.severity, alert.action) == (
        AlertKind.THRESHOLD,
        Severity.WARNING,
        "alert",
    )
    assert alert.spend_nano_usd == 2_500_000_000 and alert.limit_nano_usd == 5 * USD
    assert "reached 50% of its daily budget" in alert.message

    state, decision = settle(spent(USD + USD // 2, state=state), policies, NOON)  # 80%
    assert [a.action for a in decision.alerts] == ["refuse_new_work"]
    command = decision.command
    assert command is not None and command.action is ControlAction.REFUSE_NEW_WORK
    assert command.reason == ("agent:r1 spent $4.00 of $5.00 daily budget; at 80%: refuse new work")
    assert (command.period_start_ms, command.until_ms) == (DAY.start_ms, DAY.end_ms)

    # More spend under the same standing command: nothing new.
    state, decision = settle(spent(1, state=state), policies, NOON)
    assert (decision.command, decision.alerts) == (None, ())

    state, decision = settle(spent(USD, state=state), policies, NOON)  # 100%
    assert [a.severity for a in decision.alerts] == [Severity.CRITICAL]
    assert decision.command is not None and decision.command.action is ControlAction.STOP
    assert decision.command.reason == "agent:r1 spent $5.000000001 of $5.00 daily budget"

    # Next day: RESUME, and the crossings are forgotten so they alert again tomorrow.
    tomorrow = NOON + DAY_MS
    state, decision = settle(state, policies, tomorrow)
    assert decision.command is not None and decision.command.action is ControlAction.RESUME
    assert "period that was spent has ended" in decision.command.reason
    assert state.alerted == ()


def test_throttle_and_route_carry_their_params() -> None:
    throttle = BudgetPolicy.model_validate(
        {
            "scope": "agent:r1",
            "limit_usd": 1,
            "thresholds": [{"at_percent": 100, "action": "throttle:2"}],
        }
    )
    _, decision = settle(spent(USD), book(throttle), NOON)
    command = decision.command
    assert command is not None and command.action is ControlAction.THROTTLE
    assert command.params == {"concurrency": 2}
    assert command.reason.endswith("at 100%: throttle 2")

    route = BudgetPolicy.model_validate(
        {
            "scope": "agent:r1",
            "period": "week",
            "limit_usd": 1,
            "thresholds": [
                {"at_percent": 90, "action": "route:gpt-4o-mini", "from_model": "gpt-4o"}
            ],
        }
    )
    _, decision = settle(spent(USD), book(route), NOON)
    command = decision.command
    assert command is not None and command.action is ControlAction.ROUTE
    assert command.params == {"from": "gpt-4o", "to": "gpt-4o-mini"}
    assert command.until_ms == period_window(Period.WEEK, NOON).end_ms


def test_the_most_restraining_crossed_action_stands() -> None:
    route_week = BudgetPolicy.model_validate(
        {
            "scope": "agent:r1",
            "period": "week",
            "limit_usd": 1,
            "thresholds": [{"at_percent": 100, "action": "route:cheap"}],
        }
    )
    throttle_day = BudgetPolicy.model_validate(
        {
            "scope": "agent:r1",
            "limit_usd": 1,
            "thresholds": [
                {"at_percent": 50, "action": "throttle:4"},
                {"at_percent": 100, "action": "throttle:1"},
            ],
        }
    )
    _, decision = settle(spent(USD), book(route_week, throttle_day), NOON)
    command = decision.command
    assert command is not None and command.action is ControlAction.THROTTLE
    assert command.params == {"concurrency": 1}
    assert len(decision.alerts) == 3  # every crossing is alerted, whatever stands


def test_lowering_the_action_replaces_the_command_and_removal_resumes() -> None:
    policies = book(graduated())
    state, decision = settle(spent(5 * USD), policies, NOON)
    assert decision.command is not None and decision.command.action is ControlAction.STOP
    raised = book(graduated(limit_usd=6))  # 83%: refuse new work instead of stop
    state, decision = settle(state, raised, NOON + 1)
    assert decision.command is not None
    assert decision.command.action is ControlAction.REFUSE_NEW_WORK
    state, decision = settle(state, {}, NOON + 2)
    assert decision.command is not None and decision.command.action is ControlAction.RESUME
    assert "policy raised or removed" in decision.command.reason


def test_percent_comparison_is_exact() -> None:
    policy = BudgetPolicy.model_validate(
        {
            "scope": "agent:r1",
            "limit_usd": "0.000000003",  # 3 nano-USD
            "thresholds": [{"at_percent": "66.67", "action": "alert"}],
        }
    )
    # 2 / 3 = 66.666..% < 66.67%: no alert; 3 / 3 reaches it.
    assert evaluate(spent(2), book(policy), "agent:r1", NOON).alerts == ()
    assert len(evaluate(spent(3), book(policy), "agent:r1", NOON).alerts) == 1


@pytest.mark.parametrize(
    ("threshold", "problem"),
    [
        ({"at_percent": 0, "action": "stop"}, "at_percent"),
        ({"at_percent": 80, "action": "throttle:0"}, "action"),
        ({"at_percent": 80, "action": "route:"}, "action"),
        ({"at_percent": 80, "action": "explode"}, "action"),
        ({"at_percent": 80.123, "action": "alert"}, "at_percent"),
    ],
)
def test_bad_thresholds_are_named(threshold: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        BudgetPolicy.model_validate({"scope": "agent:x", "limit_usd": 1, "thresholds": [threshold]})


def test_duplicate_percent_is_rejected_with_its_line() -> None:
    text = (
        "budgets:\n"
        "  - scope: agent:researcher-1\n"
        "    limit_usd: 5\n"
        "    thresholds:\n"
        "      - {at_percent: 80, action: refuse_new_work}\n"
        "      - {at_percent: 80, action: stop}\n"
    )
    with pytest.raises(ValueError, match=r"policy.yaml:5: budgets.0.thresholds: .*once"):
        parse_policy_file(text, "policy.yaml")


def test_the_issue_example_file_parses() -> None:
    text = """
budgets:
  - scope: agent:researcher-1
    period: day
    limit_usd: 5
    thresholds:
      - {at_percent: 80, action: refuse_new_work}
      - {at_percent: 100, action: stop}
  - scope: pool:research
    period: week
    limit_usd: 100
    thresholds: [{at_percent: 100, action: "route:gpt-4o-mini"}]
  - scope: agent:*
    period: month
    limit_usd: 50.10
"""
    parsed = parse_policy_file(text).budgets
    assert [p.scope for p in parsed] == ["agent:researcher-1", "pool:research", "agent:*"]
    assert parsed[1].thresholds[0].params == {"from": "*", "to": "gpt-4o-mini"}
    assert parsed[2].period is Period.MONTH and parsed[2].limit_usd == Decimal("50.10")


def weekly_with_spike(action: str = "alert") -> BudgetPolicy:
    return BudgetPolicy.model_validate(
        {
            "scope": "agent:r1",
            "period": "week",
            "limit_usd": 10,
            "thresholds": [{"at_percent": 100, "action": "stop"}],
            "spike": {"window": "day", "at_percent": 20, "action": action},
        }
    )


def test_spike_alerts_on_a_fifth_of_the_weekly_budget_in_one_day() -> None:
    policies = book(weekly_with_spike())
    monday = ms("2026-03-02T12:00:00")
    # $1.50 on Monday and $1.50 on Tuesday: 30% of the week, but never 20% in one day.
    state = spent(USD + USD // 2, monday)
    state = spent(USD + USD // 2, NOON - DAY_MS, state)
    assert evaluate(state, policies, "agent:r1", NOON - DAY_MS).alerts == ()
    # $2 on Wednesday: a spike, alerted once, no command (the action is a plain alert).
    state = spent(2 * USD, NOON, state)
    state, decision = settle(state, policies, NOON)
    [alert] = decision.alerts
    assert alert.kind is AlertKind.SPIKE
    assert alert.spend_nano_usd == 2 * USD and alert.limit_nano_usd == 10 * USD
    assert alert.period_start_ms == DAY.start_ms
    assert "in one day" in alert.message
    assert decision.command is None
    assert settle(state, policies, NOON + 1)[1].alerts == ()


def test_spike_with_an_action_publishes_it_until_the_day_ends() -> None:
    policies = book(weekly_with_spike("throttle:1"))
    _, decision = settle(spent(2 * USD), policies, NOON)
    command = decision.command
    assert command is not None and command.action is ControlAction.THROTTLE
    assert command.until_ms == DAY.end_ms
    assert "(spike)" in command.reason


def test_spike_window_must_be_shorter_than_the_period() -> None:
    with pytest.raises(ValidationError, match=r"spike\.window"):
        BudgetPolicy.model_validate(
            {"scope": "agent:x", "limit_usd": 1, "spike": {"window": "day", "at_percent": 5}}
        )


def failed(task: str, at_ms: int, status: str = "error") -> CallEvent:
    return CallEvent(
        event_time_ms=at_ms,
        agent_id="r1",
        task_id=task,
        provider="openai",
        requested_model="gpt-4o",
        used_model="gpt-4o",
        cost_nano_usd=1,
        latency_ms=5,
        status=status,  # type: ignore[arg-type]
    )


def retry_policy(action: str = "stop") -> BudgetPolicy:
    return BudgetPolicy.model_validate(
        {
            "scope": "agent:*",
            "limit_usd": 1000,
            "retry_loop": {"max_failures": 3, "window_s": 60, "action": action},
        }
    )


def test_retry_loop_fires_on_more_than_n_failures_of_one_task_within_the_window() -> None:
    policies = book(retry_policy())
    state = SpendState()
    offset = 0

    def feed(item: CallEvent) -> None:
        nonlocal state, offset
        state = apply_event(state, item, 0, offset, now_ms=item.event_time_ms)
        offset += 1

    # 3 failures of task-a, one spread too far back, plus other tasks' and OK calls: no loop.
    feed(failed("task-a", NOON - 120_000))
    for n in range(2):
        feed(failed("task-a", NOON + n))
    feed(failed("task-b", NOON + 2))
    feed(failed("task-a", NOON + 3, "ok"))
    _, decision = settle(state, policies, NOON + 10)
    assert (decision.command, decision.alerts) == (None, ())

    for n in range(2):  # now 4 failures of task-a within 60 s
        feed(failed("task-a", NOON + 1_000 + n, "timeout"))
    state, decision = settle(state, policies, NOON + 2_000)
    [alert] = decision.alerts
    assert alert.kind is AlertKind.RETRY_LOOP and alert.severity is Severity.CRITICAL
    assert alert.details["task_id"] == "task-a" and alert.details["failures"] == 4
    command = decision.command
    assert command is not None and command.action is ControlAction.STOP
    assert command.until_ms == NOON + 1_001 + 60_000
    assert "4 failed attempts on task task-a within 60s" in command.reason
    assert settle(state, policies, NOON + 3_000)[1].alerts == ()

    # A window after the last failure the loop is over: RESUME.
    _, decision = settle(state, policies, NOON + 1_001 + 60_000)
    assert decision.command is not None and decision.command.action is ControlAction.RESUME


def test_retry_loop_only_on_agent_scopes() -> None:
    with pytest.raises(ValidationError, match="agent scopes only"):
        BudgetPolicy.model_validate(
            {"scope": "pool:p", "limit_usd": 1, "retry_loop": {"max_failures": 2}}
        )
