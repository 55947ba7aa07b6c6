"""`agentledger up | down | status`: the local stack as background processes under the state dir.

Each component has a pid file in <home>/run and a log in <home>/logs. A pid file whose process is
gone, or now belongs to another program, is stale and is replaced, so `up` twice starts nothing
twice and a crashed component is restarted by the next `up`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agentledger.config import Settings

from .kafka_broker import KafkaBroker, _cmdline_mentions, _terminate, kafka_ready, pid_alive
from .topics import ensure_topics, topic_specs

__all__ = ["ComponentStatus", "Stack", "StackError"]

Progress = Callable[[str], None]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class StackError(RuntimeError):
    """A component did not start; the message names its log file."""


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    healthy: bool
    pid: int | None
    address: str
    log_file: Path
    detail: str = ""


@dataclass(frozen=True)
class _Service:
    name: str
    module: str
    port: int


class Stack:
    def __init__(
        self, settings: Settings, progress: Progress = _stderr, *, manage_kafka: bool | None = None
    ) -> None:
        self.settings = settings
        self._manage_kafka = manage_kafka
        # Children started by this object are reaped by it (no zombies, no leak warnings).
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self.progress = progress
        self.home = settings.home.resolve()
        self.run_dir = self.home / "run"
        self.log_dir = self.home / "logs"
        self.services = [
            _Service("processor", "agentledger.stream_processors", settings.processor_port),
            _Service("sink", "agentledger.sinks", settings.sink_port),
        ]

    @property
    def manages_kafka(self) -> bool:
        """Only a single loopback bootstrap is ours to run; anything else is the user's cluster."""
        if self._manage_kafka is not None:
            return self._manage_kafka
        servers = self.settings.kafka.split(",")
        return len(servers) == 1 and servers[0].rsplit(":", 1)[0] in LOOPBACK_HOSTS

    @property
    def broker(self) -> KafkaBroker:
        return KafkaBroker(
            state_dir=self.home / "kafka",
            port=self.settings.kafka_port,
            controller_port=self.settings.kafka_controller_port,
            jar_dir=self.settings.kafka_jars,
            heap=self.settings.kafka_heap,
        )

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "AGENTLEDGER_KAFKA": self.settings.kafka,
                "AGENTLEDGER_HOME": str(self.home),
                "AGENTLEDGER_TOPIC_PREFIX": self.settings.topic_prefix,
                "AGENTLEDGER_PROCESSOR_PORT": str(self.settings.processor_port),
                "AGENTLEDGER_SINK_PORT": str(self.settings.sink_port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        # Secrets travel only through the environment of our own children, never on argv.
        if self.settings.clickhouse is not None:
            env["AGENTLEDGER_CLICKHOUSE"] = self.settings.clickhouse.get_secret_value()
        if self.settings.control_key is not None:
            env["AGENTLEDGER_CONTROL_KEY"] = self.settings.control_key.get_secret_value()
        if self.settings.api_token is not None:
            env["AGENTLEDGER_API_TOKEN"] = self.settings.api_token.get_secret_value()
        return env

    # -- pid files -------------------------------------------------------------------------

    def _pid_file(self, service: _Service) -> Path:
        return self.run_dir / f"{service.name}.pid"

    def _log_file(self, service: _Service) -> Path:
        return self.log_dir / f"{service.name}.log"

    def running_pid(self, service: _Service) -> int | None:
        child = self._children.get(service.name)
        if child is not None:
            # Our own child: trust the handle. Right after fork, /proc/<pid>/cmdline still shows
            # this process's command line until exec completes, so the check below would call a
            # healthy, starting child "stale".
            if child.poll() is None:
                return child.pid
            self._children.pop(service.name)
            self._pid_file(service).unlink(missing_ok=True)
            return None
        path = self._pid_file(service)
        try:
            pid = int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if pid_alive(pid) and _cmdline_mentions(pid, service.module):
            return pid
        path.unlink(missing_ok=True)
        return None

    # -- health ----------------------------------------------------------------------------

    def _health(self, service: _Service) -> tuple[bool, str]:
        url = f"http://127.0.0.1:{service.port}/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body = response.read().decode()
                return response.status == 200, body[:200]
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            return False, str(getattr(exc, "reason", exc))

    def status(self) -> list[ComponentStatus]:
        rows = []
        if self.manages_kafka:
            broker = self.broker
            ok = kafka_ready(self.settings.kafka, timeout_s=2.0)
            rows.append(
                ComponentStatus(
                    "kafka", ok, broker.running_pid(), self.settings.kafka, broker.log_file
                )
            )
        else:
            ok = kafka_ready(self.settings.kafka, timeout_s=3.0)
            rows.append(
                ComponentStatus(
                    "kafka", ok, None, self.settings.kafka, Path("-"), "external cluster"
                )
            )
        for service in self.services:
            pid = self.running_pid(service)
            healthy, detail = self._health(service) if pid is not None else (False, "not running")
            rows.append(
                ComponentStatus(
                    service.name,
                    healthy,
                    pid,
                    f"127.0.0.1:{service.port}",
                    self._log_file(service),
                    detail,
                )
            )
        return rows

    # -- up / down -------------------------------------------------------------------------

    def up(self, timeout_s: float = 120.0) -> list[ComponentStatus]:
        for folder in (self.home, self.run_dir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        if self.manages_kafka:
            self.broker.start(timeout_s=timeout_s, progress=self.progress)
        elif not kafka_ready(self.settings.kafka, timeout_s=10):
            raise StackError(
                f"Kafka at {self.settings.kafka} does not answer; check AGENTLEDGER_KAFKA"
            )
        created = ensure_topics(self.settings.kafka, topic_specs(self.settings.topics))
        if created:
            self.progress(f"created topics: {', '.join(created)}")
        # Create the shared secrets before the children start, so they never race to write them.
        self.settings.control_key_bytes()
        self.settings.api_token_value()
        for service in self.services:
            self._start(service)
        for service in self.services:
            self._wait_healthy(service, timeout_s)
        return self.status()

    def _start(self, service: _Service) -> None:
        if self.running_pid(service) is not None:
            self.progress(f"{service.name} already running")
            return
        log = self._log_file(service).open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", service.module],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.child_env(),
            cwd=self.home,
            start_new_session=True,
        )
        log.close()
        self._children[service.name] = proc
        self._pid_file(service).write_text(f"{proc.pid}\n")
        self.progress(
            f"starting {service.name} on 127.0.0.1:{service.port} (log: {self._log_file(service)})"
        )

    def _wait_healthy(self, service: _Service, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last_note = time.monotonic()
        while time.monotonic() < deadline:
            if self.running_pid(service) is None:
                raise StackError(
                    f"{service.name} exited during start; see {self._log_file(service)}"
                )
            healthy, _ = self._health(service)
            if healthy:
                self.progress(f"{service.name} healthy")
                return
            if time.monotonic() - last_note > 10:
                self.progress(f"  ... waiting for {service.name} to become healthy")
                last_note = time.monotonic()
            time.sleep(0.3)
        raise StackError(
            f"{service.name} was not healthy within {timeout_s:.0f}s; see {self._log_file(service)}"
        )

    def stop_service(self, name: str, *, kill: bool = False, timeout_s: float = 30.0) -> bool:
        service = next(s for s in self.services if s.name == name)
        pid = self.running_pid(service)
        if pid is None:
            return False
        _terminate(pid, 0 if kill else timeout_s)
        self._pid_file(service).unlink(missing_ok=True)
        child = self._children.pop(name, None)
        if child is not None:
            child.wait(timeout=30)
        return True

    def start_service(self, name: str, timeout_s: float = 120.0) -> None:
        service = next(s for s in self.services if s.name == name)
        self._start(service)
        self._wait_healthy(service, timeout_s)

    def down(self) -> list[str]:
        stopped = [s.name for s in self.services if self.stop_service(s.name)]
        if self.manages_kafka and self.broker.stop():
            stopped.append("kafka")
        return stopped

    def status_json(self) -> str:
        return json.dumps(
            [
                {
                    "name": r.name,
                    "healthy": r.healthy,
                    "pid": r.pid,
                    "address": r.address,
                    "log": str(r.log_file),
                    "detail": r.detail,
                }
                for r in self.status()
            ],
            indent=2,
        )
