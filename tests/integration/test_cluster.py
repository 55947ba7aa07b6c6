"""A real 3-broker KRaft cluster on loopback: topics replicated 3 with min.insync.replicas 2,
and one broker killed (SIGKILL) under load while the shim emits and the processor and sink run.
Nothing acknowledged may be lost, totals stay exact against the shim's own ground truth, and a
budget crossed while the broker is down still stops the agent."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource
from genai_prices import Usage, calc_price

from agentledger.budgets import apply_policies
from agentledger.config import Settings
from agentledger.deploy.kafka_broker import BrokerError, KafkaCluster
from agentledger.deploy.stack import Stack
from agentledger.producers import BudgetExceeded, Ledger
from agentledger.review.query import QueryClient
from agentledger.schemas import BudgetPolicy, PolicyFile, usd_to_nano
from agentledger.schemas.topic_specs import topic_specs
from agentledger.stream_processors.batch_kafka import data_plane_group, worker_identity
from agentledger.stream_processors.client import fetch_state
from agentledger.topic_admin import ensure_topics
from tests.conftest import free_port

# About 1.5 minutes here (2.5 on a machine busy with other test runs): three JVMs start, one is
# killed and restarted. `make test-cluster` also runs the `agentledger up --brokers 3` test.
pytestmark = [pytest.mark.integration, pytest.mark.cluster]

SIZES = [(374, 44), (396, 109), (879, 55), (91, 16), (2738, 232), (733, 178)]
WORKFLOW = "wf-cluster"


def free_port_block(width: int) -> int:
    """A base port with ``width`` consecutive free ports (broker i on base+2i, controller +1).

    Drawn below the kernel's ephemeral range: the cluster takes half a minute to start, and a
    port from that range may meanwhile become the local end of some outgoing connection."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ceiling = min(low, 65535) - width
    for _ in range(200):
        base = random.randrange(20_000, max(ceiling, 20_001))
        try:
            for port in range(base, base + width):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no block of {width} free loopback ports")


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout_s: float,
    detail: Callable[[], str] = lambda: "",
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} {detail()}")
        time.sleep(0.2)


def price_nano(model: str, input_tokens: int, output_tokens: int) -> int:
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return usd_to_nano(calc_price(usage, model_ref=model, provider_id="openai").total_price)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    jars = os.environ.get("AGENTLEDGER_KAFKA_JARS")
    for attempt in range(3):
        base = free_port_block(6)
        cluster = KafkaCluster(
            tmp_path_factory.mktemp("kafka-cluster"),
            size=3,
            port=base,
            controller_port=base + 1,
            jar_dir=Path(jars) if jars else None,
            # The default 512m: a broker of a 3-node cluster ran out of a 256m heap at start.
            heap="512m",
        )
        try:
            cluster.start(timeout_s=180, progress=lambda _m: None)
        except BrokerError:
            # Another process on this machine took one of the probed ports meanwhile.
            for broker in cluster.brokers:
                broker.kill()
            if attempt == 2:
                raise
            continue
        break
    try:
        yield cluster
    finally:
        # Test data only: SIGKILL is enough and saves the graceful shutdown's half minute.
        for broker in cluster.brokers:
            broker.kill()


