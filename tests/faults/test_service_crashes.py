"""kill -9 of the processor, then of the sink, in the middle of a steady load: after the
restart both hold exactly the ground truth (no event lost, none counted twice)."""

from __future__ import annotations

import time

import pytest

from tests.faults.harness import FaultStack, Load, fleet_events, wait_exact

pytestmark = pytest.mark.timeout(600)

EVENTS = 2_000
SECONDS = 20.0


@pytest.mark.parametrize("victim", ["processor", "sink"])
def test_kill_9_mid_stream_loses_nothing(fault_stack: FaultStack, victim: str) -> None:
    events = fleet_events(EVENTS, SECONDS, seed=1)
    load = Load(fault_stack.settings, events).start()
    load.wait_produced(0.4)
    fault_stack.kill(victim)
    down_at = time.monotonic()
    load.wait_produced(0.6)  # events keep arriving while it is dead
    fault_stack.start(victim)
    restarted_s = time.monotonic() - down_at
    load.finish()
    took = wait_exact(fault_stack, [e for _, e in events])
    print(f"\n{victim} kill -9: back in {restarted_s:.1f}s; exact after load end: {took}")
