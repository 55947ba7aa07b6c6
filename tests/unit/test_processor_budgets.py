"""The processor's pure core: exact spend per period, idempotent replay, STOP/RESUME decisions."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentledger.schemas import (
    BudgetPolicy,
    CallEvent,
    ControlAction,
    ControlCommand,
    Period,
    format_usd,
    sign_command,
    verify_command,
)
from agentledger.stream_processors.counting import KEEP_PERIODS_MS, apply_event
from agentledger.stream_processors.decisions import decide
from agentledger.stream_processors.periods import DAY_MS, period_window
from agentledger.stream_processors.report import spend_report
from agentledger.stream_processors.state import SpendState
from agentledger.stream_processors.state_codec import state_from_json, state_to_json

KEY = b"unit-test-control-key-0123456789"


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


class FakeClock:
    """An injected clock the test moves by hand."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def call(cost: int, at_ms: int, agent: str = "x") -> CallEvent:
    return CallEvent(
        event_time_ms=at_ms,
        agent_id=agent,
        provider="openai",
        requested_model="gpt-4o",
        used_model="gpt-4o",
        cost_nano_usd=cost,
        latency_ms=10,
    )


def policies(*items: BudgetPolicy) -> dict[str, BudgetPolicy]:
    return {p.key: p for p in items}


DAILY_5 = BudgetPolicy(scope="agent:x", period=Period.DAY, limit_usd=Decimal("5.00"))
LIMIT = 5_000_000_000
WED_NOON = ms("2026-03-04T12:00:00")
WED = period_window(Period.DAY, WED_NOON)


def feed(state: SpendState, costs: list[int], at_ms: int, clock: FakeClock) -> SpendState:
    start = max(state.applied.get(0, -1) + 1, 0)
    for offset, cost in enumerate(costs, start=start):
        state = apply_event(state, call(cost, at_ms), 0, offset, now_ms=clock())
    return state


def publish(state: SpendState, command: ControlCommand | None) -> SpendState:
    """What the app does after deciding: sign, publish, remember."""
    assert command is not None
    signed = sign_command(command, KEY)
    return SpendState(state.applied, state.periods, signed, state.partition)


def test_events_sum_exactly_into_their_day_and_week() -> None:
    clock = FakeClock(WED_NOON)
    state = feed(SpendState(), [1, 2_000_000_001, 3], WED_NOON, clock)
    week = period_window(Period.WEEK, WED_NOON)
    month = period_window(Period.MONTH, WED_NOON)
    assert state.periods == {
        WED.key: 2_000_000_005,
        week.key: 2_000_000_005,
        month.key: 2_000_000_005,
    }
    assert state.applied == {0: 2}
    assert state.partition == 0


def test_no_stop_below_the_limit_and_stop_at_exactly_the_limit() -> None:
    clock = FakeClock(WED_NOON)
    state = feed(SpendState(), [LIMIT - 1], WED_NOON, clock)
    assert decide(state, policies(DAILY_5), "agent:x", clock()) is None

    state = feed(state, [1], WED_NOON, clock)
    command = decide(state, policies(DAILY_5), "agent:x", clock())
    assert command is not None
    assert command.action is ControlAction.STOP
    assert command.scope == "agent:x"
    assert command.spend_nano_usd == LIMIT
    assert command.limit_nano_usd == LIMIT
    assert command.period_start_ms == WED.start_ms
    assert command.until_ms == WED.end_ms
    assert command.issued_at_ms == WED_NOON
    assert command.reason == "agent:x spent $5.00 of $5.00 daily budget"


def test_stop_is_published_once_while_it_stands() -> None:
    clock = FakeClock(WED_NOON)
    state = feed(SpendState(), [LIMIT + 10_000_000], WED_NOON, clock)
    state = publish(state, decide(state, policies(DAILY_5), "agent:x", clock()))
    state = feed(state, [123], WED_NOON, clock)
    clock.now_ms += 3_600_000
    assert decide(state, policies(DAILY_5), "agent:x", clock()) is None


def test_duplicate_offsets_are_not_counted_twice() -> None:
    clock = FakeClock(WED_NOON)
    state = feed(SpendState(), [100, 200, 300], WED_NOON, clock)
    replayed = state
    for offset, cost in enumerate([100, 200, 300]):
        again = apply_event(replayed, call(cost, WED_NOON), 0, offset, now_ms=clock())
        assert again is replayed
    assert state.periods[WED.key] == 600
    # Offsets are per partition: the same number on another partition is a new event.
    other = apply_event(state, call(5, WED_NOON), 1, 0, now_ms=clock())
    assert other.periods[WED.key] == 605
    assert other.applied == {0: 2, 1: 0}


