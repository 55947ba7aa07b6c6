"""The processor as it runs in production: `python -m agentledger.stream_processors` as a
subprocess against the real broker, fed with a plain confluent producer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupTopicPartitions,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from agentledger.config import Settings
from agentledger.schemas import (
    BudgetPolicy,
    CallEvent,
    ControlAction,
    ControlCommand,
    InvalidMessage,
    verify_command,
)
from agentledger.stream_processors.periods import DAY_MS

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)


class Worker:
    """One processor subprocess; always killed in teardown."""

    def __init__(
        self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        env = dict(os.environ)
        env.update(extra_env or {})
        env.update(
            {
                "AGENTLEDGER_KAFKA": settings.kafka,
                "AGENTLEDGER_TOPIC_PREFIX": settings.topic_prefix,
                "AGENTLEDGER_HOME": str(settings.home),
                "AGENTLEDGER_CONTROL_KEY": settings.control_key_bytes().decode(),
                "AGENTLEDGER_API_TOKEN": settings.api_token_value(),
                "AGENTLEDGER_PROCESSOR_PORT": str(settings.processor_port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agentledger.stream_processors"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.settings.processor_port}{path}")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def state(self, scope: str) -> dict[str, Any]:
        status, body = self.get(f"/state/{scope}", self.settings.api_token_value())
        assert status == 200, body
        return body

    def day_spend(self, scope: str) -> int:
        return int(self.state(scope)["periods"][0]["spend_nano_usd"])

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Wait for /health with the policies loaded; return the seconds it took."""
        started = time.monotonic()

        def ready() -> bool:
            assert self.proc.poll() is None, f"worker exited; log:\n{self.log()}"
            try:
                status, body = self.get("/health")
            except (urllib.error.URLError, OSError):
                return False
            return status == 200 and bool(body.get("policies_loaded"))

        wait_for("the processor to become healthy", ready, timeout_s)
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def diagnosis(self) -> str:
        """What a failed assertion should show when the log files are gone (a CI run): the
        worker's /health and the last warnings, errors and rebalance steps of its log."""
        try:
            health: object = self.get("/health")
        except (urllib.error.URLError, OSError) as exc:
            health = f"unreachable ({exc})"
        marks = ("WARNING", "ERROR", "CRITICAL", "Recovery", "generation", "Revoking", "Traceback")
        lines = self.log_path.read_text(errors="replace").splitlines()
        notable = [line[:300] for line in lines if any(m in line for m in marks)]
        exit_code = self.proc.poll()
        return (
            f"worker on port {self.settings.processor_port} (exit code {exit_code}), "
            f"/health {health}; last notable log lines:\n" + "\n".join(notable[-40:])
        )


