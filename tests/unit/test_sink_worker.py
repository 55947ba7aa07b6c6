"""SinkWorker batch logic with in-memory fakes of the consumer, producer and table.

The real broker and chDB paths are covered by tests/integration/test_sink_service.py; here the
fakes let each rule be checked deterministically: what is inserted with which token, what goes
to the dlq, and that offsets are committed only after every effect succeeded.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.schemas import (
    Alert,
    AlertKind,
    CallEvent,
    ControlAction,
    ControlCommand,
    InvalidMessage,
    sign_command,
)
from agentledger.sinks.audit_rows import CONTROL_COLUMNS, command_to_row
from agentledger.sinks.database import ClickHouse, ClickHouseError
from agentledger.sinks.flood import DlqFlood, FloodGuard
from agentledger.sinks.rows import SourcePosition
from agentledger.sinks.store import SinkTables
from agentledger.sinks.streams import SinkStream
from agentledger.sinks.worker import SinkWorker, consumer_config

KEY = "unit-test-control-key-0123456789"
JAN = 1_704_067_200_000  # 2024-01-01T00:00:00Z
FEB = 1_706_745_600_000  # 2024-02-01T00:00:00Z


@dataclass
class Msg:
    _topic: str
    _partition: int
    _offset: int
    _value: bytes | None
    _key: bytes | None = b"k"
    _appended_ms: int | None = None

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        # (TIMESTAMP_LOG_APPEND_TIME, ms) as the calls topic sets it, or NOT_AVAILABLE.
        return (2, self._appended_ms) if self._appended_ms is not None else (0, 0)


@dataclass
class FakeConsumer:
    log: list[str]
    queued: list[Msg] = field(default_factory=list)
    commits: list[list[tuple[str, int, int]]] = field(default_factory=list)
    assigned: list[TopicPartition] = field(default_factory=list)
    on_assign: Any = None
    on_revoke: Any = None
    paused: bool = False

    def subscribe(
        self, topics: list[str], on_assign: Any = None, on_revoke: Any = None, on_lost: Any = None
    ) -> None:
        self.on_assign, self.on_revoke = on_assign, on_revoke

    def assign_partitions(self, topic: str, partitions: Sequence[int]) -> None:
        self.assigned = [TopicPartition(topic, p) for p in partitions]
        self.on_assign(self, self.assigned)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Msg]:
        taken, self.queued = self.queued[:num_messages], self.queued[num_messages:]
        return taken

    def commit(self, message: Any = None, offsets: Any = None, asynchronous: bool = True) -> None:
        assert asynchronous is False
        self.log.append("commit")
        self.commits.append(sorted((tp.topic, tp.partition, tp.offset) for tp in offsets))

    def assignment(self) -> list[TopicPartition]:
        return list(self.assigned)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused = True

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused = False

    def poll(self, timeout: float = -1) -> None:
        return None

    def seek(self, partition: TopicPartition) -> None:
        raise AssertionError("nothing is delivered while paused in these tests")

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, -1001) for tp in partitions]

    def get_watermark_offsets(
        self, partition: Any, timeout: float = 1.0, cached: bool = False
    ) -> tuple[int, int]:
        return (0, 0)

    def close(self) -> None:
        self.log.append("close")


@dataclass
class FakeProducer:
    log: list[str]
    sent: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    pending: list[Any] = field(default_factory=list)

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        on_delivery: Any = None,
    ) -> None:
        assert value is not None and key is not None
        self.sent.append((topic, key, value))
        self.pending.append(on_delivery)

    def flush(self, timeout: float = -1) -> int:
        for callback in self.pending:
            callback(None, None)
        if self.pending:
            self.log.append("dlq flushed")
        self.pending = []
        return 0

    def poll(self, timeout: float = -1) -> int:
        return 0


@dataclass
class FakeStore:
    log: list[str]
    failures_left: int = 0
    inserts: list[tuple[str, list[int]]] = field(default_factory=list)
    landed: dict[tuple[str, int], set[int]] = field(default_factory=dict)

    stored_ids: set[str] = field(default_factory=set)
    id_lookups: list[tuple[str, int, int]] = field(default_factory=list)

    def insert(self, stream: SinkStream, rows: Sequence[Sequence[object]], token: str) -> None:
        if self.failures_left:
            self.failures_left -= 1
            self.log.append("insert failed")
            raise ClickHouseError("Code: 241. MEMORY_LIMIT_EXCEEDED", code=241)
        self.log.append(f"insert {token}")
        # Calls arrive as JSON lines (decode_call_json), the other streams as column lists.
        pairs = [
            (int(d["_offset"]), str(d["event_id"]))
            if isinstance(r, bytes) and (d := json.loads(r))
            else (int(str(r[-2])), str(r[1]))
            for r in rows
        ]
        self.inserts.append((token, [offset for offset, _ in pairs]))
        self.stored_ids.update(record_id for _, record_id in pairs)

    def present_offsets(
        self, stream: SinkStream, topic: str, partition: int, from_offset: int
    ) -> set[int]:
        return {o for o in self.landed.get((topic, partition), set()) if o >= from_offset}

    def present_ids(
        self, stream: SinkStream, ids: Sequence[str], from_ms: int, to_ms: int
    ) -> set[str]:
        self.id_lookups.append((stream.table, from_ms, to_ms))
        return self.stored_ids & set(ids)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        self.now += 1
        return self.now


def worker_on_chdb(
    db: ClickHouse, batch_max_rows: int, batch_max_ms: int
) -> tuple[SinkWorker, FakeConsumer, Settings]:
    """A sink worker writing to real chDB tables, fed by the in-memory consumer: topic prefix
    ``x.``, every partition of ``x.calls`` unassigned until the test assigns them."""
    settings = Settings(topic_prefix="x.", control_key=SecretStr(KEY), kafka="127.0.0.1:1")
    log: list[str] = []
    consumer = FakeConsumer(log)
    worker = SinkWorker(
        settings,
        SinkTables(db),
        consumer=consumer,
        producer=FakeProducer(log),
        clock=Clock(),
        batch_max_rows=batch_max_rows,
        batch_max_ms=batch_max_ms,
    )
    worker.subscribe()
    return worker, consumer, settings


@dataclass
class Rig:
    worker: SinkWorker
    consumer: FakeConsumer
    producer: FakeProducer
    store: FakeStore
    log: list[str]
    topic: str


@pytest.fixture
def rig() -> Rig:
    settings = Settings(topic_prefix="u.", kafka="127.0.0.1:1", control_key=SecretStr(KEY))
    log: list[str] = []
    consumer, producer, store = FakeConsumer(log), FakeProducer(log), FakeStore(log)
    worker = SinkWorker(
        settings,
        store,
        consumer=consumer,
        producer=producer,
        clock=Clock(),
        batch_max_rows=100,
        batch_max_ms=50,
        retry_initial_s=0.001,
        retry_max_s=0.004,
    )
    worker.subscribe()
    consumer.assign_partitions(settings.topics.calls, [0, 1])
    return Rig(worker, consumer, producer, store, log, settings.topics.calls)


def call(n: int, time_ms: int = JAN, **extra: object) -> bytes:
    values: dict[str, object] = {
        "event_id": uuid.UUID(int=n),
        "event_time_ms": time_ms,
        "agent_id": f"a{n % 3}",
        "provider": "p",
        "requested_model": "m",
        "used_model": "m",
        "cost_nano_usd": n,
        "latency_ms": 1,
        **extra,
    }
    return CallEvent.model_validate(values).model_dump_json().encode()


def test_consumer_config_is_manual_commit_from_earliest() -> None:
    config = consumer_config(Settings(topic_prefix="team1.", kafka="h:1"))
    assert config["group.id"] == "team1.sink"
    assert config["enable.auto.commit"] is False
    assert config["auto.offset.reset"] == "earliest"


def test_batch_is_one_insert_with_every_partitions_offset_range_as_token(rig: Rig) -> None:
    t = rig.topic
    rig.consumer.queued = [
        Msg(t, 1, 0, call(2)),
        Msg(t, 0, 5, call(1)),
        Msg(t, 0, 6, call(3)),
        Msg(t, 0, 7, call(4)),
    ]
    assert rig.worker.step()
    # Partitions in the token in partition order, whatever order the records came in.
    assert rig.store.inserts == [(f"{t}:0:5-7,1:0-0", [0, 5, 6, 7])]
    assert rig.consumer.commits == [[(t, 0, 8), (t, 1, 1)]]
    assert rig.log == [f"insert {t}:0:5-7,1:0-0", "commit"]
    assert rig.worker.stats.rows_inserted == 4
    assert not rig.worker.step()  # nothing left: no empty insert, no commit
    assert len(rig.consumer.commits) == 1


def test_batch_stops_at_max_rows(rig: Rig) -> None:
    rig.consumer.queued = [Msg(rig.topic, 0, i, call(i)) for i in range(250)]
    rig.worker.step()
    assert rig.store.inserts[0][0] == f"{rig.topic}:0:0-99"
    rig.worker.step()
    rig.worker.step()
    assert [tok for tok, _ in rig.store.inserts] == [
        f"{rig.topic}:0:0-99",
        f"{rig.topic}:0:100-199",
        f"{rig.topic}:0:200-249",
    ]
    assert rig.consumer.commits[-1] == [(rig.topic, 0, 250)]


def test_batches_grow_while_behind_and_end_on_time_again_when_caught_up(rig: Rig) -> None:
    worker = rig.worker
    worker.batch_catch_up_rows = 250
    t = rig.topic
    rig.consumer.queued = [Msg(t, 0, i, call(i + 1)) for i in range(600)]
    worker.step()  # not behind yet: the plain limit
    worker.step()  # the first batch filled up: behind, so up to 250 rows
    worker.step()
    assert [tok for tok, _ in rig.store.inserts] == [
        f"{t}:0:0-99",
        f"{t}:0:100-349",
        f"{t}:0:350-599",
    ]
    # A batch that ends on time below the plain limit means caught up: back to 100 rows.
    rig.consumer.queued = [Msg(t, 0, 600 + i, call(601 + i)) for i in range(50)]
    worker.step()
    assert worker.collect() == []
    rig.consumer.queued = [Msg(t, 0, 650 + i, call(651 + i)) for i in range(300)]
    worker.step()
    assert rig.store.inserts[-1][0] == f"{t}:0:650-749"
    assert rig.consumer.commits[-1] == [(t, 0, 750)]


def test_a_batch_time_counts_from_its_oldest_records_append(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = rig.topic
    timeouts: list[float] = []
    consume = rig.consumer.consume

    def counting(num_messages: int = 1, timeout: float = -1) -> list[Msg]:
        timeouts.append(timeout)
        return consume(num_messages, timeout)

    monkeypatch.setattr(rig.consumer, "consume", counting)
    clock = rig.worker.clock
    assert isinstance(clock, Clock)
    # Appended 30 ms ago (the previous batch was being inserted): 20 ms of the 50 are left.
    appended = clock.now - 30
    rig.consumer.queued = [Msg(t, 0, i, call(i + 1), _appended_ms=appended) for i in range(5)]
    assert len(rig.worker.collect()) == 5
    assert 0 < timeouts[1] <= 0.020
    # Appended long ago (a backlog): what is fetched is taken at once, without waiting.
    timeouts.clear()
    appended = clock.now - 10_000
    rig.consumer.queued = [Msg(t, 0, i, call(i + 1), _appended_ms=appended) for i in range(5)]
    assert len(rig.worker.collect()) == 5
    assert timeouts == [0.2, 0.0]
    # A broker clock ahead of ours: the batch time starts now, as without a timestamp.
    timeouts.clear()
    rig.consumer.queued = [Msg(t, 0, 0, call(1), _appended_ms=clock.now + 10_000)]
    assert len(rig.worker.collect()) == 1
    assert timeouts[1] == pytest.approx(0.049, abs=0.002)


def test_a_batch_spanning_two_months_is_two_inserts_one_part_each(rig: Rig) -> None:
    t = rig.topic
    rig.consumer.queued = [
        Msg(t, 0, 0, call(1, JAN)),
        Msg(t, 0, 1, call(2, FEB)),
        Msg(t, 0, 2, call(3, JAN)),
    ]
    rig.worker.step()
    assert sorted(rig.store.inserts) == [(f"{t}:0:0-2", [0, 2]), (f"{t}:0:1-1", [1])]


def test_invalid_records_go_to_the_dlq_with_a_reason_and_are_not_inserted(rig: Rig) -> None:
    t = rig.topic
    bad_json = b"\xff not json"
    bad_schema = json.dumps({"agent_id": "a", "cost_nano_usd": -5}).encode()
    too_slow = call(9, latency_ms=1 << 40)
    rig.consumer.queued = [
        Msg(t, 0, 0, call(1)),
        Msg(t, 0, 1, bad_json),
        Msg(t, 0, 2, bad_schema),
        Msg(t, 1, 0, too_slow),
        Msg(t, 1, 1, None),
    ]
    rig.worker.step()
    assert rig.store.inserts == [(f"{t}:0:0-0", [0])]
    dead = [InvalidMessage.model_validate_json(v) for _, _, v in rig.producer.sent]
    assert [(d.partition, d.offset, d.component) for d in dead] == [
        (0, 1, "sink"),
        (0, 2, "sink"),
        (1, 0, "sink"),
        (1, 1, "sink"),
    ]
    assert all(topic == "u.dlq" for topic, _, _ in rig.producer.sent)
    assert dead[0].payload() == bad_json
    assert "Invalid JSON" in dead[0].reason
    assert "cost_nano_usd: Input should be greater than or equal to 0" in dead[1].reason
    assert "latency_ms=1099511627776 does not fit" in dead[2].reason
    assert dead[3].payload() == b""
    # The dlq is flushed before the commit, and the commit covers the invalid records too.
    assert rig.log == [f"insert {t}:0:0-0", "dlq flushed", "commit"]
    assert rig.consumer.commits == [[(t, 0, 3), (t, 1, 2)]]
    assert rig.worker.stats.invalid == 4


def test_insert_failures_are_retried_with_the_same_token_and_commit_waits(rig: Rig) -> None:
    t = rig.topic
    rig.store.failures_left = 3
    rig.consumer.queued = [Msg(t, 0, 10, call(1)), Msg(t, 0, 11, call(2))]
    rig.worker.step()
    assert rig.log == ["insert failed"] * 3 + [f"insert {t}:0:10-11", "commit"]
    assert rig.consumer.commits == [[(t, 0, 12)]]
    assert rig.consumer.paused is False
    assert rig.worker.stats.retrying is False and rig.worker.stats.last_error is None


def test_stop_during_retry_abandons_the_batch_without_commit(rig: Rig) -> None:
    rig.store.failures_left = 10**6
    stop = rig.worker.stop
    rig.consumer.queued = [Msg(rig.topic, 0, 0, call(1))]
    timer = threading.Timer(0.05, stop.set)
    timer.start()
    try:
        rig.worker.step()
    finally:
        timer.cancel()
    assert rig.consumer.commits == []
    assert rig.store.inserts == []
    assert "insert failed" in rig.log


def test_records_already_landed_by_a_crashed_run_are_skipped(rig: Rig) -> None:
    t = rig.topic
    # A previous run inserted offsets 3..5 of partition 0 but died before committing.
    rig.store.landed[(t, 0)] = {3, 4, 5}
    rig.consumer.queued = [Msg(t, 0, i, call(i)) for i in range(3, 9)]
    rig.worker.step()
    assert rig.store.inserts == [(f"{t}:0:6-8", [6, 7, 8])]
    assert rig.consumer.commits == [[(t, 0, 9)]]
    assert rig.worker.stats.rows_skipped_replayed == 3


def test_landed_offsets_are_looked_up_again_after_reassignment(rig: Rig) -> None:
    t = rig.topic
    rig.consumer.queued = [Msg(t, 0, 0, call(0))]
    rig.worker.step()
    rig.consumer.on_revoke(rig.consumer, [TopicPartition(t, 0)])
    rig.consumer.assign_partitions(t, [0])
    rig.store.landed[(t, 0)] = {1}
    rig.consumer.queued = [Msg(t, 0, 1, call(1)), Msg(t, 0, 2, call(2))]
    rig.worker.step()
    assert [tok for tok, _ in rig.store.inserts] == [f"{t}:0:0-0", f"{t}:0:2-2"]


def test_records_of_a_revoked_partition_are_left_to_the_new_owner(rig: Rig) -> None:
    t = rig.topic
    rig.consumer.queued = [Msg(t, 0, 0, call(0)), Msg(t, 1, 0, call(1))]
    rig.consumer.on_revoke(rig.consumer, [TopicPartition(t, 1)])
    rig.worker.step()
    assert rig.store.inserts == [(f"{t}:0:0-0", [0])]
    assert rig.consumer.commits == [[(t, 0, 1)]]


def test_a_partition_revoked_during_insert_retries_leaves_its_rows_out(rig: Rig) -> None:
    t = rig.topic
    rig.store.failures_left = 1
    rig.consumer.queued = [Msg(t, 0, 3, call(0)), Msg(t, 1, 4, call(1))]
    real_poll = rig.consumer.poll

    def poll_and_lose_partition_1(timeout: float = -1) -> None:
        # The consumer is polled between retries: that is when a rebalance callback runs.
        rig.consumer.on_revoke(rig.consumer, [TopicPartition(t, 1)])
        return real_poll(timeout)

    rig.consumer.poll = poll_and_lose_partition_1  # type: ignore[method-assign]
    rig.worker.step()
    assert rig.log[:2] == ["insert failed", f"insert {t}:0:3-3"]
    assert rig.store.inserts == [(f"{t}:0:3-3", [3])]
    assert rig.consumer.commits == [[(t, 0, 4)]]


def test_batch_limits_must_be_positive() -> None:
    log: list[str] = []
    with pytest.raises(ValueError, match="batch_max_rows and batch_max_ms must be >= 1"):
        SinkWorker(
            Settings(control_key=SecretStr(KEY)),
            FakeStore(log),
            consumer=FakeConsumer(log),
            producer=FakeProducer(log),
            batch_max_rows=0,
        )


def test_an_event_id_already_stored_is_skipped_at_its_new_offset(rig: Rig) -> None:
    t = rig.topic
    rig.consumer.queued = [Msg(t, 0, 0, call(1)), Msg(t, 0, 1, call(2))]
    rig.worker.step()
    # A spool replay re-sends event 1 at a new offset, next to a new event 3.
    rig.consumer.queued = [Msg(t, 0, 2, call(1)), Msg(t, 0, 3, call(3))]
    rig.worker.step()
    assert rig.store.inserts == [(f"{t}:0:0-1", [0, 1]), (f"{t}:0:3-3", [3])]
    assert rig.consumer.commits[-1] == [(t, 0, 4)]
    assert rig.worker.stats.duplicates_skipped == 1
    # The lookup is narrowed to the batch's event-time range.
    assert rig.store.id_lookups[-1] == ("calls", JAN, JAN)


def test_an_event_id_repeated_within_a_batch_is_stored_once(rig: Rig) -> None:
    t = rig.topic
    rig.consumer.queued = [
        Msg(t, 0, 0, call(7)),
        Msg(t, 1, 0, call(7)),
        Msg(t, 1, 1, call(8)),
        Msg(t, 0, 1, call(7)),
    ]
    rig.worker.step()
    stored = sorted(o for _, offsets in rig.store.inserts for o in offsets)
    assert len(stored) == 2
    assert rig.consumer.commits == [[(t, 0, 2), (t, 1, 2)]]
    assert rig.worker.stats.duplicates_skipped == 2


def test_an_id_lookup_failure_is_retried_before_anything_is_inserted(rig: Rig) -> None:
    t = rig.topic
    failures = [2]
    real = rig.store.present_ids

    def flaky(*args: Any) -> set[str]:
        if failures[0]:
            failures[0] -= 1
            rig.log.append("lookup failed")
            raise ClickHouseError("Code: 210. NETWORK_ERROR", code=210)
        return real(*args)

    rig.store.present_ids = flaky  # type: ignore[method-assign,assignment]
    rig.consumer.queued = [Msg(t, 0, 0, call(1))]
    rig.worker.step()
    assert rig.log == ["lookup failed", "lookup failed", f"insert {t}:0:0-0", "commit"]


def signed_command(scope: str = "agent:a1", *, sign: bool = True) -> bytes:
    command = ControlCommand(
        scope=scope, action=ControlAction.STOP, reason="over budget", issued_at_ms=JAN + 5
    )
    if sign:
        command = sign_command(command, KEY.encode())
    return command.model_dump_json().encode()


def test_control_commands_are_stored_with_their_verification(rig: Rig) -> None:
    control = rig.worker.settings.topics.control
    rig.consumer.assign_partitions(control, [0])
    forged = ControlCommand.model_validate_json(signed_command()).model_copy(
        update={"reason": "tampered"}
    )
    rig.consumer.queued = [
        Msg(control, 0, 0, signed_command()),
        Msg(control, 0, 1, signed_command("agent:a2", sign=False)),
        Msg(control, 0, 2, forged.model_dump_json().encode()),
        Msg(control, 0, 3, None),  # a tombstone of the compacted topic: nothing to store
        Msg(control, 0, 4, b'{"scope": "agent:a1"}'),
    ]
    rig.worker.step()
    assert [tok for tok, _ in rig.store.inserts] == [f"{control}:0:0-2"]
    dead = [InvalidMessage.model_validate_json(v) for _, _, v in rig.producer.sent]
    assert [(d.topic, d.offset) for d in dead] == [(control, 4)]
    assert "not a valid ControlCommand" in dead[0].reason
    assert rig.consumer.commits == [[(control, 0, 5)]]


def test_control_rows_record_whether_the_signature_verifies() -> None:
    source = SourcePosition("c", 0, 0)
    good = ControlCommand.model_validate_json(signed_command())
    rows = [
        command_to_row(good, KEY.encode(), source, JAN),
        command_to_row(good, b"another-key-of-enough-bytes", source, JAN),
        command_to_row(good.model_copy(update={"signature": None}), KEY.encode(), source, JAN),
    ]
    verified = CONTROL_COLUMNS.index("verified")
    assert [r[verified] for r in rows] == [True, False, False]


def test_alerts_are_stored_and_garbage_goes_to_the_dlq(rig: Rig) -> None:
    alerts = rig.worker.settings.topics.alerts
    rig.consumer.assign_partitions(alerts, [0])
    alert = Alert(kind=AlertKind.RETRY_LOOP, scope="agent:a1", message="m", issued_at_ms=JAN)
    rig.consumer.queued = [
        Msg(alerts, 0, 0, alert.model_dump_json().encode()),
        Msg(alerts, 0, 1, alert.model_dump_json().encode()),  # the same alert again
        Msg(alerts, 0, 2, None),
    ]
    rig.worker.step()
    assert rig.store.inserts == [(f"{alerts}:0:0-0", [0])]
    dead = [InvalidMessage.model_validate_json(v) for _, _, v in rig.producer.sent]
    assert [(d.offset, d.reason.startswith("not a valid Alert")) for d in dead] == [(2, True)]


def test_consumption_is_paused_while_clickhouse_is_down(rig: Rig) -> None:
    t = rig.topic
    paused_during_failures: list[bool] = []
    real_insert = rig.store.insert

    def down_then_up(stream: SinkStream, rows: Sequence[Sequence[object]], token: str) -> None:
        if len(paused_during_failures) < 3:
            # The first failure pauses; record the state each later attempt sees.
            paused_during_failures.append(rig.consumer.paused)
            raise ClickHouseError("Code: 210. Connection refused", code=210)
        real_insert(stream, rows, token)

    rig.store.insert = down_then_up  # type: ignore[method-assign]
    rig.consumer.queued = [Msg(t, 0, 0, call(1))]
    rig.worker.step()
    assert paused_during_failures == [False, True, True]
    assert rig.consumer.paused is False
    assert rig.store.inserts == [(f"{t}:0:0-0", [0])]
    assert rig.consumer.commits == [[(t, 0, 1)]]


def test_kafka_to_queryable_lag_is_measured_from_append_time_to_insert(rig: Rig) -> None:
    t = rig.topic
    now = rig.worker.clock()
    rig.consumer.queued = [
        Msg(t, 0, 0, call(1), _appended_ms=now - 1_500),
        Msg(t, 0, 1, call(2), _appended_ms=now - 20),
        Msg(t, 1, 0, call(3), _appended_ms=now - 20),
        Msg(t, 1, 1, b"garbage", _appended_ms=now - 9_000),  # dlq: no row, no lag
    ]
    rig.worker.step()
    health = rig.worker.stats.as_json()
    assert health["lag_rows"] == 3
    # Acknowledged at the clock reading just before the commit's.
    acknowledged = int(str(health["last_commit_ms"])) - 1
    ages = sorted(acknowledged - (now - back) for back in (1_500, 20, 20))
    assert health["lag_max_ms"] == ages[-1]
    assert health["lag_p99_ms"] == ages[-1]
    # p50 is the upper edge of the 10 ms bucket holding the median age.
    assert health["lag_p50_ms"] == ages[1] // 10 * 10 + 9


def run_until_committed(rig: Rig, end_offset: int) -> None:
    """Run the pipelined service loop until partition 0 is committed up to `end_offset`."""
    real_commit = rig.consumer.commit

    def commit(message: Any = None, offsets: Any = None, asynchronous: bool = True) -> None:
        real_commit(message, offsets, asynchronous)
        if (rig.topic, 0, end_offset) in rig.consumer.commits[-1]:
            rig.worker.stop.set()

    rig.consumer.commit = commit  # type: ignore[method-assign]
    runner = threading.Thread(target=rig.worker.run)
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), rig.log


def test_run_pipelines_but_inserts_a_batch_only_after_committing_the_previous(rig: Rig) -> None:
    t = rig.topic
    rig.consumer.queued = [Msg(t, 0, i, call(i)) for i in range(250)]
    # Event 3 again at offset 250: found stored only if batch 1 landed before this lookup.
    rig.consumer.queued.append(Msg(t, 0, 250, call(3)))
    run_until_committed(rig, 251)
    assert rig.log == [
        f"insert {t}:0:0-99",
        "commit",
        f"insert {t}:0:100-199",
        "commit",
        f"insert {t}:0:200-249",
        "commit",
    ]
    assert rig.worker.stats.duplicates_skipped == 1
    assert rig.worker.stats.rows_inserted == 250


def test_run_retries_a_failed_background_insert_before_committing(rig: Rig) -> None:
    t = rig.topic
    rig.store.failures_left = 2
    rig.consumer.queued = [Msg(t, 0, 7, call(1))]
    run_until_committed(rig, 8)
    assert rig.log == ["insert failed", "insert failed", f"insert {t}:0:7-7", "commit"]


def flooded_rig(rig: Rig, max_percent: int, window: int) -> Rig:
    rig.worker.flood = FloodGuard(max_percent, window)
    return rig


def test_a_flood_of_garbage_stops_the_sink_before_anything_is_stored_or_dead_lettered(
    rig: Rig,
) -> None:
    t = rig.topic
    flooded_rig(rig, max_percent=50, window=10)
    rig.consumer.queued = [Msg(t, 0, i, call(i)) for i in range(4)]
    rig.worker.step()  # 4 good records: stored, committed
    rig.consumer.queued = [Msg(t, 0, 4 + i, b"not a call") for i in range(7)]
    with pytest.raises(DlqFlood, match=r"7 of the last 11 records on u\.calls are invalid") as exc:
        rig.worker.step()
    assert "limit 50% of 10" in str(exc.value) and "Invalid JSON" in str(exc.value)
    # The flooded batch: not dead-lettered, not committed (a restart reads it again).
    assert rig.producer.sent == []
    assert rig.consumer.commits == [[(t, 0, 4)]]
    assert rig.log == [f"insert {t}:0:0-3", "commit"]


def test_scattered_invalid_records_below_the_limit_are_dead_lettered(rig: Rig) -> None:
    t = rig.topic
    flooded_rig(rig, max_percent=50, window=10)
    for batch in range(3):
        first = batch * 10
        rig.consumer.queued = [
            Msg(t, 0, first + i, b"garbage" if i < 5 else call(first + i)) for i in range(10)
        ]
        rig.worker.step()  # exactly 50%: not more than the limit
    assert len(rig.producer.sent) == 15 and rig.worker.stats.invalid == 15
    assert rig.consumer.commits[-1] == [(t, 0, 30)]


def test_the_flood_window_spans_batches_and_forgets_the_oldest() -> None:
    guard = FloodGuard(max_percent=50, window=100)
    guard.check("t", 60, 60, "bad")  # fewer records than the window: not judged yet
    guard.check("t", 500, 0, None)  # the window is now this batch alone: 0%
    guard.check("other", 40, 40, "bad")
    with pytest.raises(DlqFlood, match="60 of the last 110"):
        guard.check("t", 110, 60, "bad")
    with pytest.raises(ValueError, match="0 < max_percent <= 100"):
        FloodGuard(max_percent=0)
