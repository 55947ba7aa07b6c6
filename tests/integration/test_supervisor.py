"""`agentledger up --supervise` as a user runs it: a real broker, processor, sink and dashboard;
kill -9 the processor and the sink and freeze the dashboard, and the supervisor brings each back
healthy; `down` stops the supervisor first, so nothing comes back after it."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.test_stack_cli import run_cli, stack_env, status

__all__ = ["stack_env"]

# Short intervals so the test takes seconds, not the defaults' minutes.
FAST = {
    "AGENTLEDGER_SUPERVISE_EVERY_S": "0.5",
    "AGENTLEDGER_SUPERVISE_GRACE_S": "3",
    "AGENTLEDGER_SUPERVISE_START_GRACE_S": "60",
    # One processor, not one per core: the supervision is under test, not the scale-out.
    "AGENTLEDGER_PROCESSORS": "1",
}


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log.exists() else "(no supervisor log)"
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{tail}")
        time.sleep(0.3)


def test_supervisor_restarts_killed_and_frozen_components(stack_env: dict[str, str]) -> None:
    env = {**stack_env, **FAST}
    log = Path(env["AGENTLEDGER_HOME"]) / "logs" / "supervisor.log"
    try:
        up = run_cli(env, "up", "--supervise")
        assert up.returncode == 0, up.stdout + up.stderr
        rows = status(env)
        assert rows["supervisor"]["healthy"] is True, rows["supervisor"]
        first = {name: row["pid"] for name, row in rows.items()}

        os.kill(int(str(first["processor"])), signal.SIGKILL)
        os.kill(int(str(first["sink"])), signal.SIGKILL)
        # A frozen process keeps its pid but answers nothing: only /health tells.
        os.kill(int(str(first["dashboard"])), signal.SIGSTOP)

        def back(name: str) -> Callable[[], bool]:
            def check() -> bool:
                row = status(env)[name]
                return row["healthy"] is True and row["pid"] not in (None, first[name])

            return check

        for name in ("processor", "sink", "dashboard"):
            wait_for(f"{name} restarted and healthy", back(name), 90, log)
        text = log.read_text()
        for name in ("processor", "sink"):
            assert f"restarting {name} (restart 1 in a row): its process is gone" in text
            assert f"its log: {Path(env['AGENTLEDGER_HOME']).resolve()}/logs/{name}.log" in text
        assert "restarting dashboard (restart 1 in a row): /health failed for" in text
        assert "does not answer" in text
        assert not Path(f"/proc/{first['dashboard']}").exists()
        after = status(env)
        assert all(row["healthy"] for row in after.values()), after
    finally:
        down = run_cli(env, "down")
    assert down.returncode == 0, down.stderr
    assert down.stdout.removeprefix("stopped: ").strip().split(", ")[0] == "supervisor"
    # Nothing is restarted once `down` ran: several supervisor intervals later all is down.
    time.sleep(2)
    result = run_cli(env, "status", "--json")
    rows_after = {row["name"]: row for row in json.loads(result.stdout)}
    assert "supervisor" not in rows_after
    assert not any(row["pid"] for row in rows_after.values()), rows_after
    assert "supervisor stopped; the components keep running" in log.read_text()
