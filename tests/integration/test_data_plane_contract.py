"""The data plane's contract, one suite on two Kafkas: every test runs the real ``DataPlane``
(in a thread of the test) once on the in-memory Kafka (``stream_processors.memory_kafka``) and
once on the real broker of the session, with the same client configs (``batch_kafka``).

What it must do whatever the Kafka: count each event exactly once (duplicates skipped), give a
partition's states to its new owner through the changelog, read an aborted transaction again
without counting anything twice, dead-letter a bad record with its reason, and answer an
agent's allowance request. Outputs are read back with read_committed, as every reader does."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from agentledger.config import Settings
from agentledger.schemas import (
    AllowanceGrant,
    AllowanceRequest,
    BudgetPolicy,
    CallEvent,
    ControlAction,
    ControlCommand,
    InvalidMessage,
    verify_command,
    verify_grant,
)
from agentledger.schemas.partitioning import crc32_partition
from agentledger.schemas.topic_specs import topic_specs
from agentledger.stream_processors.app import SCOPE_SPEND_TABLE, SPEND_TABLE, data_plane_topics
from agentledger.stream_processors.batch_kafka import (
    calls_consumer_config,
    command_producer_config,
    data_plane_group,
    requests_consumer_config,
    restore_consumer_config,
    transactional_producer_config,
)
from agentledger.stream_processors.data_plane import DataPlane
from agentledger.stream_processors.memory_kafka import MemoryBroker
from agentledger.stream_processors.metrics import ProcessorMetrics
from agentledger.stream_processors.periods import DAY_MS
from agentledger.stream_processors.policies import PolicyBook
from agentledger.stream_processors.recovery import decode_key
from agentledger.stream_processors.scopes import ensure_scopes_topic
from agentledger.stream_processors.state import SpendState
from agentledger.stream_processors.state_codec import decode_state
from agentledger.topic_admin import ensure_topics
from tests.conftest import SettingsFactory, free_port
from tests.integration.test_processor_worker import avoid_midnight

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PARTITIONS = 4
AGENTS = [f"contract-{i}" for i in range(10)]
#: Kafka needs a session timeout to hand a closed static member's partitions on (10 s).
SETTLE_S = 90.0

Record = tuple[int, int, bytes | None, bytes | None]
"""(partition, offset, key, value) of a record read back"""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- the two Kafkas ---------------------------------------------------------------------------


class Backend(Protocol):
    name: str
    settings: Settings

    def consumer(self, config: dict[str, Any]) -> Any: ...
    def producer(self, config: dict[str, Any]) -> Any: ...
    def send(self, topic: str, value: bytes, key: bytes, partition: int) -> None:
        """Write one record outside any transaction, acknowledged when this returns."""

    def read(self, topic: str, *, committed: bool = True) -> list[Record]:
        """Every record of ``topic`` now (read_committed unless told), partition by
        partition."""

    def committed(self, partitions: int, topic: str | None = None) -> dict[int, int]:
        """The data plane group's committed offset per calls (or ``topic``) partition
        (absent: none)."""

    def ends(self, topic: str, partitions: int) -> dict[int, int]: ...


class MemoryBackend:
    name = "memory"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker = MemoryBroker()
        for spec in topic_specs(settings.topics, PARTITIONS):
            self.broker.create_topic(spec.name, spec.partitions)
        topics = data_plane_topics(settings)
        for name in (topics.changelog, topics.scope_changelog, topics.scopes):
            self.broker.create_topic(name, PARTITIONS)

    def consumer(self, config: dict[str, Any]) -> Any:
        return self.broker.consumer(config)

    def producer(self, config: dict[str, Any]) -> Any:
        return self.broker.producer(config)

    def send(self, topic: str, value: bytes, key: bytes, partition: int) -> None:
        self.broker.append(topic, value, key, partition=partition)

    def read(self, topic: str, *, committed: bool = True) -> list[Record]:
        return [
            (m.partition(), m.offset(), m.key(), m.value())
            for m in self.broker.records(topic, read_committed=committed)
        ]

    def committed(self, partitions: int, topic: str | None = None) -> dict[int, int]:
        calls = topic or self.settings.topics.calls
        found = self.broker.committed(data_plane_group(self.settings))
        return {p: o for (t, p), o in found.items() if t == calls}

    def ends(self, topic: str, partitions: int) -> dict[int, int]:
        return {p: self.broker.watermarks(topic, p)[1] for p in range(partitions)}


class KafkaBackend:
    name = "kafka"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        ensure_topics(settings.kafka, topic_specs(settings.topics, PARTITIONS))
        ensure_scopes_topic(settings, PARTITIONS, tables=(SPEND_TABLE, SCOPE_SPEND_TABLE))
        self._producer = Producer(
            {"bootstrap.servers": settings.kafka, "acks": "all", "enable.idempotence": True}
        )

    def consumer(self, config: dict[str, Any]) -> Any:
        return Consumer(config)

    def producer(self, config: dict[str, Any]) -> Any:
        return Producer(config)

    def send(self, topic: str, value: bytes, key: bytes, partition: int) -> None:
        self._producer.produce(topic, value, key, partition=partition)
        assert self._producer.flush(30) == 0

    def read(self, topic: str, *, committed: bool = True) -> list[Record]:
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka,
                "group.id": f"contract-reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed" if committed else "read_uncommitted",
            }
        )
        found: list[Record] = []
        try:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            left = set(partitions)
            deadline = time.monotonic() + 30
            while left:
                assert time.monotonic() < deadline, f"{topic} partitions {left} not read to end"
                for message in consumer.consume(num_messages=1000, timeout=0.2):
                    error = message.error()
                    if error is not None:
                        assert error.code() == KafkaError._PARTITION_EOF, error
                        left.discard(message.partition())
                        continue
                    found.append(
                        (message.partition(), message.offset(), message.key(), message.value())
                    )
        finally:
            consumer.close()
        return sorted(found, key=lambda r: (r[0], r[1]))

    def committed(self, partitions: int, topic: str | None = None) -> dict[int, int]:
        consumer = Consumer(
            {"bootstrap.servers": self.settings.kafka, "group.id": data_plane_group(self.settings)}
        )
        try:
            calls = topic or self.settings.topics.calls
            tps = [TopicPartition(calls, p) for p in range(partitions)]
            try:
                found = consumer.committed(tps, 10)
            except KafkaException as exc:
                # A fresh broker's group coordinator may still be loading: ask again later.
                if not exc.args[0].retriable() and exc.args[0].code() not in (
                    KafkaError.NOT_COORDINATOR,
                    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                    KafkaError.COORDINATOR_NOT_AVAILABLE,
                ):
                    raise
                return {}
            return {tp.partition: tp.offset for tp in found if tp.offset >= 0}
        finally:
            consumer.close()

    def ends(self, topic: str, partitions: int) -> dict[int, int]:
        consumer = Consumer({"bootstrap.servers": self.settings.kafka, "group.id": "contract-ends"})
        try:
            return {
                p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(partitions)
            }
        finally:
            consumer.close()


@pytest.fixture(params=["memory", "kafka"])
def backend(request: pytest.FixtureRequest, settings_factory: SettingsFactory) -> Backend:
    avoid_midnight()  # every event falls on today's UTC day
    if request.param == "memory":
        return MemoryBackend(settings_factory())
    kafka: str = request.getfixturevalue("kafka_bootstrap")
    return KafkaBackend(settings_factory(kafka=kafka))


# -- running the data plane -------------------------------------------------------------------


class AbortAt:
    """A transactional producer whose ``at``-th commit of a transaction with records fails
    with an abortable error instead of committing, its records on the broker: what a
    coordinator that loses a transaction, or a produce that fails inside it, does."""

    def __init__(self, inner: Any, at: int) -> None:
        self.inner = inner
        self.at = at
        self.fired = 0
        self._records = 0
        self._commits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def produce(self, *args: Any, **kwargs: Any) -> None:
        self._records += 1
        self.inner.produce(*args, **kwargs)

    def begin_transaction(self) -> None:
        self._records = 0
        self.inner.begin_transaction()

    def commit_transaction(self, timeout: float = -1) -> None:
        if self._records:
            self._commits += 1
            if self._commits == self.at:
                self.fired += 1
                self.inner.flush(timeout)
                raise KafkaException(
                    KafkaError(KafkaError._STATE, "injected by the test", txn_requires_abort=True)
                )
        self.inner.commit_transaction(timeout)


@dataclass
class Plane:
    plane: DataPlane
    thread: threading.Thread
    producers: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        self.plane.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the data plane did not stop"

    def check(self) -> None:
        assert self.plane.error is None, f"the data plane failed: {self.plane.error}"


def start_plane(
    backend: Backend,
    *,
    port: int | None = None,
    book: PolicyBook | None = None,
    wrap: Callable[[Any], Any] | None = None,
) -> Plane:
    """A data plane as a worker runs it (``build_data_plane``'s wiring), on ``backend``; a
    second worker gets its own port, which names its group member and transactional id."""
    settings = backend.settings
    if port is not None:
        settings = settings.model_copy(update={"processor_port": port})
    if book is None:
        book = PolicyBook()
        book.ready.set()
    producers: list[Any] = []

    def new_producer() -> Any:
        producer = backend.producer(transactional_producer_config(settings))
        if wrap is not None:
            producer = wrap(producer)
        producers.append(producer)
        return producer

    plane = DataPlane(
        settings,
        topics=data_plane_topics(settings),
        partitions=PARTITIONS,
        book=book,
        clock=now_ms,
        metrics=ProcessorMetrics(),
        new_consumer=lambda: backend.consumer(calls_consumer_config(settings)),
        new_requests_consumer=lambda: backend.consumer(requests_consumer_config(settings)),
        new_restore_consumer=lambda: backend.consumer(restore_consumer_config(settings)),
        new_producer=new_producer,
        new_command_producer=lambda: backend.producer(command_producer_config(settings)),
        future_tolerance_ms=60_000,
        allowance_ttl_ms=30_000,
        allowance_partitions=PARTITIONS,
    )
    thread = threading.Thread(target=_run, args=(plane,), name="data-plane", daemon=True)
    thread.start()
    return Plane(plane, thread, producers)


def _run(plane: DataPlane) -> None:
    # An exception is kept in plane.error, which wait_for and Plane.check report.
    with contextlib.suppress(Exception):
        plane.run()


def wait_for(what: str, check: Callable[[], Any], planes: list[Plane], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        for plane in planes:
            plane.check()
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.1)


# -- events and ground truth ------------------------------------------------------------------


def event(agent: str, cost: int, **fields: Any) -> CallEvent:
    values: dict[str, Any] = {
        "agent_id": agent,
        "pool": "contract-pool",
        "workflow_id": f"wf-{agent[-1]}",
        "provider": "openai",
        "requested_model": "gpt-4o-mini",
        "used_model": "gpt-4o-mini",
        "cost_nano_usd": cost,
        "latency_ms": 10,
        "event_time_ms": now_ms() - 1_000,
    }
    return CallEvent(**{**values, **fields})


def send_calls(backend: Backend, events: list[CallEvent]) -> None:
    """As the shim sends them: keyed by agent id, on librdkafka's CRC-32 partition."""
    for e in events:
        key = e.agent_id.encode()
        backend.send(
            backend.settings.topics.calls,
            e.model_dump_json().encode(),
            key,
            crc32_partition(key, PARTITIONS),
        )


def fleet(count: int, seed: int) -> list[CallEvent]:
    """``count`` events over the agents, every 7th sent twice (a duplicate: same event id)."""
    events: list[CallEvent] = []
    for i in range(count):
        e = event(AGENTS[(i * 7 + seed) % len(AGENTS)], 1_000_003 * (i % 13 + 1) + seed)
        events.append(e)
        if i % 7 == 3:
            events.append(e)
    return events


def truth(events: list[CallEvent]) -> dict[str, int]:
    """Spend per agent, each event id once."""
    seen: set[uuid.UUID] = set()
    totals: dict[str, int] = defaultdict(int)
    for e in events:
        if e.event_id not in seen:
            seen.add(e.event_id)
            totals[e.agent_id] += e.cost_nano_usd
    return dict(totals)


def day_spend(state: SpendState) -> int:
    """The UTC day buckets' spend (the events all fall on one day)."""
    return sum(v for k, v in state.periods.items() if k.startswith("day:"))


def in_memory(
    plane: Plane, agent: str, where: Callable[[SpendState], bool] = lambda _: True
) -> SpendState:
    """The agent's committed state in the worker's memory (one ``where`` holds for):
    applied once its transaction committed, which its outputs may show a moment before."""

    def found() -> SpendState | None:
        state = plane.plane.states.get(agent)
        return state if state is not None and where(state) else None

    state: SpendState = wait_for(f"{agent}'s state in memory", found, [plane], 10)
    return state


def changelog_states(backend: Backend, *, scopes: bool = False) -> dict[str, SpendState]:
    """The latest committed state of every agent (or second-hop scope), as a new owner
    restores it."""
    topics = data_plane_topics(backend.settings)
    latest: dict[str, bytes | None] = {}
    for _p, _o, key, value in backend.read(topics.scope_changelog if scopes else topics.changelog):
        assert key is not None
        latest[decode_key(key)] = value
    return {k: decode_state(value) for k, value in latest.items() if value is not None}


def caught_up(backend: Backend) -> bool:
    """The group committed every calls record: the changelog holds what they count."""
    ends = backend.ends(backend.settings.topics.calls, PARTITIONS)
    committed = backend.committed(PARTITIONS)
    return all(committed.get(p, 0) == end for p, end in ends.items())


def scope_truth(events: list[CallEvent]) -> dict[str, int]:
    """Spend per pool, workflow and task type, each event id once."""
    seen: set[uuid.UUID] = set()
    totals: dict[str, int] = defaultdict(int)
    for e in events:
        if e.event_id in seen:
            continue
        seen.add(e.event_id)
        for scope in e.scopes():
            if not scope.startswith("agent:"):
                totals[scope] += e.cost_nano_usd
    return dict(totals)


def assert_exact(backend: Backend, events: list[CallEvent], planes: list[Plane]) -> None:
    """Both hops equal the ground truth, in the workers' memory and in the changelogs. The
    second hop lags the first by a cycle or two (its deltas are read back from Kafka)."""
    want, want_scopes = truth(events), scope_truth(events)

    def held(scopes: bool) -> dict[str, int]:
        found: dict[str, int] = {}
        for plane in planes:
            states = plane.plane.scope_states if scopes else plane.plane.states
            found.update({k: day_spend(s) for k, s in list(states.items())})
        return found

    wait_for("the second hop", lambda: held(True) == want_scopes, planes, SETTLE_S)
    assert held(False) == want
    assert {a: day_spend(s) for a, s in changelog_states(backend).items()} == want
    scopes = changelog_states(backend, scopes=True)
    assert {k: day_spend(s) for k, s in scopes.items()} == want_scopes


# -- the contract -----------------------------------------------------------------------------


def test_each_event_is_counted_exactly_once(backend: Backend) -> None:
    events = fleet(300, seed=1)
    send_calls(backend, events[:150])
    plane = start_plane(backend)
    try:
        send_calls(backend, events[150:])
        wait_for("every calls record committed", lambda: caught_up(backend), [plane], SETTLE_S)
        # Every 7th event was sent twice: the ground truth counts its id once.
        assert len(events) > len({e.event_id for e in events})
        assert_exact(backend, events, [plane])
    finally:
        plane.stop()
    plane.check()


def test_a_partitions_new_owner_restores_its_states_from_the_changelog(backend: Backend) -> None:
    first_batch = fleet(120, seed=2)
    send_calls(backend, first_batch)
    first = start_plane(backend)
    second: Plane | None = None
    try:
        wait_for("the first batch committed", lambda: caught_up(backend), [first], SETTLE_S)
        second = start_plane(backend, port=free_port())
        both = [first, second]
        wait_for(
            "the partitions shared by the two workers",
            lambda: (
                first.plane.owned
                and second.plane.owned
                and len(first.plane.owned | second.plane.owned) == PARTITIONS
            ),
            both,
            SETTLE_S,
        )
        moved = set(second.plane.owned)
        # The second worker holds the first batch's states of its partitions, restored.
        restored = {a: day_spend(s) for a, s in second.plane.states.items()}
        want = truth(first_batch)
        assert restored == {
            a: t for a, t in want.items() if crc32_partition(a.encode(), PARTITIONS) in moved
        }
        second_batch = fleet(120, seed=3)
        send_calls(backend, second_batch)
        wait_for("the second batch committed", lambda: caught_up(backend), both, SETTLE_S)
        assert_exact(backend, first_batch + second_batch, both)
        # The first worker leaves: the second takes every partition, restoring the rest.
        first.stop()
        wait_for(
            "every partition on the second worker",
            lambda: len(second.plane.owned) == PARTITIONS,
            [second],
            SETTLE_S,
        )
        third_batch = fleet(60, seed=4)
        send_calls(backend, third_batch)
        wait_for("the third batch committed", lambda: caught_up(backend), [second], SETTLE_S)
        assert_exact(backend, first_batch + second_batch + third_batch, [second])
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_an_aborted_transaction_is_read_again_and_counts_nothing_twice(backend: Backend) -> None:
    events = fleet(200, seed=5)
    send_calls(backend, events[:100])
    wrappers: list[AbortAt] = []

    def abort_second(producer: Any) -> AbortAt:
        wrapper = AbortAt(producer, at=2)
        wrappers.append(wrapper)
        return wrapper

    plane = start_plane(backend, wrap=abort_second)
    try:
        # The first transaction with records commits; the second (the next batch) aborts.
        wait_for("the first batch committed", lambda: caught_up(backend), [plane], SETTLE_S)
        send_calls(backend, events[100:150])
        wait_for("the injected abort", lambda: any(w.fired for w in wrappers), [plane], SETTLE_S)
        send_calls(backend, events[150:])
        wait_for("every calls record committed", lambda: caught_up(backend), [plane], SETTLE_S)
        assert_exact(backend, events, [plane])
    finally:
        plane.stop()
    plane.check()
    assert [w.fired for w in wrappers] == [1], "one producer, one abort, no rebuild"
    topics = data_plane_topics(backend.settings)
    written = (topics.changelog, topics.scope_changelog, topics.scopes)
    # The aborted transaction's records (agent or scope states, deltas: whichever that cycle
    # wrote) reached the broker, and no read_committed reader saw them: exactness above was
    # not for want of an abort.
    assert sum(len(backend.read(t, committed=False)) for t in written) > sum(
        len(backend.read(t)) for t in written
    )


def test_a_stop_is_readable_before_its_cycle_commits_and_again_from_the_replay(
    backend: Backend,
) -> None:
    """The fast copy of a command goes out as it is decided: a read_committed shim sees it
    even when the cycle's transaction aborts; the replayed cycle decides and sends it again
    (signed, a new command id), and only its transaction's copy is committed with the state."""
    settings = backend.settings
    agent = AGENTS[2]
    book = PolicyBook()
    policy = BudgetPolicy(scope=f"agent:{agent}", limit_usd=Decimal("0.1"))
    assert book.apply(policy.key.encode(), policy.model_dump_json().encode()) is None
    book.ready.set()
    wrappers: list[AbortAt] = []

    def abort_first(producer: Any) -> AbortAt:
        wrapper = AbortAt(producer, at=1)
        wrappers.append(wrapper)
        return wrapper

    plane = start_plane(backend, book=book, wrap=abort_first)
    try:
        send_calls(backend, [event(agent, 60_000_000), event(agent, 60_000_000)])  # $0.12
        wait_for("every calls record committed", lambda: caught_up(backend), [plane], SETTLE_S)

        def stops() -> list[ControlCommand]:
            found = [
                ControlCommand.model_validate_json(v or b"")
                for *_, v in backend.read(settings.topics.control)
            ]
            return [c for c in found if c.scope == f"agent:{agent}"]

        commands = wait_for(
            "three copies", lambda: len(stops()) >= 3 and stops(), [plane], SETTLE_S
        )
        standing = in_memory(plane, agent).last_command
    finally:
        plane.stop()
    assert [w.fired for w in wrappers] == [1]
    for command in commands:
        verify_command(command, settings.control_key_bytes())
        assert command.action is ControlAction.STOP
    # Aborted cycle: its fast copy only. Replay: its fast copy and its transaction's copy.
    assert len(commands) == 3, commands
    assert len({c.command_id for c in commands}) == 2
    assert standing is not None and standing.command_id == commands[-1].command_id
    assert commands[-2].command_id == commands[-1].command_id


def test_an_aborted_first_transaction_is_read_again_from_the_beginning(backend: Backend) -> None:
    """No offsets committed yet: the rewind goes back to where the group starts (earliest),
    not on from where the aborted cycle read to."""
    events = fleet(100, seed=8)
    send_calls(backend, events)
    wrappers: list[AbortAt] = []

    def abort_first(producer: Any) -> AbortAt:
        wrapper = AbortAt(producer, at=1)
        wrappers.append(wrapper)
        return wrapper

    plane = start_plane(backend, wrap=abort_first)
    try:
        wait_for("every calls record committed", lambda: caught_up(backend), [plane], SETTLE_S)
        assert_exact(backend, events, [plane])
    finally:
        plane.stop()
    plane.check()
    assert [w.fired for w in wrappers] == [1]


def test_a_consumer_fenced_by_a_twin_of_its_static_identity_is_replaced(backend: Backend) -> None:
    """Another consumer joins with the worker's group.instance.id (what a restarted broker
    makes of a member rejoining after its session timed out): the worker's consumer fails for
    good; the worker replaces it, fencing the twin in turn, restores and counts on exactly."""
    settings = backend.settings
    events = fleet(160, seed=10)
    send_calls(backend, events[:80])
    plane = start_plane(backend)
    twin = None
    try:
        wait_for("the first batch committed", lambda: caught_up(backend), [plane], SETTLE_S)
        twin = backend.consumer(calls_consumer_config(settings))
        twin.subscribe([settings.topics.calls])

        def replaced() -> bool:
            twin.consume(num_messages=100, timeout=0.2)  # joins, and holds its place
            return plane.plane.consumers_replaced >= 1

        wait_for("the worker's consumer replaced", replaced, [plane], SETTLE_S)
        twin.close()
        twin = None
        send_calls(backend, events[80:])
        wait_for("every calls record committed", lambda: caught_up(backend), [plane], SETTLE_S)
        assert_exact(backend, events, [plane])
    finally:
        if twin is not None:
            twin.close()
        plane.stop()
    plane.check()


def test_a_bad_record_is_dead_lettered_with_its_reason_and_the_rest_counted(
    backend: Backend,
) -> None:
    good = fleet(40, seed=6)
    calls = backend.settings.topics.calls
    agent = AGENTS[0]
    where = crc32_partition(agent.encode(), PARTITIONS)
    send_calls(backend, good[:20])
    backend.send(calls, b"{not json", agent.encode(), where)
    future = event(agent, 5, event_time_ms=now_ms() + 3_600_000)
    backend.send(calls, future.model_dump_json().encode(), agent.encode(), where)
    send_calls(backend, good[20:])
    plane = start_plane(backend)
    try:
        wait_for("every calls record committed", lambda: caught_up(backend), [plane], SETTLE_S)
        assert_exact(backend, good, [plane])
    finally:
        plane.stop()
    letters = [
        InvalidMessage.model_validate_json(v or b"")
        for *_, v in backend.read(backend.settings.topics.dlq)
    ]
    assert {(m.topic, m.partition) for m in letters} == {(calls, where)}
    reasons = sorted(m.reason for m in letters)
    assert len(reasons) == 2, reasons
    assert reasons[0].startswith("event_time_ms ") and "in the future" in reasons[0]
    assert reasons[1].startswith("not a valid CallEvent:") and "json" in reasons[1].lower()
    assert all(m.component == "processor" for m in letters)


def test_an_agents_allowance_request_is_answered_signed_from_its_state(backend: Backend) -> None:
    settings = backend.settings
    agent = AGENTS[1]
    book = PolicyBook()
    policy = BudgetPolicy(scope=f"agent:{agent}", limit_usd=Decimal("1"))
    assert book.apply(policy.key.encode(), policy.model_dump_json().encode()) is None
    book.ready.set()
    spent = [event(agent, 100_000_000), event(agent, 50_000_000)]  # $0.15 of $1
    send_calls(backend, spent)
    plane = start_plane(backend, book=book)
    try:
        wait_for("the spend committed", lambda: caught_up(backend), [plane], SETTLE_S)
        request = AllowanceRequest(
            holder="contract-holder",
            seq=1,
            scope=f"agent:{agent}",
            want_nano_usd=200_000_000,
            reply_partition=2,
            sent_at_ms=now_ms(),
        )
        sent_at = 0.0

        def answers() -> list[Record]:
            nonlocal sent_at
            found = backend.read(settings.topics.allowances)
            if not found and time.monotonic() - sent_at > 3:
                # As the shim does: no answer yet, ask again (a request that came before the
                # worker's requests partition was positioned at its end is not read).
                backend.send(
                    settings.topics.allowance_requests,
                    request.model_dump_json().encode(),
                    agent.encode(),
                    crc32_partition(agent.encode(), PARTITIONS),
                )
                sent_at = time.monotonic()
            return found

        found = wait_for("the grant", answers, [plane], SETTLE_S)
        lease = in_memory(plane, agent, lambda state: bool(state.leases)).leases
    finally:
        plane.stop()
    # A request asked again is answered again from the state: the same grant (seq applied).
    grants = {AllowanceGrant.model_validate_json(v or b"").budgets for *_, v in found}
    assert len(grants) == 1, grants
    partition, _offset, key, value = found[0]
    assert (partition, key) == (2, b"contract-holder")
    grant = AllowanceGrant.model_validate_json(value or b"")
    verify_grant(grant, settings.control_key_bytes())
    assert (grant.holder, grant.seq, grant.scope, grant.refused) == (
        "contract-holder",
        1,
        f"agent:{agent}",
        None,
    )
    (budget,) = grant.budgets
    assert budget.spend_nano_usd == 150_000_000
    assert budget.limit_nano_usd == 1_000_000_000
    assert 0 < budget.granted_nano_usd <= 200_000_000
    assert lease, "the grant is kept in the agent's state"
    # The grant was committed with the state that holds it: a new owner sees the lease.
    assert changelog_states(backend)[agent].leases == lease
    assert json.loads(value or b"{}")["signature"]


def test_a_request_that_saw_newer_policies_waits_for_them(backend: Backend) -> None:
    """A shim that read a lowered limit asks afresh at once; a worker whose policy follower
    lags must not grant that request under the old limit: it waits for the policies the
    request says its holder had read, then answers under them."""
    settings = backend.settings
    agent = AGENTS[3]
    book = PolicyBook()
    old = BudgetPolicy(scope=f"agent:{agent}", limit_usd=Decimal("1"))
    assert book.apply(old.key.encode(), old.model_dump_json().encode()) is None
    book.advanced(0, 1)
    book.ready.set()
    send_calls(backend, [event(agent, 100_000_000)])  # $0.10
    plane = start_plane(backend, book=book)
    try:
        wait_for("the spend committed", lambda: caught_up(backend), [plane], SETTLE_S)
        request = AllowanceRequest(
            holder="contract-holder",
            seq=1,
            scope=f"agent:{agent}",
            want_nano_usd=500_000_000,
            reply_partition=1,
            sent_at_ms=now_ms(),
            policies_at={0: 2},  # the lowered policy at offset 1 was read
        )
        sent_at = 0.0

        def waiting() -> bool:
            nonlocal sent_at
            if plane.plane.requests_waited:
                return True
            if time.monotonic() - sent_at > 3:
                # Asked again as the shim does, until the worker's requests partition was
                # positioned (a request before that is not read).
                backend.send(
                    settings.topics.allowance_requests,
                    request.model_dump_json().encode(),
                    agent.encode(),
                    crc32_partition(agent.encode(), PARTITIONS),
                )
                sent_at = time.monotonic()
            return False

        wait_for("the request to wait", waiting, [plane], SETTLE_S)
        assert backend.read(settings.topics.allowances) == [], "answered under the old limit"
        assert plane.plane.health()["requests_waiting_for_policies"] >= 1
        requests = settings.topics.allowance_requests
        where = crc32_partition(agent.encode(), PARTITIONS)
        end = backend.ends(requests, PARTITIONS)[where]
        # Not committed past a waiting request: a crash or a rebalance reads it again.
        assert backend.committed(PARTITIONS, requests).get(where, 0) < end
        lowered = BudgetPolicy(scope=f"agent:{agent}", limit_usd=Decimal("0.25"))
        assert book.apply(lowered.key.encode(), lowered.model_dump_json().encode()) is None
        book.advanced(0, 2)
        found = wait_for(
            "the grant", lambda: backend.read(settings.topics.allowances), [plane], SETTLE_S
        )
        assert plane.plane.health()["requests_waiting_for_policies"] == 0
        wait_for(
            "the answered request committed",
            lambda: backend.committed(PARTITIONS, requests).get(where) == end,
            [plane],
            SETTLE_S,
        )
    finally:
        plane.stop()
    for *_, value in found:
        grant = AllowanceGrant.model_validate_json(value or b"")
        (budget,) = grant.budgets
        assert budget.limit_nano_usd == 250_000_000
        assert budget.spend_nano_usd == 100_000_000
        assert 0 < budget.granted_nano_usd <= 150_000_000


def test_the_day_bucket_is_todays(backend: Backend) -> None:
    """The ground truth above sums day buckets: they must be the UTC day of the events."""
    e = event(AGENTS[2], 7)
    send_calls(backend, [e])
    plane = start_plane(backend)
    try:
        wait_for("the event committed", lambda: caught_up(backend), [plane], SETTLE_S)
        state = in_memory(plane, AGENTS[2])
    finally:
        plane.stop()
    day = e.event_time_ms - e.event_time_ms % DAY_MS
    assert state.periods[f"day:{day}"] == 7


# -- the Kafka semantics the data plane relies on, the same on both -------------------------


def test_a_second_producer_of_a_transactional_id_fences_the_first_and_aborts_its_work(
    backend: Backend,
) -> None:
    config = transactional_producer_config(backend.settings)
    topic = backend.settings.topics.alerts
    first = backend.producer(config)
    first.init_transactions(30)
    first.begin_transaction()
    first.produce(topic, b"from the zombie", b"k", partition=0)
    first.flush(30)
    second = backend.producer(config)
    second.init_transactions(30)
    with pytest.raises(KafkaException) as fenced:
        first.commit_transaction(30)
    assert fenced.value.args[0].fatal()
    second.begin_transaction()
    second.produce(topic, b"from the new owner", b"k", partition=0)
    second.commit_transaction(30)
    assert [r[3] for r in backend.read(topic)] == [b"from the new owner"]
    assert b"from the zombie" in [r[3] for r in backend.read(topic, committed=False)]


def test_offsets_sent_with_a_transaction_are_committed_with_it_and_only_then(
    backend: Backend,
) -> None:
    settings = backend.settings
    calls = settings.topics.calls
    for e in fleet(4, seed=9):
        send_calls(backend, [e])
    consumer = backend.consumer(calls_consumer_config(settings))
    assigned: list[Any] = []
    consumer.subscribe([calls], on_assign=lambda _c, tps: assigned.extend(tps))
    producer = backend.producer(transactional_producer_config(settings))
    producer.init_transactions(30)
    try:
        deadline = time.monotonic() + SETTLE_S
        while len(assigned) < PARTITIONS:
            assert time.monotonic() < deadline, f"assigned only {assigned}"
            consumer.consume(num_messages=100, timeout=0.2)
        offsets = [TopicPartition(calls, 0, 1), TopicPartition(calls, 1, 1)]
        producer.begin_transaction()
        producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
        producer.abort_transaction(30)
        assert backend.committed(PARTITIONS) == {}
        producer.begin_transaction()
        producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
        producer.commit_transaction(30)
        assert backend.committed(PARTITIONS) == {0: 1, 1: 1}
    finally:
        consumer.close()
