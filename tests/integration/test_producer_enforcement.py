"""Every enforcement action, published signed to the real control topic (as the processor or
an operator would, with a plain producer), applied inside a running agent; a forged one not."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from agentledger.config import Settings
from agentledger.producers import BudgetExceeded, Ledger, NewWorkRefused
from agentledger.schemas import CallEvent, ControlAction, ControlCommand, sign_command
from tests.integration.test_producer_kafka import KEY, eventually, publish, read_topic

pytestmark = pytest.mark.integration

FORGER_KEY = b"an-attacker-key-0123456789abcdef"


def command(
    scope: str,
    action: ControlAction,
    params: dict[str, str | int] | None = None,
    *,
    key: bytes = KEY,
) -> ControlCommand:
    return sign_command(
        ControlCommand(
            scope=scope,
            action=action,
            params=params or {},
            reason="integration test",
            limit_nano_usd=1_000_000_000,
            spend_nano_usd=800_000_000,
            issued_at_ms=time.time_ns() // 1_000_000,
        ),
        key,
    )


@pytest.fixture
def ledger(stack_settings: Settings) -> Iterator[Ledger]:
    led = Ledger(stack_settings)
    yield led
    led.close()


def test_refuse_new_work_on_a_workflow_refuses_tasks_not_running_calls(
    stack_settings: Settings, ledger: Ledger
) -> None:
    agent = ledger.agent("writer-1", workflow="wf-refuse", pool="writers")
    assert ledger.wait_for_control(30.0)
    with agent.task("draft"):
        publish(stack_settings, command("workflow:wf-refuse", ControlAction.REFUSE_NEW_WORK))

        def refused() -> bool:
            try:
                with agent.task("outline"):
                    return False
            except NewWorkRefused:
                return True

        assert eventually(refused), "the REFUSE_NEW_WORK never reached the shim"
        with agent.call(provider="openai", model="gpt-4o-mini"):
            pass  # the running task's calls go on
    publish(stack_settings, command("workflow:wf-refuse", ControlAction.RESUME))
    assert eventually(lambda: not refused())


def test_throttle_on_a_pool_queues_parallel_calls(stack_settings: Settings, ledger: Ledger) -> None:
    agent = ledger.agent("crawler-1", pool="crawlers")
    publish(stack_settings, command("pool:crawlers", ControlAction.THROTTLE, {"concurrency": 2}))
    assert eventually(lambda: any(c.action is ControlAction.THROTTLE for c in agent.standing()))
    lock = threading.Lock()
    running = peak = 0
    errors: list[BaseException] = []

    def work() -> None:
        nonlocal running, peak
        try:
            with agent.call(provider="openai", model="gpt-4o-mini"):
                with lock:
                    running += 1
                    peak = max(peak, running)
                time.sleep(0.05)
                with lock:
                    running -= 1
        except BudgetExceeded as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert peak == 2
    assert ledger.stats["throttled"] >= 1
    assert ledger.stats["events"] == 6


def test_route_and_a_forged_route_read_back_from_the_calls_topic(
    stack_settings: Settings, ledger: Ledger
) -> None:
    agent = ledger.agent("router-1", pool="routed", workflow="wf-route")
    assert ledger.wait_for_control(30.0)
    publish(
        stack_settings,
        command("pool:routed", ControlAction.ROUTE, {"from": "gpt-4o", "to": "gpt-4o-mini"}),
        # Forged: would route the workflow's o3 calls to an attacker's choice, and stop the agent.
        command(
            "workflow:wf-route", ControlAction.ROUTE, {"from": "o3", "to": "x"}, key=FORGER_KEY
        ),
        command("agent:router-1", ControlAction.STOP, key=FORGER_KEY),
    )
    assert eventually(lambda: agent.model_for(None, "gpt-4o") == "gpt-4o-mini")
    assert eventually(lambda: ledger.control.metrics["rejected_forged"] == 2)
    with agent.call(provider="openai", model="gpt-4o") as call:
        call.record(input_tokens=100, output_tokens=10)
        assert call.model == "gpt-4o-mini"
    with agent.call(provider="openai", model="o3") as call:
        assert call.model == "o3"
    assert ledger.transport.flush(10.0) == 0
    got = read_topic(stack_settings.kafka, stack_settings.topics.calls, 2, 30.0)
    events = [CallEvent.model_validate_json(v) for _t, _k, v in got]
    assert [(e.requested_model, e.used_model) for e in events] == [
        ("gpt-4o", "gpt-4o-mini"),
        ("o3", "o3"),
    ]


def test_stop_on_a_workflow_reaches_a_spawned_child(
    stack_settings: Settings, ledger: Ledger
) -> None:
    lead = ledger.agent("lead-1", workflow="wf-stop")
    child = lead.spawn("sub-1")
    assert ledger.wait_for_control(30.0)
    publish(stack_settings, command("workflow:wf-stop", ControlAction.STOP))

    def refused() -> bool:
        try:
            with child.call(provider="openai", model="gpt-4o-mini"):
                return False
        except BudgetExceeded as exc:
            return exc.scope == "workflow:wf-stop"

    assert eventually(refused)