class Load:
    """Steady agents calling through the shim in a thread; counts what it emitted."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.count = 0
        self.cost = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        agents = [self.ledger.agent(f"cl-steady-{i}", workflow=WORKFLOW) for i in range(4)]
        n = 0
        try:
            while not self.stop.is_set():
                tokens_in, tokens_out = SIZES[n % len(SIZES)]
                with agents[n % len(agents)].call(provider="openai", model="gpt-4o-mini") as call:
                    call.record(input_tokens=tokens_in, output_tokens=tokens_out)
                self.cost += price_nano("gpt-4o-mini", tokens_in, tokens_out)
                self.count += 1
                n += 1
                time.sleep(0.002)
        except BaseException as exc:  # surfaced by finish(), not swallowed
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert self.error is None, f"the load thread failed: {self.error!r}"


def _topic_config(admin: AdminClient, name: str, timeout_s: float = 20.0) -> Any:
    """The topic's config. A broker other than the one that created the topic may not know it
    for a moment (its metadata cache lags), and answers UNKNOWN_TOPIC_OR_PART meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        (future,) = admin.describe_configs([ConfigResource("topic", name)]).values()
        try:
            return future.result(timeout=10)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_topics_are_replicated_three_times_with_min_isr_two(cluster: KafkaCluster) -> None:
    settings = Settings(kafka=cluster.bootstrap, topic_prefix="rf.")
    ensure_topics(cluster.bootstrap, topic_specs(settings.topics))
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    names = (settings.topics.calls, settings.topics.control)
    # Created topics reach each broker's metadata a moment after the controller has them (a
    # fresh-clone CI run once listed none of them yet).
    deadline = time.monotonic() + 30
    topics = admin.list_topics(timeout=10).topics
    while not all(name in topics for name in names):
        assert time.monotonic() < deadline, f"topics {names} not in the metadata after 30 s"
        time.sleep(0.2)
        topics = admin.list_topics(timeout=10).topics
    for name in names:
        assert {len(p.replicas) for p in topics[name].partitions.values()} == {3}
        assert _topic_config(admin, name)["min.insync.replicas"].value == "2"


def test_a_broker_killed_under_load_loses_nothing_and_enforcement_holds(
    cluster: KafkaCluster, settings_factory: Callable[..., Settings]
) -> None:
    settings = settings_factory(kafka=cluster.bootstrap)
    ensure_topics(cluster.bootstrap, topic_specs(settings.topics))
    stack = Stack(settings, progress=lambda _m: None, manage_kafka=False)
    limit = Decimal("0.02")
    apply_policies(
        settings, PolicyFile(budgets=[BudgetPolicy(scope="agent:cl-runaway", limit_usd=limit)])
    )
    ledger = Ledger(settings)
    load = Load(ledger)
    victim = cluster.brokers[0]  # the first bootstrap address: clients must move on
    try:
        stack.start_service("processor", timeout_s=180)
        stack.start_service("sink", timeout_s=180)
        assert ledger.wait_for_control(30)
        load.thread.start()
        wait_for("load before the kill", lambda: load.count >= 300, 60)

        victim.kill()
        killed_at = load.count
        # The runaway crosses its budget while the broker is down; the STOP must still come.
        runaway = ledger.agent("cl-runaway", workflow=WORKFLOW)
        runaway_cost = runaway_calls = 0
        n = 0
        while runaway_cost < usd_to_nano(limit):
            tokens_in, tokens_out = SIZES[n % len(SIZES)]
            n += 1
            with runaway.call(provider="openai", model="gpt-4o") as call:
                call.record(input_tokens=tokens_in, output_tokens=tokens_out)
            runaway_cost += price_nano("gpt-4o", tokens_in, tokens_out)
            runaway_calls += 1

        def refused() -> bool:
            try:
                runaway.check_budget()
            except BudgetExceeded:
                return True
            return False

        wait_for("a STOP while a broker is down", refused, 60)
        assert victim.running_pid() is None, "the broker came back before the STOP arrived"
        wait_for("load while the broker is down", lambda: load.count >= killed_at + 300, 60)

        victim.start(timeout_s=120, progress=lambda _m: None)
        back_at = load.count
        wait_for("load after the broker is back", lambda: load.count >= back_at + 300, 60)
        load.finish()
        assert ledger.transport.flush(30) == 0
    finally:
        load.stop.set()
        ledger.close()

    emitted = load.count + runaway_calls
    expected = load.cost + runaway_cost

    def processor_total() -> int:
        report = fetch_state(settings, f"workflow:{WORKFLOW}")
        # Every UTC day bucket once (weeks and months hold the same spend again).
        return sum(int(v) for k, v in report["buckets"].items() if k.startswith("day:"))

    def agents_total() -> int:
        total = 0
        for agent in [*(f"cl-steady-{i}" for i in range(4)), "cl-runaway"]:
            report = fetch_state(settings, f"agent:{agent}")
            total += sum(int(v) for k, v in report["buckets"].items() if k.startswith("day:"))
        return total

    client = QueryClient.from_settings(settings)

    def sink_totals() -> tuple[int, int]:
        count, cost = client.query(
            "SELECT count(), sum(toInt128(cost_nano_usd)) FROM calls "
            "WHERE workflow_id = {wf:String}",
            {"wf": WORKFLOW},
        ).rows[0]
        return int(count), int(cost or 0)

    try:
        wait_for(
            "the processor's total and the sink's rows",
            lambda: processor_total() >= expected and sink_totals()[0] >= emitted,
            90,
            lambda: (
                f"processor {processor_total()} of {expected} nano-USD "
                f"(agent scopes, first hop: {agents_total()}); "
                f"sink {sink_totals()} of {(emitted, expected)}"
            ),
        )
        assert processor_total() == expected
        assert sink_totals() == (emitted, expected)
    finally:
        client.close()
        stack.down()


