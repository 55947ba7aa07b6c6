"""`agentledger up | down | status`: the local stack as background processes under the state dir.

Each component has a pid file in <home>/run and a log in <home>/logs. A pid file whose process is
gone, or now belongs to another program, is stale and is replaced, so `up` twice starts nothing
twice and a crashed component is restarted by the next `up`, or by the supervisor
(deploy/supervisor.py) that `up --supervise` starts.

Scale-out (settings kafka_brokers, processors, sinks): `up` runs a KRaft cluster of that many
loopback brokers and that many processor and sink workers. Worker i > 0 listens on the first
worker's port + 10i (processors 6066, 6076, ...; sinks 6067, 6077, ...). The shape is written to
<home>/run/stack.json, so `down` and `status` find every node and worker without the flags.
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
from agentledger.schemas.topic_specs import topic_specs
from agentledger.topic_admin import ensure_topics

from .kafka_broker import (
    KafkaBroker,
    KafkaCluster,
    _cmdline_mentions,
    _terminate,
    kafka_ready,
    pid_alive,
)

__all__ = [
    "SUPERVISOR",
    "WORKER_PORT_STEP",
    "ComponentStatus",
    "Stack",
    "StackError",
    "default_processors",
    "worker_ports",
]

Progress = Callable[[str], None]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
WORKER_PORT_STEP = 10
# The supervisor's pid file and log are <run>/supervisor.pid and <logs>/supervisor.log.
SUPERVISOR = "supervisor"
SUPERVISE_COMMAND = "supervise"
_SHAPE_KEYS = ("kafka_brokers", "processors", "sinks")


def default_processors(calls_partitions: int, cores: int | None = None) -> int:
    """Processor workers `up` runs when none are asked for: one per core (``os.cpu_count()``;
    a worker's data plane keeps about one core busy under load), at least 1, at most 64 (the
    settings' bound) and no more than the calls partitions (a worker beyond them owns none)."""
    found = os.cpu_count() if cores is None else cores
    return max(1, min(found or 1, 64, calls_partitions))


def worker_ports(first: int, count: int) -> list[int]:
    """Ports of ``count`` workers of one kind: the first one's, then +10 each."""
    ports = [first + WORKER_PORT_STEP * i for i in range(count)]
    if ports[-1] > 65535:
        raise ValueError(f"{count} workers from port {first} run past port 65535")
    return ports


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _health_status(body: str) -> str:
    """The "status" of a JSON /health body ("data plane stuck"...), else its start."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body[:200]
    if isinstance(parsed, dict) and "status" in parsed:
        return str(parsed["status"])
    return body[:200]


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
    # Lines shown under the table, e.g. a sink's background migration and its progress.
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Service:
    name: str
    module: str
    port: int
    env_port: str


class Stack:
    def __init__(
        self, settings: Settings, progress: Progress = _stderr, *, manage_kafka: bool | None = None
    ) -> None:
        self.home = settings.home.resolve()
        self.run_dir = self.home / "run"
        self.log_dir = self.home / "logs"
        self.settings = self._with_recorded_shape(settings)
        settings = self.settings
        self._manage_kafka = manage_kafka
        # Children started by this object are reaped by it (no zombies, no leak warnings).
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self.progress = progress
        if settings.sinks > 1 and settings.embedded_clickhouse:
            raise StackError(
                f"{settings.sinks} sink workers need a ClickHouse server: embedded chDB can be "
                "opened by one process only. Set AGENTLEDGER_CLICKHOUSE=http(s)://... or run "
                "one sink (--sinks 1)"
            )
        self.services = (
            [
                _Service(
                    "processor" if i == 0 else f"processor-{i + 1}",
                    "agentledger.stream_processors",
                    port,
                    "AGENTLEDGER_PROCESSOR_PORT",
                )
                for i, port in enumerate(worker_ports(settings.processor_port, settings.processors))
            ]
            + [
                _Service(
                    "sink" if i == 0 else f"sink-{i + 1}",
                    "agentledger.sinks",
                    port,
                    "AGENTLEDGER_SINK_PORT",
                )
                for i, port in enumerate(worker_ports(settings.sink_port, settings.sinks))
            ]
            + [
                # One dashboard: it reads the processor's /scopes and the sink's /query.
                _Service(
                    "dashboard",
                    "agentledger.dashboard",
                    settings.dashboard_port,
                    "AGENTLEDGER_DASHBOARD_PORT",
                ),
                # One OTLP/HTTP receiver: GenAI spans of OpenTelemetry-instrumented apps.
                _Service("otlp", "agentledger.otlp", settings.otlp_port, "AGENTLEDGER_OTLP_PORT"),
            ]
        )

    def _with_recorded_shape(self, settings: Settings) -> Settings:
        """Settings with the broker and worker counts of the running stack, when the caller gave
        none (`agentledger down` after `up --brokers 3`)."""
        try:
            recorded = json.loads((self.run_dir / "stack.json").read_text())
        except (FileNotFoundError, ValueError):
            return settings
        # Any count given (flag, env var or argument) describes the wanted stack: keep it.
        if any(k in settings.model_fields_set for k in _SHAPE_KEYS):
            return settings
        update = {k: int(recorded[k]) for k in _SHAPE_KEYS if isinstance(recorded.get(k), int)}
        return settings.model_copy(update=update)

    def shape_recorded(self) -> bool:
        """`up` got as far as a running Kafka (the stack exists, so it can be supervised)."""
        return (self.run_dir / "stack.json").exists()

    def _record_shape(self) -> None:
        shape = {k: getattr(self.settings, k) for k in _SHAPE_KEYS}
        (self.run_dir / "stack.json").write_text(json.dumps(shape) + "\n")

    @property
    def manages_kafka(self) -> bool:
        """Only a loopback bootstrap naming the first node (or every node) of the cluster `up`
        runs is ours; anything else is the user's cluster."""
        if self._manage_kafka is not None:
            return self._manage_kafka
        servers = self.settings.kafka.split(",")
        loopback = all(s.strip().rsplit(":", 1)[0] in LOOPBACK_HOSTS for s in servers)
        return loopback and len(servers) in (1, self.settings.kafka_brokers)

    @property
    def cluster(self) -> KafkaCluster:
        return KafkaCluster(
            state_dir=self.home / "kafka",
            size=self.settings.kafka_brokers,
            port=self.settings.kafka_port,
            controller_port=self.settings.kafka_controller_port,
            jar_dir=self.settings.kafka_jars,
            heap=self.settings.kafka_heap,
        )

    @property
    def broker(self) -> KafkaBroker:
        """The first node (the only one of a single-broker stack)."""
        return self.cluster.brokers[0]

    @property
    def bootstrap(self) -> str:
        """What the workers are given: every node of a cluster we run, so a client started
        while the first node is down still finds the others."""
        return self.cluster.bootstrap if self.manages_kafka else self.settings.kafka

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "AGENTLEDGER_KAFKA": self.bootstrap,
                "AGENTLEDGER_HOME": str(self.home),
                "AGENTLEDGER_TOPIC_PREFIX": self.settings.topic_prefix,
                "AGENTLEDGER_PROCESSOR_PORT": str(self.settings.processor_port),
                "AGENTLEDGER_SINK_PORT": str(self.settings.sink_port),
                "AGENTLEDGER_DASHBOARD_PORT": str(self.settings.dashboard_port),
                "AGENTLEDGER_OTLP_PORT": str(self.settings.otlp_port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        # A worker's own process runs a single worker; only `up` counts them.
        for key in _SHAPE_KEYS:
            env.pop(f"AGENTLEDGER_{key.upper()}", None)
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
            # The pid file may already name a newer process (`agentledger up` run beside a
            # supervisor that had started this child): only our own child's entry is stale.
            if _read_pid(self._pid_file(service)) != child.pid:
                return self.running_pid(service)
            self._pid_file(service).unlink(missing_ok=True)
            return None
        path = self._pid_file(service)
        pid = _read_pid(path)
        if pid is None:
            return None
        if pid_alive(pid) and _cmdline_mentions(pid, service.module):
            return pid
        path.unlink(missing_ok=True)
        return None

    # -- health ----------------------------------------------------------------------------

    def _health(self, service: _Service) -> tuple[bool, str]:
        _answered, healthy, detail = self._probe(service)
        return healthy, detail

    def _probe(self, service: _Service) -> tuple[bool, bool, str]:
        """(answered, healthy, detail) of the component's /health."""
        url = f"http://127.0.0.1:{service.port}/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body = response.read().decode()
                return True, response.status == 200, body[:200]
        except urllib.error.HTTPError as exc:
            # A 503 is an answer (a stalled processor says why in its body), not an outage.
            try:
                body = exc.read().decode(errors="replace")
            finally:
                exc.close()
            return True, False, f"HTTP {exc.code} {_health_status(body)}"
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            return False, False, str(getattr(exc, "reason", exc))

    def status(self) -> list[ComponentStatus]:
        rows = []
        if self.manages_kafka:
            brokers = self.cluster.brokers
            for i, broker in enumerate(brokers):
                rows.append(
                    ComponentStatus(
                        "kafka" if len(brokers) == 1 else f"kafka-{i + 1}",
                        kafka_ready(broker.bootstrap, timeout_s=2.0),
                        broker.running_pid(),
                        broker.bootstrap,
                        broker.log_file,
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
            # The sinks share one database: the first one answers for the migrations.
            notes = self._migration_notes() if healthy and service.name == "sink" else ()
            rows.append(
                ComponentStatus(
                    service.name,
                    healthy,
                    pid,
                    f"127.0.0.1:{service.port}",
                    self._log_file(service),
                    detail,
                    notes,
                )
            )
        supervisor = self._supervisor_row()
        if supervisor is not None:
            rows.append(supervisor)
        return rows

    def _migration_notes(self) -> tuple[str, ...]:
        """The sink's background migrations and their progress (sinks/rebuild.py), read
        through its query server (with chDB only the sink may open the database)."""
        from agentledger.review.query import QueryClient
        from agentledger.sinks.rebuild import progress_lines

        try:
            client = QueryClient.from_settings(self.settings)
            try:
                return tuple(progress_lines(client.query))
            finally:
                client.close()
        except RuntimeError as exc:  # QueryError, ClickHouseError: status still answers
            return (f"migration progress unavailable: {str(exc)[:200]}",)

    # -- up / down -------------------------------------------------------------------------

    def up(self, timeout_s: float = 120.0) -> list[ComponentStatus]:
        for folder in (self.home, self.run_dir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        if self.manages_kafka:
            self.cluster.start(timeout_s=timeout_s, progress=self.progress)
        elif not kafka_ready(self.settings.kafka, timeout_s=10):
            raise StackError(
                f"Kafka at {self.settings.kafka} does not answer; check AGENTLEDGER_KAFKA"
            )
        self._record_shape()
        created = ensure_topics(
            self.bootstrap,
            topic_specs(self.settings.topics, self.settings.calls_partitions),
            client_config=self.settings.kafka_client_config(),
        )
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
        self._stopped_file(service).unlink(missing_ok=True)
        if self.running_pid(service) is not None:
            self.progress(f"{service.name} already running")
            return
        for folder in (self.run_dir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        log = self._log_file(service).open("ab")
        env = self.child_env()
        env[service.env_port] = str(service.port)
        proc = subprocess.Popen(
            [sys.executable, "-m", service.module],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
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
        """Stop a component on purpose: a supervisor leaves it stopped until the next start."""
        service = self._service(name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._stopped_file(service).write_text("stopped on purpose\n")
        return self._stop(service, kill=kill, timeout_s=timeout_s)

    def restart_service(self, name: str, *, stop: str = "none", timeout_s: float = 30.0) -> Path:
        """The supervisor's restart: end the process (``stop`` "term" or "kill"; "none" when it
        is gone), start it again without waiting for health. Returns its log file."""
        service = self._service(name)
        if stop != "none":
            self._stop(service, kill=stop == "kill", timeout_s=timeout_s)
        self._start(service)
        return self._log_file(service)

    def stopped_on_purpose(self, name: str) -> bool:
        return self._stopped_file(self._service(name)).exists()

    def probe(self, name: str) -> tuple[bool, bool, str]:
        """(answered, healthy, detail) from the component's /health on loopback."""
        return self._probe(self._service(name))

    def pid_of(self, name: str) -> int | None:
        return self.running_pid(self._service(name))

    def log_file(self, name: str) -> Path:
        return self._log_file(self._service(name))

    def _service(self, name: str) -> _Service:
        for service in self.services:
            if service.name == name:
                return service
        raise ValueError(
            f"no component {name!r} in this stack; expected one of "
            f"{', '.join(s.name for s in self.services)}"
        )

    def _stopped_file(self, service: _Service) -> Path:
        return self.run_dir / f"{service.name}.stopped"

    def _stop(self, service: _Service, *, kill: bool, timeout_s: float) -> bool:
        pid = self.running_pid(service)
        if pid is None:
            return False
        _terminate(pid, 0 if kill else timeout_s)
        self._pid_file(service).unlink(missing_ok=True)
        child = self._children.pop(service.name, None)
        if child is not None:
            child.wait(timeout=30)
        return True

    def start_service(self, name: str, timeout_s: float = 120.0) -> None:
        service = self._service(name)
        self._start(service)
        self._wait_healthy(service, timeout_s)

    def down(self) -> list[str]:
        # The supervisor first, so it does not restart what is being stopped.
        stopped = [SUPERVISOR] if self.stop_supervisor() else []
        stopped += [s.name for s in self.services if self.stop_service(s.name)]
        if self.manages_kafka and self.cluster.stop():
            stopped.append("kafka")
        (self.run_dir / "stack.json").unlink(missing_ok=True)
        return stopped

    # -- the supervisor's process (its loop is deploy/supervisor.py) ---------------------------

    @property
    def supervisor_pid_file(self) -> Path:
        return self.run_dir / f"{SUPERVISOR}.pid"

    @property
    def supervisor_log_file(self) -> Path:
        return self.log_dir / f"{SUPERVISOR}.log"

    def supervisor_pid_file_names_me(self) -> bool:
        """The supervisor pid file names this process (the supervisor's own clean-up)."""
        return _read_pid(self.supervisor_pid_file) == os.getpid()

    def supervisor_pid(self) -> int | None:
        """The running supervisor's pid. A stale pid file is kept (unlike a component's), so
        `status` reports a supervisor that died; `down` and the next supervisor remove it."""
        pid = _read_pid(self.supervisor_pid_file)
        if pid is None:
            return None
        child = self._children.get(SUPERVISOR)
        if child is not None:
            return pid if child.poll() is None else None
        # argv is NUL-separated: this matches `... -m agentledger supervise` only.
        if pid_alive(pid) and _cmdline_mentions(pid, f"agentledger\0{SUPERVISE_COMMAND}"):
            return pid
        return None

    def start_supervisor(self) -> int:
        """Run `agentledger supervise` in the background (pid file, log); idempotent."""
        pid = self.supervisor_pid()
        if pid is not None:
            self.progress(f"supervisor already running (pid {pid})")
            return pid
        for folder in (self.run_dir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        log = self.supervisor_log_file.open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentledger", SUPERVISE_COMMAND],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.child_env(),
            cwd=self.home,
            start_new_session=True,
        )
        log.close()
        self._children[SUPERVISOR] = proc
        # Written here as well as by the supervisor itself, so a `down` right after `up` finds it.
        self.supervisor_pid_file.write_text(f"{proc.pid}\n")
        self.progress(
            f"supervisor started (pid {proc.pid}): it restarts a component that exits or stays "
            f"unhealthy; log: {self.supervisor_log_file}"
        )
        return proc.pid

    def stop_supervisor(self, timeout_s: float = 30.0) -> bool:
        pid = self.supervisor_pid()
        if pid is not None:
            _terminate(pid, timeout_s)
        self.supervisor_pid_file.unlink(missing_ok=True)
        child = self._children.pop(SUPERVISOR, None)
        if child is not None:
            child.wait(timeout=30)
        return pid is not None

    def _supervisor_row(self) -> ComponentStatus | None:
        if not self.supervisor_pid_file.exists():
            return None
        pid = self.supervisor_pid()
        detail = (
            "watching"
            if pid is not None
            else f"exited; see {self.supervisor_log_file}; `agentledger up --supervise` starts it"
        )
        return ComponentStatus(
            SUPERVISOR, pid is not None, pid, "-", self.supervisor_log_file, detail
        )

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
                    "notes": list(r.notes),
                }
                for r in self.status()
            ],
            indent=2,
        )