@pytest.fixture
def workers(stack_settings: Settings, tmp_path: Path) -> Iterator[Callable[[], Worker]]:
    started: list[Worker] = []

    def start() -> Worker:
        worker = Worker(stack_settings, tmp_path / f"processor-{len(started)}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


class TopicReader:
    """Reads a whole topic from the beginning, keeping every record seen."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False}
        )
        starts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)]
        self.consumer.assign(starts)
        self.records: list[tuple[bytes | None, bytes, float]] = []

    def poll(self) -> list[tuple[bytes | None, bytes, float]]:
        while (msg := self.consumer.poll(0.05)) is not None:
            assert msg.error() is None, msg.error()
            value = msg.value()
            assert value is not None, "no test here writes tombstones to control or dlq"
            self.records.append((msg.key(), value, time.monotonic()))
        return self.records

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def readers(stack_settings: Settings) -> Iterator[tuple[TopicReader, TopicReader]]:
    topics = stack_settings.topics
    control = TopicReader(stack_settings.kafka, topics.control, 3)
    dlq = TopicReader(stack_settings.kafka, topics.dlq, 1)
    yield control, dlq
    control.close()
    dlq.close()


def commands(reader: TopicReader, scope: str) -> list[tuple[ControlCommand, float]]:
    """The commands for ``scope`` read so far, each once, as a shim applies them: a command's
    fast copy and its transaction's copy (data_plane.py, _emit) carry one command id."""
    found = []
    ids = set()
    for key, value, seen in reader.poll():
        command = ControlCommand.model_validate_json(value)
        assert key == command.scope.encode()
        if command.scope == scope and command.command_id not in ids:
            ids.add(command.command_id)
            found.append((command, seen))
    return found


def make_producer(settings: Settings) -> Producer:
    return Producer({"bootstrap.servers": settings.kafka, "linger.ms": 0, "acks": "all"})


def send(producer: Producer, topic: str, key: bytes | None, value: bytes | None) -> None:
    producer.produce(topic, key=key, value=value)
    assert producer.flush(10) == 0


def call(agent: str, cost: int) -> CallEvent:
    return CallEvent(
        event_time_ms=now_ms(),
        agent_id=agent,
        provider="openai",
        requested_model="gpt-4o",
        used_model="gpt-4o",
        input_tokens=1000,
        output_tokens=200,
        cost_nano_usd=cost,
        latency_ms=250,
    )


def publish_policy(producer: Producer, settings: Settings, policy: BudgetPolicy) -> None:
    send(producer, settings.topics.policies, policy.key.encode(), policy.model_dump_json().encode())


def avoid_midnight() -> None:
    """A test expecting no RESUME must not straddle a UTC day boundary."""
    left = DAY_MS - now_ms() % DAY_MS
    if left < 120_000:
        time.sleep(left / 1000 + 1)


def calls_group(settings: Settings) -> str:
    """The consumer group of the data plane, which counts the calls topic."""
    return f"{settings.topic_prefix}processor-calls"


def group_is_empty(admin: AdminClient, group: str) -> bool:
    description = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return description.state.name in {"EMPTY", "DEAD"}


def rewind_group(admin: AdminClient, settings: Settings, group: str, partitions: int) -> None:
    """Commit offset 0 on every calls partition: the next worker replays everything."""
    starts = [TopicPartition(settings.topics.calls, p, 0) for p in range(partitions)]
    request = ConsumerGroupTopicPartitions(group, starts)
    admin.alter_consumer_group_offsets([request])[group].result(timeout=10)
    probe = Consumer({"bootstrap.servers": settings.kafka, "group.id": group})
    try:
        committed = probe.committed(starts, timeout=10)
    finally:
        probe.close()
    assert [tp.offset for tp in committed] == [0] * partitions


def test_stop_is_signed_exact_and_survives_kill_9_and_full_replay(
    stack_settings: Settings,
    workers: Callable[[], Worker],
    readers: tuple[TopicReader, TopicReader],
) -> None:
    settings = stack_settings
    control, _ = readers
    avoid_midnight()
    producer = make_producer(settings)
    publish_policy(producer, settings, BudgetPolicy(scope="agent:x", limit_usd=Decimal("0.05")))
    worker = workers()
    startup_s = worker.wait_ready()

    costs = [20_000_001, 9_999_999, 123_456, 19_876_545]  # crosses $0.05 on the last one
    assert sum(costs[:-1]) < 50_000_000 <= sum(costs)
    for cost in costs[:-1]:
        send(producer, settings.topics.calls, b"x", call("x", cost).model_dump_json().encode())
    # Calls of another agent on the same topic never count toward agent:x.
    send(producer, settings.topics.calls, b"y", call("y", 10**12).model_dump_json().encode())
    wait_for("spend below the limit", lambda: worker.day_spend("agent:x") == sum(costs[:-1]))
    assert commands(control, "agent:x") == []

    produced_at = time.monotonic()
    send(producer, settings.topics.calls, b"x", call("x", costs[-1]).model_dump_json().encode())
    found = wait_for("a STOP for agent:x", lambda: commands(control, "agent:x"))
    stop, seen_at = found[0]
    latency_s = seen_at - produced_at
    print(f"\nprocessor startup {startup_s:.2f}s; crossing event -> STOP {latency_s:.3f}s")
    assert len(found) == 1
    verify_command(stop, settings.control_key_bytes())
    assert stop.action is ControlAction.STOP
    assert stop.issuer == "processor"
    assert stop.spend_nano_usd == sum(costs)
    assert stop.limit_nano_usd == 50_000_000
    assert stop.period_start_ms == now_ms() // DAY_MS * DAY_MS
    assert stop.until_ms == stop.period_start_ms + DAY_MS
    assert stop.reason == "agent:x spent $0.050000001 of $0.05 daily budget"
    assert worker.day_spend("agent:x") == sum(costs)

    # Crash hard, then make the next worker replay every call from offset 0.
    worker.kill()
    group = calls_group(settings)
    admin = AdminClient({"bootstrap.servers": settings.kafka})
    wait_for("the dead worker to leave the group", lambda: group_is_empty(admin, group), 30)
    rewind_group(admin, settings, group, partitions=settings.calls_partitions)

    restarted = workers()
    restarted.wait_ready()
    extra = 777
    send(producer, settings.topics.calls, b"x", call("x", extra).model_dump_json().encode())
    wait_for(
        "the post-restart event to be applied",
        lambda: restarted.day_spend("agent:x") >= sum(costs) + extra,
    )
    assert restarted.day_spend("agent:x") == sum(costs) + extra
    assert restarted.day_spend("agent:y") == 10**12
    report = restarted.state("agent:x")
    assert report["last_command"]["command_id"] == str(stop.command_id)
    # Two sweep ticks: a wrongly lifted or re-issued STOP would be published by now.
    time.sleep(2.5)
    assert [c.command_id for c, _ in commands(control, "agent:x")] == [stop.command_id]


def test_bad_input_goes_to_dlq_and_policies_reload_live(
    stack_settings: Settings,
    workers: Callable[[], Worker],
    readers: tuple[TopicReader, TopicReader],
) -> None:
    settings = stack_settings
    control, dlq = readers
    producer = make_producer(settings)
    worker = workers()
    worker.wait_ready()

    status, body = worker.get("/health")
    assert (status, body["status"], body["policies"]) == (200, "ok", 0)
    assert worker.get("/state/agent:x")[0] == 401
    assert worker.get("/state/agent:x", "wrong-token")[0] == 401
    assert worker.get("/state/nonsense", settings.api_token_value())[0] == 404

    not_json = b"\x00this is not json"
    wrong_shape = json.dumps({"agent_id": "x", "cost_nano_usd": -5}).encode()
    send(producer, settings.topics.calls, b"x", not_json)
    send(producer, settings.topics.calls, b"x", wrong_shape)
    send(producer, settings.topics.calls, b"x", call("x", 7).model_dump_json().encode())
    send(producer, settings.topics.policies, b"agent:x|day", b'{"scope": "agent:x"}')

    wait_for("3 dead letters", lambda: len(dlq.poll()) >= 3)
    wait_for("the valid event after them", lambda: worker.day_spend("agent:x") == 7)
    letters = [InvalidMessage.model_validate_json(value) for _, value, _ in dlq.poll()]
    assert len(letters) == 3
    by_payload = {letter.payload(): letter for letter in letters}
    assert set(by_payload) == {not_json, wrong_shape, b'{"scope": "agent:x"}'}
    for letter, key in zip(letters, (k for k, _, _ in dlq.records), strict=True):
        assert letter.component == "processor"
        assert key == f"{letter.topic}:{letter.partition}".encode()
    bad_json = by_payload[not_json]
    assert bad_json.topic == settings.topics.calls
    assert "not a valid CallEvent" in bad_json.reason and "Invalid JSON" in bad_json.reason
    bad_shape = by_payload[wrong_shape]
    assert bad_shape.offset == bad_json.offset + 1
    assert "cost_nano_usd" in bad_shape.reason and "provider" in bad_shape.reason
    bad_policy = by_payload[b'{"scope": "agent:x"}']
    assert bad_policy.topic == settings.topics.policies
    assert "limit_usd" in bad_policy.reason

    # Hot reload: a policy published now governs spend already made.
    tiny = BudgetPolicy(scope="agent:x", limit_usd=Decimal("0.000000005"))
    publish_policy(producer, settings, tiny)
    found = wait_for("a STOP after the policy arrived", lambda: commands(control, "agent:x"))
    assert found[0][0].action is ControlAction.STOP
    assert found[0][0].spend_nano_usd == 7
    assert worker.get("/health")[1]["policies"] == 1

    # Deleting the policy lifts the STOP.
    send(producer, settings.topics.policies, tiny.key.encode(), None)
    resumed = wait_for(
        "a RESUME after the policy was deleted",
        lambda: [c for c, _ in commands(control, "agent:x") if c.action is ControlAction.RESUME],
    )
    verify_command(resumed[0], settings.control_key_bytes())

    # SIGTERM, as `agentledger down` sends it, stops the worker cleanly.
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=30) == 0, worker.log()
