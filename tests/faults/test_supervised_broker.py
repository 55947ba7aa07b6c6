"""`agentledger up --supervise`: the broker the stack runs is SIGKILLed; the supervisor starts it
again, and the workers, which rode out the outage, are healthy on it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.integration.test_stack_cli import run_cli, stack_env, status
from tests.integration.test_supervisor import FAST, wait_for

__all__ = ["stack_env"]


def test_supervisor_restarts_a_killed_broker(stack_env: dict[str, str]) -> None:
    env = {**stack_env, **FAST}
    home = Path(env["AGENTLEDGER_HOME"])
    log = home / "logs" / "supervisor.log"
    try:
        up = run_cli(env, "up", "--supervise")
        assert up.returncode == 0, up.stdout + up.stderr
        before = status(env)
        os.kill(int(str(before["kafka"]["pid"])), signal.SIGKILL)

        def all_back() -> bool:
            rows = status(env)
            return rows["kafka"]["pid"] not in (None, before["kafka"]["pid"]) and all(
                row["healthy"] for row in rows.values()
            )

        wait_for("the broker restarted and every component healthy", all_back, 120, log)
        text = log.read_text()
        assert "restarting kafka (restart 1 in a row): its process is gone" in text
        assert f"its log: {home.resolve()}/kafka/server.log" in text
        # The workers rode out the outage: the supervisor restarted nothing else.
        assert "restarting processor" not in text and "restarting sink" not in text
    finally:
        down = run_cli(env, "down")
    assert down.returncode == 0, down.stderr
