"""The data plane's transactions under faults: a worker killed with its records produced and
its transaction not committed, and two workers on one transactional id. After each, the
processor holds exactly the ground truth (nothing lost, nothing counted twice), and the
second hop (pools, workflows) agrees."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from agentledger.stream_processors.batch_kafka import transactional_producer_config
from tests.faults.harness import FaultStack, Load, fleet_events, wait_exact, wait_until

pytestmark = pytest.mark.timeout(600)

EVENTS = 2_000
SECONDS = 20.0


def test_kill_9_between_produce_and_commit_loses_nothing_and_counts_nothing_twice(
    fault_stack: FaultStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Restart the processor armed: the 5th transaction with records is killed after its
    # records reached the broker and before commit_transaction.
    fault_stack.kill("processor")
    monkeypatch.setenv("AGENTLEDGER_FAILPOINTS", "before_commit=kill@5")
    events = fleet_events(EVENTS, SECONDS, seed=7)
    load = Load(fault_stack.settings, events).start()
    fault_stack.stack.start_service("processor", timeout_s=180)
    wait_until(
        "the armed processor to kill itself before a commit",
        lambda: fault_stack.stack.pid_of("processor") is None,
        120,
    )
    monkeypatch.delenv("AGENTLEDGER_FAILPOINTS")
    fault_stack.start("processor")
    load.finish()
    took = wait_exact(fault_stack, [e for _, e in events])
    print(f"\nkilled between produce and commit; exact after load end: {took}")


def test_a_second_producer_on_the_workers_transactional_id_fences_it_and_counts_stay_exact(
    fault_stack: FaultStack,
) -> None:
    """Another producer takes the worker's transactional id (a twin started with the same
    identity, or a zombie's restart) three times during the load: each fences the worker's
    producer, whose open transaction is aborted; the worker rebuilds its producer, fencing
    the twin in turn, restores its states from the changelog and reads the cycle again."""
    settings = fault_stack.settings
    events = fleet_events(EVENTS, SECONDS, seed=11)
    load = Load(settings, events).start()
    load.wait_produced(0.2)
    for _ in range(3):
        twin = Producer(transactional_producer_config(settings))
        twin.init_transactions(30)
        time.sleep(2.0)
    load.finish()
    took = wait_exact(fault_stack, [e for _, e in events])
    log = fault_stack.log("processor", tail=400_000)
    assert "rebuilding it" in log, "the worker was never fenced"
    print(f"\nfenced 3 times under load; exact after load end: {took}")
