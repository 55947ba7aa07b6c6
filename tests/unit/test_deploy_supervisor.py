"""What the supervisor relies on in deploy.Stack (stopped-on-purpose markers, pid files that a
newer process took over) and the refusals of `agentledger supervise`; real processes, no Kafka."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentledger.config import Settings
from agentledger.deploy.stack import Stack, StackError
from agentledger.deploy.supervisor import run_supervisor
from tests.conftest import free_port


def settings_for(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        kafka=f"127.0.0.1:{free_port()}",
        processor_port=free_port(),
        sink_port=free_port(),
        dashboard_port=free_port(),
        otlp_port=free_port(),
    )


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process whose argv looks like a processor worker's and a supervisor's."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            "agentledger.stream_processors",
            "agentledger",
            "supervise",
        ]
    )
    # Until the child has exec'd, /proc/<pid>/cmdline is still pytest's.
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    deadline = time.monotonic() + 10
    while b"supervise" not in cmdline.read_bytes():
        assert time.monotonic() < deadline, "the sleeper did not start in 10 s"
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()


def test_an_exited_child_does_not_delete_the_pid_file_of_a_newer_process(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    stack = Stack(settings_for(tmp_path), manage_kafka=False)
    stack.run_dir.mkdir(parents=True)
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    stack._children["processor"] = exited
    # Meanwhile `agentledger up` in another shell started a new processor.
    pid_file = stack.run_dir / "processor.pid"
    pid_file.write_text(f"{sleeper.pid}\n")
    assert stack.pid_of("processor") == sleeper.pid
    assert pid_file.read_text().strip() == str(sleeper.pid)
    # Our own exited child's pid file is stale and goes.
    pid_file.write_text(f"{exited.pid}\n")
    stack._children["processor"] = exited
    assert stack.pid_of("processor") is None
    assert not pid_file.exists()


def test_stop_service_marks_a_component_stopped_on_purpose_until_it_is_started(
    tmp_path: Path,
) -> None:
    stack = Stack(settings_for(tmp_path), manage_kafka=False, progress=lambda _m: None)
    assert not stack.stopped_on_purpose("dashboard")
    # The dashboard starts without Kafka: a real process for the start and stop.
    log = stack.restart_service("dashboard")
    assert log == stack.log_dir / "dashboard.log"
    assert stack.pid_of("dashboard") is not None
    assert stack.stop_service("dashboard", kill=True)
    assert stack.stopped_on_purpose("dashboard")
    assert stack.pid_of("dashboard") is None
    stack.restart_service("dashboard")
    assert not stack.stopped_on_purpose("dashboard")
    assert stack.stop_service("dashboard", kill=True)
    with pytest.raises(ValueError, match="no component 'nope' in this stack; expected one of"):
        stack.stopped_on_purpose("nope")


def test_supervise_without_a_stack_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"nothing to supervise: .*agentledger up --supervise"):
        run_supervisor(settings_for(tmp_path))


def test_a_second_supervisor_is_refused_and_a_dead_one_shows_in_status(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    settings = settings_for(tmp_path)
    stack = Stack(settings, manage_kafka=False)
    stack.run_dir.mkdir(parents=True)
    (stack.run_dir / "stack.json").write_text('{"kafka_brokers": 1}\n')
    stack.supervisor_pid_file.write_text(f"{sleeper.pid}\n")
    assert stack.supervisor_pid() == sleeper.pid
    with pytest.raises(
        StackError, match=f"a supervisor already watches this stack .pid {sleeper.pid}"
    ):
        run_supervisor(settings)
    sleeper.kill()
    sleeper.wait()
    assert stack.supervisor_pid() is None
    row = stack._supervisor_row()
    assert row is not None and not row.healthy and row.pid is None
    assert "exited; see" in row.detail and "agentledger up --supervise" in row.detail
    assert stack.supervisor_pid_file.exists()  # kept, so `status` keeps reporting it
    assert not stack.stop_supervisor()
    assert stack._supervisor_row() is None
