"""`agentledger up | status | down` as a user runs them: a real broker, processor and sink."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agentledger.deploy.stack import default_processors
from agentledger.schemas.topic_specs import DEFAULT_CALLS_PARTITIONS
from tests.conftest import TEST_CONTROL_KEY, free_port

pytestmark = pytest.mark.integration


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentledger", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def status(env: dict[str, str]) -> dict[str, dict[str, object]]:
    result = run_cli(env, "status", "--json")
    return {row["name"]: row for row in json.loads(result.stdout)}


@pytest.fixture
def stack_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "AGENTLEDGER_HOME": str(tmp_path / "stack"),
            "AGENTLEDGER_KAFKA": f"127.0.0.1:{free_port()}",
            "AGENTLEDGER_KAFKA_CONTROLLER_PORT": str(free_port()),
            "AGENTLEDGER_PROCESSOR_PORT": str(free_port()),
            "AGENTLEDGER_SINK_PORT": str(free_port()),
            "AGENTLEDGER_DASHBOARD_PORT": str(free_port()),
            "AGENTLEDGER_OTLP_PORT": str(free_port()),
            "AGENTLEDGER_TOPIC_PREFIX": "clitest.",
            "AGENTLEDGER_CONTROL_KEY": TEST_CONTROL_KEY,
        }
    )
    env.pop("AGENTLEDGER_API_TOKEN", None)
    env.pop("AGENTLEDGER_PROCESSORS", None)
    return env


def test_up_twice_status_stale_pid_and_down(stack_env: dict[str, str]) -> None:
    # No --processors: one processor per core of this machine, each on its own port.
    processors = ["processor"] + [
        f"processor-{i + 1}" for i in range(1, default_processors(DEFAULT_CALLS_PARTITIONS))
    ]
    try:
        first = run_cli(stack_env, "up")
        assert first.returncode == 0, first.stdout + first.stderr
        rows = status(stack_env)
        assert {name: row["healthy"] for name, row in rows.items()} == {
            "kafka": True,
            **dict.fromkeys(processors, True),
            "sink": True,
            "dashboard": True,
            "otlp": True,
        }
        ports = {int(str(rows[name]["address"]).rpartition(":")[2]) for name in processors}
        assert len(ports) == len(processors)
        pids = {name: row["pid"] for name, row in rows.items()}
        assert all(isinstance(pid, int) for pid in pids.values())
        assert rows["sink"]["address"] == f"127.0.0.1:{stack_env['AGENTLEDGER_SINK_PORT']}"
        assert Path(str(rows["processor"]["log"])).exists()

        second = run_cli(stack_env, "up")
        assert second.returncode == 0, second.stderr
        assert "processor already running" in second.stderr
        assert {name: row["pid"] for name, row in status(stack_env).items()} == pids

        # A component that died leaves a stale pid file: status reports it down, up restarts it.
        os.kill(int(pids["processor"]), signal.SIGKILL)  # type: ignore[call-overload]
        crashed = status(stack_env)["processor"]
        assert crashed["healthy"] is False and crashed["pid"] is None
        third = run_cli(stack_env, "up")
        assert third.returncode == 0, third.stderr
        restarted = status(stack_env)["processor"]
        assert restarted["healthy"] is True and restarted["pid"] != pids["processor"]
    finally:
        down = run_cli(stack_env, "down")
    assert down.returncode == 0, down.stderr
    assert set(down.stdout.removeprefix("stopped: ").strip().split(", ")) == {
        *processors,
        "sink",
        "dashboard",
        "otlp",
        "kafka",
    }
    after = status(stack_env)
    assert not any(row["healthy"] for row in after.values())
    assert run_cli(stack_env, "status").returncode == 1
