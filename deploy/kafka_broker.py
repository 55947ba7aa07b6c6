"""A real single-node Apache Kafka broker (KRaft, broker+controller) run from Maven jars.

The jars come from Maven Central through deploy/kafka/pom.xml, resolved once into a shared cache.
Data and logs live under the stack's state dir; everything listens on loopback only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "KAFKA_VERSION",
    "BrokerError",
    "KafkaBroker",
    "KafkaCluster",
    "ensure_jars",
    "kafka_ready",
    "pid_alive",
]

KAFKA_VERSION = "4.1.1"
_HERE = Path(__file__).parent
POM = _HERE / "kafka" / "pom.xml"
LOG_CONFIG = _HERE / "kafka" / "log4j2.properties"

Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BrokerError(RuntimeError):
    """The broker could not be fetched, formatted or started; the message says what to do."""


def default_jar_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "agentledger" / f"kafka-{KAFKA_VERSION}"


def ensure_jars(jar_dir: Path | None = None, progress: Progress = _stderr) -> Path:
    """Resolve the broker jars with Maven into ``jar_dir`` unless they are already there."""
    target = jar_dir or default_jar_dir()
    if (target / ".complete").exists():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(
            "Maven (mvn) is needed once to fetch the Kafka broker jars from Maven Central: "
            "install it (Debian: apt-get install maven) or set AGENTLEDGER_KAFKA_JARS to a "
            "folder holding kafka_2.13 and its dependencies"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="kafka-jars-", dir=target.parent))
    progress(f"fetching Apache Kafka {KAFKA_VERSION} jars from Maven Central into {target} ...")
    cmd = [
        mvn,
        "-B",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}",
        "-DincludeScope=runtime",
        f"-Dkafka.version={KAFKA_VERSION}",
    ]
    downloaded = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            tail = [*tail, line.rstrip()][-30:]
            if "Downloaded from" in line:
                downloaded += 1
                if downloaded % 10 == 0:
                    progress(f"  ... {downloaded} artifacts downloaded")
        code = proc.wait()
    if code != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise BrokerError(
            f"mvn could not resolve the Kafka jars (exit {code}); check that Maven Central is "
            "reachable. Last output:\n" + "\n".join(tail)
        )
    (staging / ".complete").write_text(KAFKA_VERSION + "\n")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    progress(f"Kafka jars ready ({len(list(target.glob('*.jar')))} jars)")
    return target


def kafka_ready(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True when an AdminClient gets cluster metadata from ``bootstrap``."""
    from confluent_kafka.admin import AdminClient

    # log_level 0: a broker that is still starting refuses connections, which is expected here
    # and would otherwise print a librdkafka error line every 50 ms.
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 1000, "log_level": 0})
    try:
        admin.list_topics(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - any failure to answer means "not ready yet"
        return False
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == 0


@dataclass
class KafkaBroker:
    """One combined broker+controller bound to 127.0.0.1."""

    state_dir: Path
    port: int = 9092
    controller_port: int = 9093
    jar_dir: Path | None = None
    heap: str = "512m"
    node_id: int = 1
    # Multi-node: the static quorum ("1@host:port,2@...") and the replication of the internal
    # topics; a single node is its own quorum with replication 1.
    voters: str | None = None
    internal_replication: int = 1
    # Every node of one cluster is formatted with the same id (KafkaCluster sets it).
    cluster_id: str | None = None
    # Held so the child is reaped by this object, not reported as leaked when it is collected.
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "server.log"

    @property
    def stdout_file(self) -> Path:
        return self.state_dir / "stdout.log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "broker.pid"

    def _properties(self) -> str:
        voters = self.voters or f"{self.node_id}@127.0.0.1:{self.controller_port}"
        rf = self.internal_replication
        min_isr = min(2, rf)
        return "\n".join(
            [
                "process.roles=broker,controller",
                f"node.id={self.node_id}",
                f"controller.quorum.voters={voters}",
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "inter.broker.listener.name=PLAINTEXT",
                f"log.dirs={self.data_dir.resolve()}",
                "num.partitions=1",
                f"offsets.topic.replication.factor={rf}",
                "offsets.topic.num.partitions=10",
                f"transaction.state.log.replication.factor={rf}",
                f"transaction.state.log.min.isr={min_isr}",
                f"share.coordinator.state.topic.replication.factor={rf}",
                f"share.coordinator.state.topic.min.isr={min_isr}",
                f"default.replication.factor={rf}",
                f"min.insync.replicas={min_isr}",
                # A broker back from a crash takes its partitions' leadership back, so load
                # spreads again without an operator.
                "auto.leader.rebalance.enable=true",
                "leader.imbalance.check.interval.seconds=10",
                "group.initial.rebalance.delay.ms=0",
                # Topics are created explicitly with their config (see topics.py); faust creates its
                # changelog topics through the admin API, so nothing relies on auto-creation.
                "auto.create.topics.enable=false",
                "log.retention.check.interval.ms=60000",
                "",
            ]
        )

    def _java(self) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise BrokerError(
                "Java 17+ is needed to run the Kafka broker: install a JDK "
                "(Debian: apt-get install openjdk-17-jre-headless)"
            )
        jars = ensure_jars(self.jar_dir)
        return [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG_CONFIG}",
            f"-Dagentledger.log.file={self.log_file.resolve()}",
            "-cp",
            str(jars / "*"),
        ]

    def config_file(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / "server.properties"
        path.write_text(self._properties())
        return path

    def format(self) -> None:
        """Format KRaft storage once; a formatted data dir is kept across restarts."""
        config = self.config_file()
        if (self.data_dir / "meta.properties").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cluster_id = self.cluster_id or _kafka_cluster_id()
        result = subprocess.run(
            [
                *self._java(),
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(config),
                "--ignore-formatted",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise BrokerError(
                f"formatting Kafka storage in {self.data_dir} failed:\n"
                f"{result.stdout}{result.stderr}"
            )

    def running_pid(self) -> int | None:
        if not self.pid_file.exists():
            return None
        try:
            pid = int(self.pid_file.read_text().strip())
        except ValueError:
            self.pid_file.unlink(missing_ok=True)
            return None
        if pid_alive(pid) and _cmdline_mentions(pid, "kafka.Kafka"):
            return pid
        # Stale: the broker died without cleaning up, or the pid now belongs to another program.
        self.pid_file.unlink(missing_ok=True)
        return None

    def start(self, timeout_s: float = 90.0, progress: Progress = _stderr) -> None:
        """Start in the background (idempotent) and wait until an AdminClient answers."""
        self.launch(progress)
        self.wait_ready(timeout_s)

    def launch(self, progress: Progress = _stderr) -> None:
        """Start the process unless it runs; do not wait (a cluster's nodes wait for quorum)."""
        if self.running_pid() is None:
            self.format()
            config = self.config_file()
            out = self.stdout_file.open("ab")
            proc = subprocess.Popen(
                [*self._java(), "kafka.Kafka", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            out.close()
            self._process = proc
            self.pid_file.write_text(f"{proc.pid}\n")
            progress(f"starting Kafka {KAFKA_VERSION} on {self.bootstrap} (log: {self.log_file})")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if kafka_ready(self.bootstrap, timeout_s=1.0):
                return
            if self.running_pid() is None:
                raise BrokerError(
                    f"the Kafka broker exited during start; see {self.log_file} and "
                    f"{self.stdout_file}. A port in use? Set AGENTLEDGER_KAFKA to another port."
                )
            time.sleep(0.5)
        raise BrokerError(
            f"Kafka did not answer on {self.bootstrap} within {timeout_s:.0f}s; see {self.log_file}"
        )

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop gracefully (SIGTERM), then SIGKILL after ``timeout_s``. True if it was running."""
        pid = self.running_pid()
        if pid is None:
            return False
        _terminate(pid, timeout_s)
        self.pid_file.unlink(missing_ok=True)
        self._reap()
        return True

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        pid = self.running_pid()
        if pid is not None:
            _terminate(pid, 0)
            self.pid_file.unlink(missing_ok=True)
            self._reap()

    def _reap(self) -> None:
        if self._process is not None:
            self._process.wait(timeout=30)
            self._process = None


@dataclass
class KafkaCluster:
    """``size`` combined broker+controller nodes on loopback with a static quorum of all of them.

    Node i (0-based) listens on ``port + 2i`` with its controller on ``controller_port + 2i``
    and keeps its data in ``state_dir/node-<i+1>``. With 3 or more nodes the internal topics get
    replication 3 and min.insync.replicas 2, so one node may die without losing an acked write.
    A single-node cluster is exactly KafkaBroker with its old state dir.
    """

    state_dir: Path
    size: int = 3
    port: int = 9092
    controller_port: int = 9093
    jar_dir: Path | None = None
    heap: str = "512m"
    _brokers: list[KafkaBroker] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"a Kafka cluster needs at least 1 broker, got {self.size}")
        if self.size == 1:
            self._brokers = [
                KafkaBroker(
                    self.state_dir, self.port, self.controller_port, self.jar_dir, self.heap
                )
            ]
            return
        ports = [(self.port + 2 * i, self.controller_port + 2 * i) for i in range(self.size)]
        used = [p for pair in ports for p in pair]
        if len(set(used)) != len(used):
            raise ValueError(
                f"broker and controller ports overlap ({sorted(used)}): choose a controller port "
                "that is not port + 2i for any broker i, e.g. port + 1"
            )
        voters = ",".join(f"{i + 1}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports))
        cluster_id = self._cluster_id()
        self._brokers = [
            KafkaBroker(
                self.state_dir / f"node-{i + 1}",
                port=p,
                controller_port=c,
                jar_dir=self.jar_dir,
                heap=self.heap,
                node_id=i + 1,
                voters=voters,
                internal_replication=min(3, self.size),
                cluster_id=cluster_id,
            )
            for i, (p, c) in enumerate(ports)
        ]

    def _cluster_id(self) -> str:
        path = self.state_dir / "cluster.id"
        if path.exists():
            return path.read_text().strip()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        value = _kafka_cluster_id()
        path.write_text(value + "\n")
        return value

    @property
    def brokers(self) -> list[KafkaBroker]:
        return list(self._brokers)

    @property
    def bootstrap(self) -> str:
        return ",".join(b.bootstrap for b in self._brokers)

    def start(self, timeout_s: float = 120.0, progress: Progress = _stderr) -> None:
        """Start every node not running, then wait until each answers (idempotent). All are
        launched before any wait: a static quorum elects no leader until a majority is up."""
        for broker in self._brokers:
            broker.format()
        for broker in self._brokers:
            broker.launch(progress)
        deadline = time.monotonic() + timeout_s
        for broker in self._brokers:
            broker.wait_ready(max(1.0, deadline - time.monotonic()))
        if self.size > 1:
            _wait_for_brokers(self.bootstrap, self.size, max(1.0, deadline - time.monotonic()))

    def stop(self, timeout_s: float = 30.0) -> bool:
        # Reverse order, so the last node to stop is the first one `up` waits for.
        stopped = [b.stop(timeout_s) for b in reversed(self._brokers)]
        return any(stopped)

    def running_pids(self) -> list[int | None]:
        return [b.running_pid() for b in self._brokers]


def _wait_for_brokers(bootstrap: str, count: int, timeout_s: float) -> None:
    """Block until the cluster metadata lists ``count`` brokers (a node answers as soon as it
    is up, before the others registered with the quorum)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        try:
            seen = len(admin.list_topics(timeout=2.0).brokers)
        except KafkaException:  # not answering yet: retried until the deadline
            seen = 0
        if seen >= count:
            return
        time.sleep(0.3)
    raise BrokerError(f"only {seen} of {count} Kafka brokers registered within {timeout_s:.0f}s")


def _terminate(pid: int, timeout_s: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM if timeout_s > 0 else signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 10
        time.sleep(0.1)


def _cmdline_mentions(pid: int, needle: str) -> bool:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no procfs (macOS): trust the live pid
    return needle.encode() in raw


def _kafka_cluster_id() -> str:
    # Kafka's random-uuid is a url-safe base64 of 16 random bytes without padding, and, like
    # Kafka's own Uuid.randomUuid, never starts with "-": the storage tool would read it as a flag.
    import base64

    while True:
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not value.startswith("-"):
            return value
