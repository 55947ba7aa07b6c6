"""Graduated thresholds on the real broker: alert, refuse_new_work, throttle:N, route:MODEL and
stop over day, week and month periods; every crossing raises one Alert on the alerts topic."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tests.integration.test_processor_worker as base
from agentledger.cli import main as cli
from agentledger.config import Settings
from agentledger.schemas import (
    Alert,
    AlertKind,
    BudgetPolicy,
    CallEvent,
    ControlAction,
    ControlCommand,
    Severity,
    verify_command,
)

pytestmark = pytest.mark.integration

workers = base.workers
readers = base.readers
Worker = base.Worker
TopicReader = base.TopicReader


@pytest.fixture
def alerts_reader(stack_settings: Settings) -> Iterator[TopicReader]:
    reader = TopicReader(stack_settings.kafka, stack_settings.topics.alerts, 3)
    yield reader
    reader.close()


def alerts_for(reader: TopicReader, scope: str) -> list[Alert]:
    found = []
    for key, value, _ in reader.poll():
        alert = Alert.model_validate_json(value)
        assert key == alert.scope.encode()
        if alert.scope == scope:
            found.append(alert)
    return found


def spend(
    agent: str, cost: int, pool: str | None = None, task_id: str | None = None, status: str = "ok"
) -> bytes:
    return (
        CallEvent(
            event_time_ms=base.now_ms(),
            agent_id=agent,
            pool=pool,
            task_id=task_id,
            status=status,  # type: ignore[arg-type]
            provider="openai",
            requested_model="gpt-4o",
            used_model="gpt-4o",
            cost_nano_usd=cost,
            latency_ms=100,
        )
        .model_dump_json()
        .encode()
    )


def test_every_action_over_day_week_and_month_with_one_alert_per_crossing(
    stack_settings: Settings,
    workers: Callable[[], Worker],
    readers: tuple[TopicReader, TopicReader],
    alerts_reader: TopicReader,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    settings = stack_settings
    control, _ = readers
    base.avoid_midnight()
    producer = base.make_producer(settings)
    calls = settings.topics.calls
    policies = [
        {
            "scope": "agent:researcher-*",
            "period": "day",
            "limit_usd": "0.01",
            "thresholds": [
                {"at_percent": 50, "action": "alert"},
                {"at_percent": 80, "action": "refuse_new_work"},
                {"at_percent": 100, "action": "stop"},
            ],
        },
        {
            "scope": "agent:writer",
            "period": "week",
            "limit_usd": "0.01",
            "thresholds": [{"at_percent": 100, "action": "throttle:2"}],
        },
        {
            "scope": "agent:flaky",
            "limit_usd": "1000",
            "retry_loop": {"max_failures": 2, "window_s": 600, "action": "refuse_new_work"},
        },
        {
            "scope": "pool:research",
            "period": "month",
            "limit_usd": "0.02",
            "thresholds": [{"at_percent": 100, "action": "route:gpt-4o-mini"}],
        },
    ]
    for raw in policies:
        base.publish_policy(producer, settings, BudgetPolicy.model_validate(raw))
    worker = workers()
    worker.wait_ready()
    key = settings.control_key_bytes()

    def standing(scope: str, count: int) -> list[ControlCommand]:
        found = base.wait_for(
            f"{count} command(s) for {scope}",
            lambda: len(base.commands(control, scope)) >= count and base.commands(control, scope),
        )
        for command, _ in found:
            verify_command(command, key)
        return [command for command, _ in found]

    def send(agent: str, cost: int, pool: str | None = None) -> None:
        base.send(producer, calls, agent.encode(), spend(agent, cost, pool))

    # researcher-1: 60% -> alert only; 85% -> refuse_new_work; 100% -> stop.
    send("researcher-1", 6_000_000, "research")
    alert = base.wait_for("the 50% alert", lambda: alerts_for(alerts_reader, "agent:researcher-1"))
    assert [a.action for a in alert] == ["alert"]
    assert alert[0].kind is AlertKind.THRESHOLD and alert[0].spend_nano_usd == 6_000_000
    assert base.commands(control, "agent:researcher-1") == []

    send("researcher-1", 2_500_000, "research")
    [refuse] = standing("agent:researcher-1", 1)
    assert refuse.action is ControlAction.REFUSE_NEW_WORK
    assert refuse.reason.endswith("at 80%: refuse new work")
    send("researcher-1", 1_500_000, "research")
    stop = standing("agent:researcher-1", 2)[1]
    assert stop.action is ControlAction.STOP
    assert stop.spend_nano_usd == 10_000_000 and stop.limit_nano_usd == 10_000_000
    base.wait_for(
        "three researcher alerts", lambda: len(alerts_for(alerts_reader, "agent:researcher-1")) >= 3
    )
    researcher_alerts = alerts_for(alerts_reader, "agent:researcher-1")
    assert [a.action for a in researcher_alerts] == ["alert", "refuse_new_work", "stop"]
    assert researcher_alerts[-1].severity is Severity.CRITICAL

    # writer: weekly throttle at the ceiling.
    send("writer", 10_000_000)
    [throttle] = standing("agent:writer", 1)
    assert throttle.action is ControlAction.THROTTLE
    assert throttle.params == {"concurrency": 2}

    # pool:research: monthly route once both researchers' spend reaches $0.02.
    send("researcher-2", 10_000_000, "research")
    [route] = standing("pool:research", 1)
    assert route.action is ControlAction.ROUTE
    assert route.params == {"from": "*", "to": "gpt-4o-mini"}
    assert route.spend_nano_usd == 20_000_000
    assert worker.state("pool:research")["periods"][2]["percent_used"] == "100.00"

    # researcher-2 matches the glob on its own budget: $0.01 of $0.01 -> all three crossings at
    # once, and STOP (the most restraining) is the one command published.
    [stop_2] = standing("agent:researcher-2", 1)
    assert stop_2.action is ControlAction.STOP

    # Two sweep ticks later nothing is re-published, no alert is repeated.
    time.sleep(2.5)
    assert len(base.commands(control, "agent:researcher-1")) == 2
    assert len(base.commands(control, "pool:research")) == 1
    assert len(alerts_for(alerts_reader, "agent:researcher-1")) == 3
    assert [a.action for a in alerts_for(alerts_reader, "agent:researcher-2")] == [
        "alert",
        "refuse_new_work",
        "stop",
    ]
    assert len(alerts_for(alerts_reader, "pool:research")) == 1

    # Retry loop: a third failed attempt on one task (more than 2) refuses new work.
    for _ in range(2):
        base.send(producer, calls, b"flaky", spend("flaky", 5, task_id="t-1", status="error"))
    base.send(producer, calls, b"flaky", spend("flaky", 5, task_id="t-2", status="error"))
    base.send(producer, calls, b"flaky", spend("flaky", 5, task_id="t-1", status="ok"))
    base.send(producer, calls, b"flaky", spend("flaky", 5, task_id="t-1", status="timeout"))
    [refused] = standing("agent:flaky", 1)
    assert refused.action is ControlAction.REFUSE_NEW_WORK
    assert "3 failed attempts on task t-1 within 600s" in refused.reason
    [loop] = base.wait_for("the retry-loop alert", lambda: alerts_for(alerts_reader, "agent:flaky"))
    assert loop.kind is AlertKind.RETRY_LOOP and loop.details["task_id"] == "t-1"

    # The CLI, as an operator runs it: `agentledger spend` and `agentledger budgets diff`.
    for name, value in {
        "AGENTLEDGER_KAFKA": settings.kafka,
        "AGENTLEDGER_TOPIC_PREFIX": settings.topic_prefix,
        "AGENTLEDGER_HOME": str(settings.home),
        "AGENTLEDGER_API_TOKEN": settings.api_token_value(),
        "AGENTLEDGER_CONTROL_KEY": settings.control_key_bytes().decode(),
        "AGENTLEDGER_PROCESSOR_PORT": str(settings.processor_port),
    }.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert cli(["spend", "pool:research", "--period", "month"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("pool:research at ")
    assert len(out) == 5  # scope, header, rule, the one period, what stands
    assert out[3].split()[0] == "month"
    assert out[3].split()[-4:] == ["0.020000000", "0.02", "100.00", "pool:research"]
    assert out[4].startswith('standing: ROUTE {"from": "*", "to": "gpt-4o-mini"} until ')
    assert cli(["spend", "agent:nobody"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "standing: none (calls proceed)"
    assert cli(["spend", "team:x"]) == 2
    assert "processor answered 404" in capsys.readouterr().err

    changed = tmp_path / "budgets.yaml"
    changed.write_text(
        "budgets:\n"
        "  - scope: agent:writer\n"
        "    period: week\n"
        "    limit_usd: 0.01\n"
        "    thresholds: [{at_percent: 100, action: 'throttle:2'}]\n"
        "  - {scope: 'pool:research', period: month, limit_usd: 0.05}\n"
        "  - {scope: 'workflow:wf-9', limit_usd: 1}\n"
    )
    assert cli(["budgets", "diff", str(changed)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [
        ["keep", "agent:flaky|day:"],
        ["keep", "agent:researcher-*|day:"],
        ["same", "agent:writer|week:"],
        ["change", "pool:research|month:"],
        ["add", "workflow:wf-9|day:"],
    ]
    assert lines[-1].startswith("2 budget(s) would be published")
