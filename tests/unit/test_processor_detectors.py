"""Policy v3 in the pure core: zoned calendar periods, rolling windows, workflow runs, and the
forecast, burn-rate, concurrency-cap and spawn-explosion detectors, with an injected clock."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from agentledger.schemas import (
    AlertKind,
    BudgetPolicy,
    ControlAction,
    Period,
    parse_policy_file,
)
from agentledger.stream_processors.counting import apply_cost
from agentledger.stream_processors.crossings import policy_window
from agentledger.stream_processors.decisions import Decision, evaluate
from agentledger.stream_processors.periods import period_window, rolling_window
from agentledger.stream_processors.report import spend_report
from agentledger.stream_processors.state import SpendState
from agentledger.stream_processors.state_codec import state_from_json, state_to_json
from agentledger.stream_processors.tracking import (
    CONCURRENCY_HOLD_MS,
    Activity,
    BucketPlan,
    over_cap_until,
    peak_in_flight,
    plan_for,
    spawn_findings,
)

USD = 1_000_000_000
MIN = 60_000
HOUR = 60 * MIN


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def policy(**fields: Any) -> BudgetPolicy:
    return BudgetPolicy.model_validate(fields)


def book(*items: BudgetPolicy) -> dict[str, BudgetPolicy]:
    return {p.key: p for p in items}


class Feed:
    """Events into one state, each at its own offset, with the plan of ``policies``."""

    def __init__(self, *policies: BudgetPolicy, scope: str = "agent:a") -> None:
        self.policies = book(*policies)
        self.plan = plan_for(policies)
        self.scope = scope
        self.state = SpendState()
        self.offset = 0

    def spend(
        self, nano: int, at_ms: int, now_ms: int | None = None, activity: Activity | None = None
    ) -> None:
        self.state = apply_cost(
            self.state,
            event_id=f"e{self.offset}",
            event_time_ms=at_ms,
            cost_nano_usd=nano,
            partition=0,
            offset=self.offset,
            now_ms=at_ms if now_ms is None else now_ms,
            plan=self.plan,
            activity=activity,
        )
        self.offset += 1

    def settle(self, now_ms: int) -> Decision:
        decision = evaluate(self.state, self.policies, self.scope, now_ms)
        self.state = replace(self.state, alerted=decision.alerted)
        if decision.command is not None:
            self.state = replace(self.state, last_command=decision.command)
        self.state = replace(self.state, subtrees=decision.subtrees)
        return decision


# -- policy v3 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"period": "rolling"}, "period rolling needs a window"),
        ({"period": "rolling", "window": "90s"}, "whole minutes"),
        ({"period": "day", "window": "1h"}, "window applies to period rolling only"),
        ({"period": "run"}, "period run applies to workflow scopes only"),
        ({"period": "day", "idle": "5m"}, "idle applies to period run only"),
        ({"timezone": "Mars/Olympus"}, "IANA zone name"),
        ({"period": "rolling", "window": "1h", "timezone": "Europe/Paris"}, "timezone applies"),
        ({"max_concurrency": 3}, "pool scopes only"),
        ({"spawn": {"max_depth": 2}}, "workflow scopes only"),
    ],
)
def test_bad_v3_fields_are_named(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        policy(scope="agent:a", limit_usd=1, **fields)


def test_policy_keys_name_scope_and_period() -> None:
    text = """
budgets:
  - {scope: agent:a, period: day, timezone: Europe/Paris, limit_usd: 1}
  - {scope: agent:a, period: rolling, window: 24h, limit_usd: 1}
  - {scope: workflow:w, period: run, idle: 10m, limit_usd: 1}
  - {scope: pool:p, max_concurrency: 4}
  - {scope: workflow:w, spawn: {max_children: 5, action: stop}}
"""
    keys = [p.key for p in parse_policy_file(text).budgets]
    assert keys == [
        "agent:a|day",
        "agent:a|rolling:24h",
        "workflow:w|run",
        "pool:p|limits",
        "workflow:w|limits",
    ]


def test_a_policy_without_limit_must_carry_a_detector_and_no_period() -> None:
    with pytest.raises(ValidationError, match="limit_usd is required unless"):
        policy(scope="agent:a")
    with pytest.raises(ValidationError, match="has no period"):
        policy(scope="pool:p", period="week", max_concurrency=2)
    with pytest.raises(ValidationError, match="need limit_usd"):
        policy(scope="pool:p", max_concurrency=2, forecast={})


def test_every_v3_policy_round_trips_through_json() -> None:
    text = """