def java_hash(text: str) -> int:
    """Java's String.hashCode (over UTF-16 code units, 32-bit wrap)."""
    h = 0
    data = text.encode("utf-16-be")
    for i in range(0, len(data), 2):
        h = (31 * h + int.from_bytes(data[i : i + 2], "big")) & 0xFFFFFFFF
    return h


def coordinator_partition(key: str, partitions: int) -> int:
    """The internal-topic partition whose leader coordinates ``key`` (a group id in
    __consumer_offsets, a transactional id in __transaction_state): Kafka's
    ``Utils.abs(key.hashCode()) % partitions``; Utils.abs is Math.abs, except that
    Integer.MIN_VALUE gives 0."""
    h = java_hash(key)
    signed = h - (1 << 32) if h & 0x80000000 else h
    return (0 if signed == -(1 << 31) else abs(signed)) % partitions


def internal_leaders(admin: AdminClient, topic: str) -> dict[int, int]:
    """partition -> leader node id of an internal topic (each partition's coordinator)."""
    meta = admin.list_topics(topic, timeout=10).topics[topic]
    assert meta.error is None, meta.error
    return {p: info.leader for p, info in meta.partitions.items()}


def warm_internal_topics(bootstrap: str, settings: Settings) -> None:
    """Make Kafka create __consumer_offsets and __transaction_state (on first use), so their
    leaders can be looked up before the processor starts."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "transactional.id": f"warm-{settings.topic_prefix}"}
    )
    producer.init_transactions(120)
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"warm-{settings.topic_prefix}"}
    )
    try:
        consumer.commit(offsets=[TopicPartition(settings.topics.calls, 0, 0)], asynchronous=False)
    finally:
        consumer.close()


@pytest.mark.skipif(
    os.environ.get("AGENTLEDGER_TEST_CLUSTER") != "1",
    reason="the coordinator kill takes minutes: run with `make test-cluster`",
)
def test_the_processors_coordinator_broker_killed_under_load_loses_nothing(
    cluster: KafkaCluster, settings_factory: Callable[..., Settings]
) -> None:
    """The broker coordinating the data plane's transactions (and, chosen so, its consumer
    group) is SIGKILLed under load: librdkafka must find the new coordinators (the leaders of
    the internal topics' partitions move to the surviving replicas) and commit on; totals in
    the processor and the sink equal the shim's ground truth to the nano-dollar."""
    settings = settings_factory(kafka=cluster.bootstrap)
    ensure_topics(cluster.bootstrap, topic_specs(settings.topics))
    warm_internal_topics(cluster.bootstrap, settings)
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    offsets = internal_leaders(admin, "__consumer_offsets")
    txns = internal_leaders(admin, "__transaction_state")
    group_leader = offsets[coordinator_partition(data_plane_group(settings), len(offsets))]
    # The transactional id follows the web port: pick one whose transaction coordinator is
    # the group coordinator too, so one kill takes both away.
    for _ in range(200):
        candidate = settings.model_copy(update={"processor_port": free_port()})
        txn_id = worker_identity(candidate)
        if txns[coordinator_partition(txn_id, len(txns))] == group_leader:
            settings = candidate
            break
    else:
        raise AssertionError("no port puts both coordinators on one broker")
    stack = Stack(settings, progress=lambda _m: None, manage_kafka=False)
    try:
        _coordinator_killed_under_load(cluster, admin, settings, stack, group_leader)
    finally:
        stack.down()


def _coordinator_killed_under_load(
    cluster: KafkaCluster,
    admin: AdminClient,
    settings: Settings,
    stack: Stack,
    group_leader: int,
) -> None:
    ledger = Ledger(settings)
    load = Load(ledger)
    health: list[str] = []

    def txn_coordinator() -> int:
        leaders = internal_leaders(admin, "__transaction_state")
        return leaders[coordinator_partition(worker_identity(settings), len(leaders))]

    try:
        stack.start_service("processor", timeout_s=180)
        stack.start_service("sink", timeout_s=180)
        assert ledger.wait_for_control(30)
        load.thread.start()
        wait_for("load before the kill", lambda: load.count >= 300, 60)
        group = admin.describe_consumer_groups([data_plane_group(settings)])[
            data_plane_group(settings)
        ].result(timeout=10)
        # The group coordinator is killed, whichever broker leads it now (leadership can move
        # under load between the arrangement and this moment); it is also the transaction
        # coordinator when nothing moved.
        victim_id = group.coordinator.id
        print(
            f"killing broker {victim_id}: group coordinator (arranged {group_leader}); "
            f"transaction coordinator {txn_coordinator()}"
        )
        victim = cluster.brokers[victim_id - 1]
        victim.kill()
        killed_at = load.count

        def watched(check: Callable[[], bool]) -> Callable[[], bool]:
            def both() -> bool:
                health.append(_processor_status(settings))
                return check()

            return both

        # The controller moves the coordinators once the dead broker's session ends (~9 s).
        wait_for(
            "the transaction coordinator to move",
            watched(lambda: txn_coordinator() != victim_id),
            90,
        )
        moved_at = load.count
        wait_for(
            "load while the coordinator is down",
            watched(lambda: load.count >= max(killed_at, moved_at) + 300),
            120,
        )
        victim.start(timeout_s=120, progress=lambda _m: None)
        back_at = load.count
        wait_for("load after the broker is back", lambda: load.count >= back_at + 300, 60)
        load.finish()
        assert ledger.transport.flush(30) == 0
    finally:
        load.stop.set()
        ledger.close()

    expected = load.cost
    emitted = load.count
    client = QueryClient.from_settings(settings)

    def processor_total() -> int:
        report = fetch_state(settings, f"workflow:{WORKFLOW}")
        return sum(int(v) for k, v in report["buckets"].items() if k.startswith("day:"))

    def agents_total() -> int:
        total = 0
        for agent in (f"cl-steady-{i}" for i in range(4)):
            report = fetch_state(settings, f"agent:{agent}")
            total += sum(int(v) for k, v in report["buckets"].items() if k.startswith("day:"))
        return total

    def sink_totals() -> tuple[int, int]:
        count, cost = client.query(
            "SELECT count(), sum(toInt128(cost_nano_usd)) FROM calls "
            "WHERE workflow_id = {wf:String}",
            {"wf": WORKFLOW},
        ).rows[0]
        return int(count), int(cost or 0)

    try:
        wait_for(
            "the processor's totals and the sink's rows",
            lambda: (
                agents_total() >= expected
                and processor_total() >= expected
                and sink_totals()[0] >= emitted
            ),
            120,
            lambda: (
                f"agents {agents_total()}, workflow {processor_total()} of {expected} nano-USD; "
                f"sink {sink_totals()} of {(emitted, expected)}; processor /health during "
                f"the outage: {sorted(set(health))}\n{_log_tail(stack)}"
            ),
        )
        assert agents_total() == expected
        assert processor_total() == expected
        assert sink_totals() == (emitted, expected)
        print(
            f"\n{emitted} calls, coordinator broker {victim_id} killed after {killed_at}; "
            f"processor /health while it was down: {sorted(set(health))}"
        )
    finally:
        client.close()


def _processor_status(settings: Settings) -> str:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{settings.processor_port}/health", timeout=2
        ) as response:
            return str(json.loads(response.read()).get("status"))
    except urllib.error.HTTPError as exc:
        try:
            return f"{exc.code} {json.loads(exc.read()).get('status')}"
        except ValueError:
            return f"{exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"unreachable ({exc})"


def _log_tail(stack: Stack) -> str:
    path = stack.log_file("processor")
    return path.read_text(errors="replace")[-6000:] if path.exists() else "(no processor log)"
