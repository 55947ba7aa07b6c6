"""CPU time per shim call (time.process_time) of an agent at spawn depth 3, with nothing
standing, with an unrelated agent STOP standing, and with an unrelated subtree STOP standing
(then the agent also checks its 3 subtree scopes). In process, InMemoryTransport, no broker.

    .venv/bin/python -m bench.shim_subtree_overhead
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.producers import Ledger
from agentledger.producers.transport import InMemoryTransport
from agentledger.schemas import ControlAction, ControlCommand, sign_command

__all__ = ["measure"]

KEY = "bench-control-key-0123456789"
CALLS = 30_000
ROUNDS = 5


def measure(standing: str | None) -> float:
    """Median over ROUNDS of the CPU microseconds per call."""
    settings = Settings(home=tempfile.mkdtemp(), control_key=SecretStr(KEY))  # type: ignore[arg-type]
    ledger = Ledger(settings, transport=InMemoryTransport(), start_control_listener=False)
    agent = ledger.agent("root", workflow="wf", pool="p").spawn("a").spawn("b").spawn("c")
    if standing is not None:
        extra: dict[str, Any] = {"schema_version": 2} if standing.startswith("subtree:") else {}
        command = ControlCommand(
            scope=standing, action=ControlAction.STOP, reason="bench", issued_at_ms=1, **extra
        )
        assert ledger.control.apply(sign_command(command, KEY.encode()).model_dump_json().encode())

    def run(n: int) -> None:
        for _ in range(n):
            with agent.call(provider="openai", model="gpt-4o-mini") as call:
                call.record(input_tokens=1200, output_tokens=300)

    run(3_000)
    rounds = []
    for _ in range(ROUNDS):
        start = time.process_time()
        run(CALLS)
        rounds.append((time.process_time() - start) / CALLS * 1e6)
    ledger.close()
    return sorted(rounds)[ROUNDS // 2]


def main() -> int:
    for standing in (None, "agent:other", "subtree:wf|other"):
        print(f"{standing or 'nothing'} standing: {measure(standing):.2f} us CPU per call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
