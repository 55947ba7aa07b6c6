"""ClickHouse unavailable, the embedded way: chDB lets one process at a time open a path, so
while another process holds the sink's chDB path (an operator's chdb session, a stale process),
the sink cannot open its database. Here the sink is killed mid-stream, another process opens
the path, and the sink is restarted against it: it must wait (retrying, consuming nothing)
while the load goes on, then catch up exactly once the path is free."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from tests.faults.harness import FaultStack, Load, fleet_events, wait_exact, wait_until

pytestmark = pytest.mark.timeout(600)

HOLD = (
    "import sys\n"
    "from agentledger.sinks.database import ClickHouse\n"
    "db = ClickHouse.open(sys.argv[1])\n"
    "db.readonly_query('SELECT 1')\n"
    "print('holding', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_sink_waits_for_its_database_and_then_catches_up(fault_stack: FaultStack) -> None:
    events = fleet_events(2_000, 20.0, seed=2)
    load = Load(fault_stack.settings, events).start()
    load.wait_produced(0.3)
    fault_stack.kill("sink")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, fault_stack.settings.clickhouse_dsn],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"holding\n"
        failures: list[BaseException] = []

        def start() -> None:
            try:
                fault_stack.start("sink")
            except BaseException as exc:  # re-raised in the test thread below
                failures.append(exc)

        starter = threading.Thread(target=start)
        starter.start()
        wait_until(
            "the sink to report its database unreachable",
            lambda: "unreachable at start" in fault_stack.log("sink"),
            60,
        )
        load.wait_produced(0.7)
        assert fault_stack.sink_totals() is None, "the sink answered without its database"
        released_at = time.monotonic()
    finally:
        # Closing its stdin ends the holder, which releases the path.
        for pipe in (holder.stdin, holder.stdout):
            if pipe is not None:
                pipe.close()
        holder.wait(timeout=30)
    starter.join(200)
    assert not failures, failures
    healthy_s = time.monotonic() - released_at
    load.finish()
    took = wait_exact(fault_stack, [e for _, e in events])
    print(f"\nsink healthy {healthy_s:.1f}s after the chDB path was released; exact: {took}")
