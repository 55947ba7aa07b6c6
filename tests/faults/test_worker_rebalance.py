"""Worker rebalance: a second processor worker joins the group and takes half the partitions,
then is killed with kill -9 in the middle of the load. The survivor takes its partitions back
(recovering their tables from the changelogs) and ends exactly at the ground truth for every
scope, like the sink."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.faults.harness import (
    FaultStack,
    Load,
    fleet_events,
    processor_day_buckets,
    wait_exact,
    wait_until,
)
from tests.integration.test_processor_worker import Worker

pytestmark = pytest.mark.timeout(900)


# Totals used to stay short after the rebalance: faust empties its stream queues whenever flow
# resumes, dropping records fetched while recovery seeks the stream partitions
# (stream_processors/flow.py has the fix and the evidence).
def test_second_worker_killed_mid_stream(fault_stack: FaultStack, tmp_path: Path) -> None:
    settings = fault_stack.settings
    second = settings.model_copy(
        update={"processor_port": free_port(), "home": tmp_path / "second"}
    )
    victim = Worker(second, tmp_path / "second-worker.log")
    try:
        victim.wait_ready(timeout_s=120)
        events = fleet_events(2_000, 25.0, seed=5)
        load = Load(settings, events).start()
        agents = sorted({f"agent:{e.agent_id}" for _, e in events})

        def shared() -> bool:
            # Both workers hold some agent partitions (so the kill moves real work).
            held = [
                processor_day_buckets(settings, port, scope) is not None
                for port in (settings.processor_port, second.processor_port)
                for scope in agents
            ]
            return any(held[: len(agents)]) and any(held[len(agents) :])

        wait_until("both workers to hold partitions", shared, 120)
        load.wait_produced(0.5)
        victim.kill()
        killed_at = time.monotonic()
        load.finish()
        took = wait_exact(fault_stack, [e for _, e in events], timeout_s=300)
        print(
            f"\nrebalance: second worker killed; survivor exact "
            f"{time.monotonic() - killed_at:.1f}s after the kill ({took} after load end)"
        )
    finally:
        victim.kill()