def test_new_day_resumes_a_standing_stop() -> None:
    clock = FakeClock(WED_NOON)
    state = feed(SpendState(), [LIMIT], WED_NOON, clock)
    state = publish(state, decide(state, policies(DAILY_5), "agent:x", clock()))

    clock.now_ms = WED.end_ms - 1
    assert decide(state, policies(DAILY_5), "agent:x", clock()) is None

    clock.now_ms = WED.end_ms
    resume = decide(state, policies(DAILY_5), "agent:x", clock())
    assert resume is not None
    assert resume.action is ControlAction.RESUME
    assert "new period" in resume.reason
    state = publish(state, resume)
    assert decide(state, policies(DAILY_5), "agent:x", clock()) is None


def test_late_event_counts_in_its_own_day_not_today() -> None:
    thursday_noon = WED_NOON + DAY_MS
    clock = FakeClock(thursday_noon)
    state = feed(SpendState(), [LIMIT - 1], thursday_noon, clock)
    # A call made on Wednesday, delivered on Thursday.
    state = feed(state, [7_000_000_000], WED_NOON, clock)
    thursday = period_window(Period.DAY, thursday_noon)
    assert state.periods[thursday.key] == LIMIT - 1
    assert state.periods[WED.key] == 7_000_000_000
    assert decide(state, policies(DAILY_5), "agent:x", clock()) is None


def test_weekly_budget_stops_until_monday() -> None:
    weekly = BudgetPolicy(scope="agent:x", period=Period.WEEK, limit_usd=Decimal("10"))
    clock = FakeClock(WED_NOON)
    monday = ms("2026-03-02T09:00:00")
    state = feed(SpendState(), [6_000_000_000], monday, clock)
    state = feed(state, [4_000_000_000], WED_NOON, clock)
    command = decide(state, policies(DAILY_5, weekly), "agent:x", clock())
    assert command is not None
    assert command.action is ControlAction.STOP
    assert command.until_ms == ms("2026-03-09T00:00:00")
    assert command.spend_nano_usd == 10_000_000_000
    assert "weekly" in command.reason


def test_day_and_week_both_breached_stop_lasts_until_the_later_end() -> None:
    weekly = BudgetPolicy(scope="agent:x", period=Period.WEEK, limit_usd=Decimal("6"))
    clock = FakeClock(WED_NOON)
    state = feed(SpendState(), [LIMIT + 2_000_000_000], WED_NOON, clock)
    command = decide(state, policies(DAILY_5, weekly), "agent:x", clock())
    assert command is not None
    assert command.until_ms == ms("2026-03-09T00:00:00")
    state = publish(state, command)
    clock.now_ms = WED.end_ms  # a new day, but the week is still spent
    assert decide(state, policies(DAILY_5, weekly), "agent:x", clock()) is None


def test_other_scopes_policies_do_not_apply() -> None:
    clock = FakeClock(WED_NOON)
    other = BudgetPolicy(scope="agent:y", limit_usd=Decimal("0.000000001"))
    state = feed(SpendState(), [LIMIT * 3], WED_NOON, clock)
    assert decide(state, policies(other), "agent:x", clock()) is None


def test_raised_or_removed_policy_resumes_and_a_changed_limit_restops() -> None:
    clock = FakeClock(WED_NOON)
    state = feed(SpendState(), [LIMIT], WED_NOON, clock)
    state = publish(state, decide(state, policies(DAILY_5), "agent:x", clock()))

    lower = BudgetPolicy(scope="agent:x", limit_usd=Decimal("4"))
    restop = decide(state, policies(lower), "agent:x", clock())
    assert restop is not None
    assert restop.action is ControlAction.STOP
    assert restop.limit_nano_usd == 4_000_000_000

    raised = BudgetPolicy(scope="agent:x", limit_usd=Decimal("6"))
    for book in (policies(raised), {}):
        resume = decide(state, book, "agent:x", clock())
        assert resume is not None
        assert resume.action is ControlAction.RESUME
        assert "raised or removed" in resume.reason