budgets:
  - {scope: agent:a, period: day, timezone: Europe/Paris, limit_usd: 1, forecast: {}}
  - {scope: agent:a, period: rolling, window: 24h, limit_usd: 1}
  - {scope: workflow:w, period: run, idle: 10m, limit_usd: 1}
  - {scope: pool:p, max_concurrency: 4}
  - {scope: workflow:w, spawn: {max_children: 5, action: stop}}
  - {scope: agent:*, burn_rate: {window: 5m, baseline: 1h}}
"""
    for parsed in parse_policy_file(text).budgets:
        assert BudgetPolicy.model_validate_json(parsed.model_dump_json()) == parsed


def test_v2_records_still_parse() -> None:
    old = '{"schema_version": 2, "scope": "agent:a", "period": "week", "limit_usd": "5"}'
    parsed = BudgetPolicy.model_validate_json(old)
    assert parsed.key == "agent:a|week" and parsed.limit_nano_usd == 5 * USD


def test_plan_follows_the_policies() -> None:
    plan = plan_for(
        [
            policy(scope="agent:a", timezone="Asia/Kolkata", limit_usd=1),
            policy(scope="agent:a", period="rolling", window="1h", limit_usd=1),
            policy(scope="workflow:w", period="run", idle="10m", limit_usd=1),
            policy(scope="agent:*", burn_rate={"window": "5m", "baseline": "1h"}),
            policy(scope="pool:p", max_concurrency=2),
        ]
    )
    assert plan == BucketPlan(
        zones=frozenset({"Asia/Kolkata"}),
        slots=((30_000, 65 * MIN), (MIN, HOUR)),
        run_idles=(10 * MIN,),
        concurrency=True,
        spawn=False,
    )


# -- zoned calendar periods ----------------------------------------------------------------


def test_zoned_day_budget_counts_the_local_day_and_resumes_at_local_midnight() -> None:
    paris = policy(scope="agent:a", timezone="Europe/Paris", limit_usd=1)
    feed = Feed(paris)
    # 23:30 UTC on March 3 is already March 4 in Paris (+01:00): the Paris day began 23:00.
    feed.spend(USD // 4, ms("2026-03-03T22:30:00"))  # still March 3 in Paris
    feed.spend(USD // 2, ms("2026-03-03T23:30:00"))
    feed.spend(USD // 2, ms("2026-03-04T10:00:00"))
    stop = feed.settle(ms("2026-03-04T10:00:00")).command
    assert stop is not None and stop.action is ControlAction.STOP
    assert stop.period_start_ms == ms("2026-03-03T23:00:00")
    assert stop.until_ms == ms("2026-03-04T23:00:00")
    assert "daily (Europe/Paris) budget" in stop.reason
    # The UTC day of March 4 only holds the second half.
    report = spend_report(feed.state, feed.policies, "agent:a", ms("2026-03-04T10:00:00"))
    assert report["periods"][0]["spend_nano_usd"] == USD
    assert report["periods"][0]["timezone"] == "Europe/Paris"
    assert report["buckets"][f"day:{ms('2026-03-04T00:00:00')}"] == USD // 2
    assert feed.settle(ms("2026-03-04T22:59:59")).command is None
    resume = feed.settle(ms("2026-03-04T23:00:00")).command
    assert resume is not None and resume.action is ControlAction.RESUME


# -- rolling windows ----------------------------------------------------------------------


def test_rolling_window_counts_the_last_hour_and_resumes_when_spend_slides_out() -> None:
    hourly = policy(scope="agent:a", period="rolling", window="1h", limit_usd=1)
    feed = Feed(hourly)
    t0 = ms("2026-03-04T12:00:30")
    feed.spend(USD * 4 // 10, t0)
    feed.spend(USD * 6 // 10, t0 + 20 * MIN)
    stop = feed.settle(t0 + 20 * MIN).command
    assert stop is not None and stop.action is ControlAction.STOP
    # The first 40% leaves the window one hour after its minute slot began (12:00 + 1h).
    assert stop.until_ms == ms("2026-03-04T13:00:00") and stop.period_start_ms is None
    assert "rolling 1h budget" in stop.reason
    assert feed.settle(t0 + 30 * MIN).command is None  # stands, not re-published
    resume = feed.settle(ms("2026-03-04T13:00:00")).command
    assert resume is not None and resume.action is ControlAction.RESUME
    report = spend_report(feed.state, feed.policies, "agent:a", ms("2026-03-04T13:00:00"))
    rolling = report["periods"][3]
    assert rolling["period"] == "rolling:1h" and rolling["spend_nano_usd"] == USD * 6 // 10


def test_rolling_threshold_alerts_once_per_continuous_stretch() -> None:
    hourly = policy(
        scope="agent:a",
        period="rolling",
        window="1h",
        limit_usd=1,
        thresholds=[{"at_percent": 50, "action": "alert"}],
    )
    feed = Feed(hourly)
    t0 = ms("2026-03-04T12:00:00")
    feed.spend(USD * 6 // 10, t0)
    assert len(feed.settle(t0).alerts) == 1
    for minute in range(1, 59):  # the window slides, still crossed: no new alert
        assert feed.settle(t0 + minute * MIN).alerts == ()
    assert feed.settle(t0 + HOUR).alerts == ()  # slid out
    feed.spend(USD * 6 // 10, t0 + HOUR)
    assert len(feed.settle(t0 + HOUR).alerts) == 1


def test_rolling_slots_stay_bounded() -> None:
    hourly = policy(scope="agent:a", period="rolling", window="1h", limit_usd=1000)
    feed = Feed(hourly)
    t0 = ms("2026-03-04T00:00:00")
    for minute in range(0, 24 * 60, 7):
        feed.spend(1, t0 + minute * MIN)
    assert len(feed.state.slots) <= 62
    assert state_from_json(state_to_json(feed.state)) == feed.state


# -- workflow runs ------------------------------------------------------------------------


def test_run_budget_counts_one_run_and_resumes_when_it_ends() -> None:
    per_run = policy(scope="workflow:w", period="run", idle="10m", limit_usd=1)
    feed = Feed(per_run, scope="workflow:w")
    t0 = ms("2026-03-04T12:00:00")
    feed.spend(USD // 2, t0)
    feed.spend(USD // 2, t0 + 9 * MIN)  # same run: the gap is under 10 minutes
    stop = feed.settle(t0 + 9 * MIN).command
    assert stop is not None and stop.action is ControlAction.STOP
    assert (stop.period_start_ms, stop.until_ms) == (t0, t0 + 19 * MIN)
    assert "per-run budget" in stop.reason
    resume = feed.settle(t0 + 19 * MIN).command
    assert resume is not None and resume.action is ControlAction.RESUME
    feed.spend(USD // 2, t0 + 30 * MIN)  # a new run starts from zero
    assert feed.settle(t0 + 30 * MIN).command is None
    assert feed.state.runs[10 * MIN] == (t0 + 30 * MIN, t0 + 30 * MIN, USD // 2)
    # An event from long before the current run belongs to an earlier run.
    feed.spend(USD, t0 + 1 * MIN, now_ms=t0 + 31 * MIN)
    assert feed.state.runs[10 * MIN][2] == USD // 2


# -- forecast -----------------------------------------------------------------------------


def test_forecast_in_the_report_and_an_alert_when_exhaustion_comes_before_the_end() -> None:
    daily = policy(scope="agent:a", limit_usd=10, forecast={"min_elapsed_percent": 20})
    feed = Feed(daily)
    midnight = ms("2026-03-04T00:00:00")
    feed.spend(3 * USD, midnight + 1 * HOUR)
    assert feed.settle(midnight + 4 * HOUR).alerts == ()  # under 20% of the day elapsed
    alerts = feed.settle(midnight + 6 * HOUR).alerts
    # $3 in 6 h is $0.50/h: the remaining $7 lasts 14 h, until 20:00, before midnight.
    assert [a.kind for a in alerts] == [AlertKind.FORECAST]
    assert alerts[0].details["exhausts_at_ms"] == midnight + 20 * HOUR
    assert alerts[0].details["burn_nano_usd_per_hour"] == USD // 2
    assert feed.settle(midnight + 7 * HOUR).alerts == ()  # once per period
    day = spend_report(feed.state, feed.policies, "agent:a", midnight + 6 * HOUR)["periods"][0]
    assert day["exhausts_at_ms"] == midnight + 20 * HOUR and day["exhausts_before_end"]
    slow = Feed(daily)
    slow.spend(1 * USD, midnight + 1 * HOUR)
    assert slow.settle(midnight + 6 * HOUR).alerts == ()  # 1 + 18 * 1/6 < 10: lasts the day


# -- burn rate ----------------------------------------------------------------------------


def burn_policy(action: str = "alert") -> BudgetPolicy:
    return policy(
        scope="agent:*",
        burn_rate={
            "window": "5m",
            "baseline": "1h",
            "factor": 3,
            "min_usd": "0.01",
            "action": action,
        },
    )


def test_burn_rate_fires_on_a_burst_against_the_scopes_own_baseline() -> None:
    feed = Feed(burn_policy())
    t0 = ms("2026-03-04T12:00:00")
    for minute in range(60):  # a steady $0.01 a minute: $0.05 per 5 minutes
        feed.spend(USD // 100, t0 + minute * MIN)
    assert feed.settle(t0 + 60 * MIN).alerts == ()
    feed.spend(USD // 100 * 15, t0 + 62 * MIN)  # $0.15 within 5 minutes: 3x of $0.05
    alerts = feed.settle(t0 + 62 * MIN).alerts
    assert [a.kind for a in alerts] == [AlertKind.BURN_RATE]
    assert "3x or more" in alerts[0].message
    assert feed.settle(t0 + 63 * MIN).alerts == ()


def test_burn_rate_below_factor_or_minimum_stays_quiet_and_action_lapses() -> None:
    feed = Feed(burn_policy("throttle:1"))
    t0 = ms("2026-03-04T12:00:00")
    for minute in range(60):
        feed.spend(USD // 100, t0 + minute * MIN)
    feed.spend(USD // 100 * 9, t0 + 62 * MIN)  # $0.10 in 5 minutes with the 12:01 slot: 2x
    assert feed.settle(t0 + 62 * MIN).command is None
    quiet = Feed(burn_policy())
    quiet.spend(USD // 1000, t0)  # no baseline, but under min_usd
    assert quiet.settle(t0).alerts == ()
    feed.spend(USD, t0 + 63 * MIN)
    throttle = feed.settle(t0 + 63 * MIN).command
    assert throttle is not None and throttle.action is ControlAction.THROTTLE
    assert throttle.until_ms is not None
    resume = feed.settle(throttle.until_ms).command
    assert resume is not None and resume.action is ControlAction.RESUME


# -- pool concurrency ---------------------------------------------------------------------


def test_in_flight_is_computed_from_overlapping_intervals() -> None:
    assert peak_in_flight([(0, 10), (5, 15), (9, 20), (10, 12)]) == 3
    assert peak_in_flight([(0, 10), (10, 20)]) == 1  # ends before the next starts
    assert over_cap_until([(0, 10), (5, 15), (9, 20)], 2) == 10
    assert over_cap_until([(0, 10), (10, 20)], 1) is None


def test_pool_over_its_cap_is_throttled_and_resumes_after_the_hold() -> None:
    cap = policy(scope="pool:p", max_concurrency=2)
    feed = Feed(cap, scope="pool:p")
    t0 = ms("2026-03-04T12:00:00")
    for start in (0, 100, 200):  # three calls of 1 s that overlap between 200 and 1000 ms
        feed.spend(1, t0 + start, now_ms=t0 + 1500, activity=Activity(latency_ms=1000))
    decision = feed.settle(t0 + 1500)
    throttle = decision.command
    assert throttle is not None and throttle.action is ControlAction.THROTTLE
    assert throttle.params == {"concurrency": 2}
    assert throttle.until_ms == t0 + 1000 + CONCURRENCY_HOLD_MS
    assert [a.kind for a in decision.alerts] == [AlertKind.CAPACITY]
    assert "3 calls in flight, more than its cap of 2" in throttle.reason
    assert spend_report(feed.state, feed.policies, "pool:p", t0 + 1500)["peak_in_flight"] == 3
    resume = feed.settle(t0 + 1000 + CONCURRENCY_HOLD_MS).command
    assert resume is not None and resume.action is ControlAction.RESUME


def test_pool_within_its_cap_is_left_alone() -> None:
    feed = Feed(policy(scope="pool:p", max_concurrency=2), scope="pool:p")
    t0 = ms("2026-03-04T12:00:00")
    for start in (0, 600, 1200):  # at most two at a time
        feed.spend(1, t0 + start, now_ms=t0 + 3000, activity=Activity(latency_ms=1000))
    assert feed.settle(t0 + 3000) == Decision(None, (), ())


# -- spawn explosion ----------------------------------------------------------------------


def test_spawn_findings_name_the_offender() -> None:
    agents = {
        "root": (None, 0, 0),
        "a": ("root", 1, 1000),
        "b": ("root", 1, 2000),
        "c": ("root", 1, 3000),
        "d": ("c", 2, 70_000),
    }
    found = spawn_findings(agents, max_children=2, max_depth=1, max_new_agents_per_minute=3)
    assert [(f.what, f.agent, f.value, f.limit, f.root) for f in found] == [
        ("children", "root", 3, 2, "root"),
        ("depth", "d", 2, 1, "c"),  # c is at the depth limit: its descendants are too deep
        ("rate", "c", 4, 3, None),  # the burst holds root itself: no one agent spawned it all
    ]


def test_spawn_findings_name_each_offending_subtree() -> None:
    # root -> a, b; a -> a1..a3 (a1 -> a11 -> a111); b -> b1..b3; a late burst under b1.
    agents: dict[str, tuple[str | None, int, int]] = {
        "root": (None, 0, 0),
        "a": ("root", 1, 0),
        "b": ("root", 1, 0),
        **{f"a{n}": ("a", 2, 10 * MIN) for n in (1, 2, 3)},
        **{f"b{n}": ("b", 2, 20 * MIN) for n in (1, 2, 3)},
        "a11": ("a1", 3, 30 * MIN),
        "a111": ("a11", 4, 31 * MIN),
        **{f"b1{n}": ("b1", 3, 40 * MIN + n) for n in range(4)},
        # its parent made no call, so its chain stops there
        "x1": ("x", 5, 50 * MIN),
    }
    children = spawn_findings(
        agents, max_children=3, max_depth=None, max_new_agents_per_minute=None
    )
    assert [(f.agent, f.value, f.root) for f in children] == [("b1", 4, "b1")]
    deep = spawn_findings(agents, max_children=None, max_depth=2, max_new_agents_per_minute=None)
    # Per subtree rooted at depth 2 its deepest agent; x's chain breaks at x (depth 4).
    assert [(f.agent, f.value, f.root) for f in deep] == [
        ("x1", 5, "x"),
        ("a111", 4, "a1"),
        ("b13", 3, "b1"),
    ]
    burst = spawn_findings(agents, max_children=None, max_depth=None, max_new_agents_per_minute=3)
    assert [(f.what, f.agent, f.value, f.root) for f in burst] == [("rate", "b13", 4, "b1")]


def test_spawn_explosion_stops_the_offending_subtree_until_lifted() -> None:
    limits = policy(scope="workflow:w", spawn={"max_children": 3, "action": "stop"})
    feed = Feed(limits, scope="workflow:w")
    t0 = ms("2026-03-04T12:00:00")
    feed.spend(1, t0, activity=Activity(agent_id="root"))
    feed.spend(1, t0, activity=Activity("lead-1", "root", 1))
    feed.spend(1, t0, activity=Activity("lead-2", "root", 1))
    for child in range(3):
        feed.spend(1, t0 + child, activity=Activity(f"c{child}", "lead-1", 2))
        feed.spend(1, t0 + child, activity=Activity(f"d{child}", "lead-2", 2))
    assert feed.settle(t0 + 10) == Decision(None, (), ())
    feed.spend(1, t0 + 20, activity=Activity("c3", "lead-1", 2))
    decision = feed.settle(t0 + 20)
    # The workflow itself, and lead-2's subtree, are left alone.
    assert decision.command is None
    (stop,) = decision.subtree_commands
    assert stop.scope == "subtree:w|lead-1" and stop.schema_version == 2
    assert stop.action is ControlAction.STOP and stop.until_ms is None
    assert "4 children of one parent" in stop.reason and "subtree:w|lead-1" in stop.reason
    assert decision.subtrees == ("subtree:w|lead-1",)
    (alert,) = decision.alerts
    assert alert.kind is AlertKind.SPAWN_EXPLOSION and alert.scope == "workflow:w"
    assert alert.details["agent"] == "lead-1" and alert.details["subtree"] == stop.scope
    assert spend_report(feed.state, feed.policies, "workflow:w", t0 + 20)["stopped_subtrees"] == [
        "subtree:w|lead-1"
    ]
    # Idempotent: stands, not re-published, until the policy changes.
    later = feed.settle(t0 + 10 * HOUR)
    assert later.subtree_commands == () and later.subtrees == ("subtree:w|lead-1",)
    assert state_from_json(state_to_json(feed.state)) == feed.state
    # A second parent over the limit gets its own STOP; the first is not sent again.
    feed.spend(1, t0 + 30, activity=Activity("d3", "lead-2", 2))
    second = feed.settle(t0 + 30)
    assert [c.scope for c in second.subtree_commands] == ["subtree:w|lead-2"]
    assert second.subtrees == ("subtree:w|lead-1", "subtree:w|lead-2")
    feed.policies = {}
    lifted = feed.settle(t0 + 10 * HOUR)
    assert [(c.scope, c.action) for c in lifted.subtree_commands] == [
        ("subtree:w|lead-1", ControlAction.RESUME),
        ("subtree:w|lead-2", ControlAction.RESUME),
    ]
    assert lifted.subtrees == () and lifted.command is None
    assert feed.settle(t0 + 11 * HOUR) == Decision(None, (), ())


def test_a_burst_with_no_single_spawning_agent_stops_the_whole_workflow() -> None:
    limits = policy(scope="workflow:w", spawn={"max_new_agents_per_minute": 2, "action": "stop"})
    feed = Feed(limits, scope="workflow:w")
    t0 = ms("2026-03-04T12:00:00")
    for n in range(3):  # three unrelated roots
        feed.spend(1, t0 + n, activity=Activity(agent_id=f"r{n}"))
    decision = feed.settle(t0 + 10)
    stop = decision.command
    assert stop is not None and stop.scope == "workflow:w" and stop.action is ControlAction.STOP
    assert "for the whole workflow" in stop.reason and decision.subtree_commands == ()


def test_tracked_state_round_trips_through_json() -> None:
    feed = Feed(
        policy(scope="workflow:w", period="run", limit_usd=1),
        policy(scope="workflow:w", spawn={"max_depth": 3}),
        policy(scope="pool:p", max_concurrency=2),
        policy(scope="workflow:w", period="rolling", window="1h", limit_usd=1),
        scope="workflow:w",
    )
    t0 = ms("2026-03-04T12:00:00")
    feed.spend(5, t0, activity=Activity("a", None, 0, 100))
    feed.spend(5, t0 + 50, activity=Activity("b", "a", 1, 100))
    state = feed.state
    assert state.runs and state.slots and len(state.intervals) == 2 and len(state.agents) == 2
    assert state_from_json(state_to_json(state)) == state
    with pytest.raises(ValueError, match="'agents'"):
        state_from_json({**state_to_json(state), "agents": {"a": [1, 2]}})


# -- retry cost share ---------------------------------------------------------------------


def test_retry_cost_share_above_the_limit_alerts_and_acts_for_the_day() -> None:
    from agentledger.schemas import CallEvent
    from agentledger.stream_processors.counting import apply_event

    rule = policy(
        scope="agent:*",
        retry_loop={"max_retry_cost_percent": 40, "min_spend_usd": "0.10", "action": "stop"},
    )
    policies = book(rule)
    state = SpendState()
    noon = ms("2026-03-04T12:00:00")

    def attempt(n: int, cost: int, at: int) -> CallEvent:
        return CallEvent(
            event_time_ms=at,
            agent_id="a",
            provider="openai",
            requested_model="gpt-4o",
            used_model="gpt-4o",
            cost_nano_usd=cost,
            latency_ms=5,
            attempt=n,
        )

    for offset, (n, cost) in enumerate([(1, USD // 20), (2, USD // 40), (1, USD // 100)]):
        state = apply_event(state, attempt(n, cost, noon), 0, offset, now_ms=noon)
    # $0.025 of $0.085 on retries is 29%, and under the $0.10 minimum anyway.
    assert evaluate(state, policies, "agent:a", noon).command is None
    state = apply_event(state, attempt(3, USD // 20, noon), 0, 3, now_ms=noon)
    decision = evaluate(state, policies, "agent:a", noon)  # $0.075 of $0.135: 55%
    assert decision.command is not None and decision.command.action is ControlAction.STOP
    assert decision.command.until_ms == ms("2026-03-05T00:00:00")
    assert "retries cost $0.075 of $0.135" in decision.command.reason
    assert [a.kind for a in decision.alerts] == [AlertKind.RETRY_LOOP]
    assert state_from_json(state_to_json(state)) == state
    with pytest.raises(ValidationError, match="max_failures, max_retry_cost_percent"):
        policy(scope="agent:a", retry_loop={"window_s": 60})


# -- exactness under replays --------------------------------------------------------------

EXACT_POLICIES = (
    policy(scope="agent:a", period="rolling", window="1h", limit_usd=1000),
    policy(scope="agent:a", timezone="Asia/Kathmandu", limit_usd=1000),
    policy(scope="workflow:w", period="run", idle="10m", limit_usd=1000),
)
T0 = ms("2026-03-04T17:00:00")


@given(
    st.lists(
        st.tuples(st.integers(0, 3 * HOUR), st.integers(0, 10**9), st.booleans()),
        min_size=1,
        max_size=40,
    )
)
def test_new_periods_equal_a_recomputation_through_replays(
    events: list[tuple[int, int, bool]],
) -> None:
    plan = plan_for(EXACT_POLICIES)
    now = T0 + 3 * HOUR
    state = SpendState()
    for offset, (at, cost, replay) in enumerate(events):
        for _ in range(2 if replay else 1):  # a replay of the same offset changes nothing
            state = apply_cost(
                state,
                event_id=f"e{offset}",
                event_time_ms=T0 + at,
                cost_nano_usd=cost,
                partition=0,
                offset=offset,
                now_ms=now,
                plan=plan,
            )
    rolling = rolling_window(HOUR, now)
    in_window = sum(c for at, c, _ in events if rolling.contains(T0 + at))
    found = policy_window(state, EXACT_POLICIES[0], now)
    assert found is not None and found[1] == in_window
    local_day = period_window(Period.DAY, now, "Asia/Kathmandu")
    zoned = policy_window(state, EXACT_POLICIES[1], now)
    assert zoned == (local_day, sum(c for at, c, _ in events if local_day.contains(T0 + at)))
    # The run: replay the arrival order by hand with the same rule.
    first = last = total = None
    for at, cost, _ in events:
        t = T0 + at
        if first is None or last is None or total is None or t > last + 10 * MIN:
            first, last, total = t, t, cost
        elif t >= first - 10 * MIN:
            first, last, total = min(first, t), max(last, t), total + cost
    assert state.runs[10 * MIN] == (first, last, total)


def test_a_lowered_rolling_or_zoned_policy_sees_spend_since_its_first_publish() -> None:
    # The README's workaround for trackers that count from a policy's arrival.
    generous = [
        policy(scope="agent:a", period="rolling", window="24h", limit_usd=100),
        policy(scope="agent:a", period="day", timezone="Asia/Tokyo", limit_usd=100),
    ]
    lowered = [
        policy(scope="agent:a", period="rolling", window="24h", limit_usd="0.01"),
        policy(scope="agent:a", period="day", timezone="Asia/Tokyo", limit_usd="0.01"),
    ]
    assert plan_for(generous) == plan_for(lowered)
    feed = Feed(*generous)
    t0 = ms("2026-03-04T12:00:00")
    feed.spend(USD // 100, t0)
    assert feed.settle(t0 + MIN).command is None
    feed.policies = book(*lowered)
    stop = feed.settle(t0 + MIN).command
    assert stop is not None and stop.action is ControlAction.STOP
    assert "$0.01 of $0.01" in stop.reason
