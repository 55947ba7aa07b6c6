"""Broker outages on a PRIVATE broker (the session one is shared): a restart under load, and
the control topic unavailable to a running agent (the broker stopped while the agent keeps
calling). Processor and sink ride out both and end exactly at the ground truth."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from agentledger.budgets import apply_policies
from agentledger.deploy import KafkaBroker
from agentledger.producers import BudgetExceeded, Ledger
from agentledger.schemas import BudgetPolicy, CallEvent, PolicyFile
from agentledger.schemas.topic_specs import topic_specs
from agentledger.topic_admin import ensure_topics
from tests.conftest import SettingsFactory
from tests.faults.harness import (
    FaultStack,
    Load,
    control_records,
    fleet_events,
    wait_exact,
    wait_until,
)
from tests.integration.test_processor_worker import avoid_midnight

pytestmark = pytest.mark.timeout(900)


def private_stack(broker: KafkaBroker, settings_factory: SettingsFactory) -> FaultStack:
    avoid_midnight()
    settings = settings_factory(kafka=broker.bootstrap)
    ensure_topics(settings.kafka, topic_specs(settings.topics))
    stack = FaultStack(settings)
    stack.up()
    return stack


def test_broker_restart_under_load(
    private_broker: KafkaBroker, settings_factory: SettingsFactory
) -> None:
    stack = private_stack(private_broker, settings_factory)
    try:
        events = fleet_events(2_000, 25.0, seed=3)
        load = Load(stack.settings, events).start()
        load.wait_produced(0.3)
        private_broker.stop(timeout_s=30)
        stopped = time.monotonic()
        load.wait_produced(0.5)  # the producers keep going: librdkafka queues meanwhile
        private_broker.start(timeout_s=120)
        outage_s = time.monotonic() - stopped
        load.finish()
        took = wait_exact(stack, [e for _, e in events], timeout_s=300)
        print(f"\nbroker down {outage_s:.1f}s under load; exact after load end: {took}")
    finally:
        stack.down()


RUNAWAY = "ctl-runaway"


def stop_diagnostics(stack: FaultStack, ledger: Ledger) -> str:
    """Where a STOP that never reached the agent got lost: the processor's view of the scope
    (spend, last command), what the shim's listener and transport saw, and the processor's
    decisions and errors."""
    listener = ledger._listener
    heard = (
        None
        if listener is None
        else {
            "running": listener.running,
            "errors": listener.errors,
            "last_error": listener.last_error,
            "unreachable_for_s": round(listener.unreachable_for_s(), 1),
        }
    )
    return "\n".join(
        [
            f"processor /state: {stack.scope_report(f'agent:{RUNAWAY}')}",
            f"processor /health: {stack.health()}",
            f"shim listener: {heard}; control metrics: {ledger.control.metrics}",
            f"control topic for the scope: {control_records(stack.settings, f'agent:{RUNAWAY}')}",
            f"shim transport: {ledger.transport.stats}",
            "processor log (decisions, warnings, errors):",
            stack.processor_lines(
                "published", "alert for", "polic", "WARNING", "Rebalanc", "assigned", "crash"
            ),
        ]
    )


CALLS_TO_LIMIT = 40


def test_control_topic_unavailable_agent_fails_open_then_obeys(
    private_broker: KafkaBroker, settings_factory: SettingsFactory
) -> None:
    """While the broker is down the agent cannot read the control topic (nor the processor
    write it): calls go on (fail-open, spooled). When it is back, the spooled calls are
    counted, the processor's STOP reaches the agent, and the totals are exact."""
    stack = private_stack(private_broker, settings_factory)
    settings = stack.settings
    emitted: list[CallEvent] = []
    ledger = Ledger(settings)
    try:
        assert ledger.wait_for_control(60)
        agent = ledger.agent(RUNAWAY, pool="ctl", workflow="wf-ctl")

        def call() -> None:
            with agent.call(provider="openai", model="gpt-4o") as each:
                each.record(input_tokens=8_000, output_tokens=200)
            assert each.event is not None
            emitted.append(each.event)

        call()
        cost = emitted[0].cost_nano_usd
        limit = Decimal(cost * CALLS_TO_LIMIT) / 10**9
        apply_policies(
            settings, PolicyFile(budgets=[BudgetPolicy(scope=f"agent:{RUNAWAY}", limit_usd=limit)])
        )
        background = fleet_events(600, 20.0, seed=4)
        load = Load(settings, background).start()
        for _ in range(9):
            call()
        private_broker.stop(timeout_s=30)
        for _ in range(CALLS_TO_LIMIT):  # crosses the limit while nobody can say so
            call()
            time.sleep(0.02)
        assert ledger.transport.stats.spooled > 0, "nothing was spooled during the outage"
        private_broker.start(timeout_s=120)
        back = time.monotonic()

        def refused() -> bool:
            try:
                agent.check_budget()
            except BudgetExceeded:
                return True
            return False

        try:
            wait_until("the STOP to reach the agent after the outage", refused, 180)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{stop_diagnostics(stack, ledger)}") from None
        stop_s = time.monotonic() - back
        with pytest.raises(BudgetExceeded):
            call()
        assert ledger.transport.flush(60) == 0
        load.finish()
        took = wait_exact(stack, emitted + [e for _, e in background], timeout_s=300)
        stats = ledger.transport.stats
        print(
            f"\ncontrol unavailable: {len(emitted)} calls, {stats.spooled} spooled, "
            f"STOP obeyed {stop_s:.1f}s after the broker came back; exact after: {took}"
        )
    finally:
        ledger.close()
        stack.down()