def test_commands_sign_and_verify() -> None:
    clock = FakeClock(WED_NOON)
    state = feed(SpendState(), [LIMIT], WED_NOON, clock)
    command = decide(state, policies(DAILY_5), "agent:x", clock())
    assert command is not None
    verify_command(sign_command(command, KEY), KEY)


def test_old_buckets_are_pruned_by_the_clock() -> None:
    clock = FakeClock(WED_NOON)
    state = feed(SpendState(), [5], WED_NOON, clock)
    clock.now_ms = WED.end_ms + KEEP_PERIODS_MS
    state = feed(state, [7], clock.now_ms, clock)
    assert WED.key not in state.periods
    assert period_window(Period.DAY, clock.now_ms).key in state.periods


def test_state_round_trips_through_json() -> None:
    clock = FakeClock(WED_NOON)
    state = feed(SpendState(), [LIMIT], WED_NOON, clock)
    state = publish(state, decide(state, policies(DAILY_5), "agent:x", clock()))
    wire = json.loads(json.dumps(state_to_json(state)))
    again = state_from_json(wire)
    assert again == state
    assert again.last_command is not None
    verify_command(again.last_command, KEY)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([], "must be a JSON object"),
        ({"applied": [1]}, "'applied' must map"),
        ({"applied": {"0": "7"}}, "applied.0 must be an integer"),
        ({"periods": {"day:1": 5}}, "not the start of a day"),
        ({"periods": {"day:0": 1.5}}, "periods.day:0 must be an integer"),
        ({"last_command": {"scope": "agent:x"}}, "'last_command'"),
    ],
)
def test_malformed_state_is_named(data: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        state_from_json(data)


@given(st.lists(st.tuples(st.integers(0, 10**12), st.integers(0, 6 * DAY_MS)), max_size=40))
def test_replaying_any_prefix_changes_nothing(events: list[tuple[int, int]]) -> None:
    base = ms("2026-03-02T00:00:00")
    now = base + 7 * DAY_MS
    state = SpendState()
    for offset, (cost, delta) in enumerate(events):
        state = apply_event(state, call(cost, base + delta), 0, offset, now_ms=now)
    replayed = state
    for offset, (cost, delta) in enumerate(events):
        replayed = apply_event(replayed, call(cost, base + delta), 0, offset, now_ms=now)
    assert replayed == state
    week = period_window(Period.WEEK, base)
    assert state.periods.get(week.key, 0) == sum(cost for cost, _ in events)
    days = {k: v for k, v in state.periods.items() if k.startswith("day:")}
    assert sum(days.values()) == sum(cost for cost, _ in events)


@pytest.mark.parametrize(
    ("nano", "text"),
    [
        (0, "$0.00"),
        (5_010_000_000, "$5.01"),
        (5_000_000_000, "$5.00"),
        (1_234_500_000_000, "$1,234.50"),
        (4_900_001, "$0.004900001"),
    ],
)
def test_format_usd(nano: int, text: str) -> None:
    assert format_usd(nano) == text


def test_spend_report_shows_current_periods_with_limits() -> None:
    clock = FakeClock(WED_NOON)
    state = feed(SpendState(), [1_500_000_000], WED_NOON, clock)
    report = spend_report(state, policies(DAILY_5), "agent:x", clock())
    day, week, month = report["periods"]
    assert day == {
        "period": "day",
        "start_ms": WED.start_ms,
        "end_ms": WED.end_ms,
        "spend_nano_usd": 1_500_000_000,
        "spend_usd": "1.500000000",
        "limit_nano_usd": LIMIT,
        "limit_usd": "5.00",
        "percent_used": "30.00",
        "policy": "agent:x",
        "thresholds": [{"at_percent": "100", "action": "stop"}],
        "timezone": "UTC",
        # $1.50 in the 12 h since midnight: $0.125/h, so the remaining $3.50 lasts 28 h more.
        "burn_nano_usd_per_hour": 125_000_000,
        "exhausts_at_ms": WED_NOON + 28 * 3_600_000,
        "exhausts_before_end": False,
    }
    assert week["limit_nano_usd"] is None and week["percent_used"] is None
    assert month["spend_nano_usd"] == 1_500_000_000
    assert week["spend_nano_usd"] == 1_500_000_000
    empty = spend_report(None, {}, "agent:nobody", clock())
    assert [p["spend_nano_usd"] for p in empty["periods"]] == [0, 0, 0]
