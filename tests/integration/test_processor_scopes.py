"""Pool, workflow and task-type scopes on the real broker: the second hop (scopes topic) is
exact through duplicates, a kill -9 and a full replay of both hops."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

import tests.integration.test_processor_worker as base
from agentledger.config import Settings
from agentledger.schemas import BudgetPolicy, CallEvent, ControlAction, verify_command
from agentledger.stream_processors.counting import FUTURE_TOLERANCE_MS
from agentledger.stream_processors.periods import DAY_MS
from agentledger.stream_processors.scopes import scopes_topic_name
from tests.conftest import free_port

pytestmark = pytest.mark.integration

# The worker fixtures and helpers of the single-scope tests, shared rather than copied.
workers = base.workers
readers = base.readers
Worker = base.Worker
TopicReader = base.TopicReader


def event(agent: str, cost: int, at_ms: int, **scopes: str) -> CallEvent:
    return CallEvent(
        event_time_ms=at_ms,
        agent_id=agent,
        provider="openai",
        requested_model="gpt-4o",
        used_model="gpt-4o",
        cost_nano_usd=cost,
        latency_ms=100,
        **scopes,  # type: ignore[arg-type]
    )


def ground_truth(settings: Settings, now_ms: int) -> dict[str, dict[int, int]]:
    """Recompute spend per scope and UTC day from the calls topic itself: every valid event
    once per event id, future ones (beyond the tolerance) left out."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka,
            "group.id": "ground-truth",
            "enable.auto.commit": False,
        }
    )
    topic = settings.topics.calls
    try:
        parts = [TopicPartition(topic, p, 0) for p in range(settings.calls_partitions)]
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(settings.calls_partitions)
        }
        consumer.assign(parts)
        seen: set[str] = set()
        totals: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        done = {p: ends[p] == 0 for p in range(settings.calls_partitions)}
        deadline = time.monotonic() + 30
        while not all(done.values()):
            assert time.monotonic() < deadline, "ground truth: calls topic not read in 30 s"
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            partition, offset = msg.partition(), msg.offset()
            assert partition is not None and offset is not None
            if offset + 1 >= ends[partition]:
                done[partition] = True
            call = CallEvent.model_validate_json(msg.value() or b"")
            if call.event_id.hex in seen or call.event_time_ms > now_ms + FUTURE_TOLERANCE_MS:
                continue
            seen.add(call.event_id.hex)
            day = call.event_time_ms - call.event_time_ms % DAY_MS
            for scope in call.scopes():
                totals[scope][day] += call.cost_nano_usd
    finally:
        consumer.close()
    return totals


def day_buckets(worker: Worker, scope: str) -> dict[int, int]:
    buckets = worker.state(scope)["buckets"]
    return {int(k[4:]): int(v) for k, v in buckets.items() if k.startswith("day:")}


def rewind(admin: AdminClient, settings: Settings) -> None:
    """Commit offset 0 on every partition of both hops' source topics: the calls in the data
    plane's group, the scopes topic in faust's."""
    groups = {
        f"{settings.topic_prefix}processor-calls": settings.topics.calls,
        f"{settings.topic_prefix}processor": scopes_topic_name(settings),
    }
    for group, topic in groups.items():
        starts = [TopicPartition(topic, p, 0) for p in range(settings.calls_partitions)]
        admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, starts)])[
            group
        ].result(timeout=10)


def test_pool_workflow_and_task_type_are_exact_through_duplicates_kill_9_and_replay(
    stack_settings: Settings,
    workers: Callable[[], Worker],
    readers: tuple[TopicReader, TopicReader],
) -> None:
    settings = stack_settings
    control, dlq = readers
    base.avoid_midnight()
    producer = base.make_producer(settings)
    calls = settings.topics.calls
    # pool:research stops at $0.005 a day; the default for agents is far above their spend.
    base.publish_policy(
        producer, settings, BudgetPolicy(scope="pool:research", limit_usd=Decimal("0.005"))
    )
    base.publish_policy(
        producer, settings, BudgetPolicy(scope="agent:*", limit_usd=Decimal("1000"))
    )
    worker = workers()
    worker.wait_ready()

    now = base.now_ms()
    research = {"pool": "research", "workflow_id": "wf-1", "task_type": "search"}
    batch = [
        event("researcher-1", 3_000_001, now, **research),
        event("researcher-2", 2_500_000, now, **research),
        event("writer-1", 4_000_000, now, pool="writing", workflow_id="wf-1", task_type="draft"),
        # Late: yesterday's event counts into yesterday, in every scope.
        event("researcher-2", 1_234_567, now - DAY_MS, **research),
        event("loner", 999, now),
    ]
    for item in batch:
        base.send(producer, calls, item.agent_id.encode(), item.model_dump_json().encode())
    # The same bytes twice (a producer retry): counted once.
    twice = event("researcher-1", 1_111_111, now, **research).model_dump_json().encode()
    base.send(producer, calls, b"researcher-1", twice)
    base.send(producer, calls, b"researcher-1", twice)
    # An hour ahead of the clock is beyond the tolerance: dead-lettered, not counted.
    future = event("researcher-1", 10**12, now + 3_600_000, **research)
    base.send(producer, calls, b"researcher-1", future.model_dump_json().encode())

    scopes = ["pool:research", "pool:writing", "workflow:wf-1", "task_type:search"]
    scopes += ["agent:researcher-1", "agent:researcher-2", "agent:loner"]
    truth = ground_truth(settings, base.now_ms())
    assert truth["pool:research"][now - now % DAY_MS] == 3_000_001 + 2_500_000 + 1_111_111
    assert (
        truth["workflow:wf-1"][now - now % DAY_MS] == 3_000_001 + 2_500_000 + 1_111_111 + 4_000_000
    )

    def matches() -> bool:
        return all(day_buckets(worker, s) == dict(truth[s]) for s in scopes)

    base.wait_for("every scope to reach the ground truth", matches)
    letters = base.wait_for("the future event in the dlq", dlq.poll)
    assert len(letters) == 1 and b"in the future" in letters[0][1]

    found = base.wait_for(
        "a STOP for pool:research", lambda: base.commands(control, "pool:research")
    )
    stop = found[0][0]
    verify_command(stop, settings.control_key_bytes())
    assert stop.action is ControlAction.STOP
    # Which research event crossed first depends on partition interleaving; the STOP states
    # the spend at the crossing.
    assert 5_000_000 <= stop.spend_nano_usd <= truth["pool:research"][now - now % DAY_MS]
    assert stop.limit_nano_usd == 5_000_000
    assert stop.reason.startswith("pool:research spent $0.00")
    assert stop.reason.endswith(" of $0.005 daily budget")
    # No other scope is over its limit.
    assert base.commands(control, "pool:writing") == []
    assert base.commands(control, "agent:researcher-1") == []

    # kill -9, then replay both hops from offset 0.
    worker.kill()
    admin = AdminClient({"bootstrap.servers": settings.kafka})
    for group in (f"{settings.topic_prefix}processor", f"{settings.topic_prefix}processor-calls"):
        base.wait_for(
            f"the dead worker to leave {group}", lambda g=group: base.group_is_empty(admin, g)
        )
    rewind(admin, settings)
    restarted = workers()
    restarted.wait_ready()
    extra = event("researcher-2", 777, base.now_ms(), **research)
    base.send(producer, calls, b"researcher-2", extra.model_dump_json().encode())
    truth = ground_truth(settings, base.now_ms())

    def matches_after() -> bool:
        return all(day_buckets(restarted, s) == dict(truth[s]) for s in scopes)

    base.wait_for("every scope to reach the ground truth after replay", matches_after)
    time.sleep(2.5)  # two sweep ticks: a re-issued STOP would be published by now
    assert matches_after()
    assert [c.command_id for c, _ in base.commands(control, "pool:research")] == [stop.command_id]
    # The replayed future event is dead-lettered again, and nothing else. One empty poll does
    # not mean the reader has caught up, so wait for it, then check that nothing follows.
    base.wait_for("the replayed future event in the dlq again", lambda: len(dlq.poll()) >= 2)
    time.sleep(1.0)
    assert len(dlq.poll()) == 2


AGENTS = [f"agent-{n}" for n in range(24)]
SCOPES = (
    [f"agent:{a}" for a in AGENTS]
    + [f"pool:pool-{n}" for n in range(3)]
    + [f"workflow:wf-{n}" for n in range(5)]
)


def send_round(producer: Any, settings: Settings, round_: int) -> None:
    """One event per agent (distinct costs per agent and round), flushed."""
    for n, agent in enumerate(AGENTS):
        item = event(
            agent,
            1_000_003 * (n + 1) + round_,
            base.now_ms(),
            pool=f"pool-{n % 3}",
            workflow_id=f"wf-{n % 5}",
        )
        producer.produce(
            settings.topics.calls, key=agent.encode(), value=item.model_dump_json().encode()
        )
    assert producer.flush(10) == 0


def held(worker: Worker, scope: str) -> dict[int, int] | None:
    """The worker's day buckets of the scope when it holds the scope's partition, else None."""
    if not worker.state(scope)["applied_offsets"]:
        return None
    return day_buckets(worker, scope)


def last_problems(problems: Callable[[], dict[str, Any]], timeout_s: float) -> dict[str, Any]:
    """Poll ``problems`` until it finds none or ``timeout_s`` passes; its last answer."""
    deadline = time.monotonic() + timeout_s
    while (left := problems()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def wait_shared_and_exact(workers: list[Worker], truth: dict[str, dict[int, int]]) -> None:
    """Within 90 s every scope is held, exactly, by one worker, and every worker holds some."""

    def problems() -> dict[str, Any]:
        found: dict[str, Any] = {}
        holders = set()
        for scope in SCOPES:
            buckets = [held(w, scope) for w in workers]
            holding = [i for i, b in enumerate(buckets) if b is not None]
            holders.update(holding)
            if len(holding) != 1 or buckets[holding[0]] != dict(truth[scope]):
                found[scope] = {"held": buckets, "truth": dict(truth[scope])}
        if len(holders) != len(workers):
            found["holders"] = sorted(holders)
        return found

    left = last_problems(problems, 90)
    assert not left, (
        f"the workers (logs {[str(w.log_path) for w in workers]}) do not share the scopes "
        f"exactly: {left}\n" + "\n".join(w.diagnosis() for w in workers)
    )


def assert_exact_on(worker: Worker, truth: dict[str, dict[int, int]]) -> None:
    """Within 90 s the worker holds every scope at exactly the truth."""

    def wrong() -> dict[str, tuple[dict[int, int] | None, dict[int, int]]]:
        found = {s: (held(worker, s), dict(truth[s])) for s in SCOPES}
        return {s: pair for s, pair in found.items() if pair[0] != pair[1]}

    left = last_problems(wrong, 90)
    assert not left, (
        f"worker (log {worker.log_path}) differs from the truth: {left}\n{worker.diagnosis()}"
    )


# Was opt-in while totals came out short after the rebalance in about 1 of 10 runs: records
# dropped from faust's queues and delivered out of offset order around the rebalance
# (stream_processors/flow.py, ordering.py; stream_processors/README.md "Rebalances").
def test_two_workers_share_partitions_and_stay_exact_when_one_is_killed(
    stack_settings: Settings, tmp_path: Path
) -> None:
    settings = stack_settings
    second = settings.model_copy(update={"processor_port": free_port(), "home": tmp_path / "b"})
    started: list[Worker] = []
    try:
        for index, each in enumerate((settings, second)):
            started.append(Worker(each, tmp_path / f"worker-{index}.log"))
        survivor, victim = started
        for worker in started:
            worker.wait_ready(timeout_s=90)
        producer = base.make_producer(settings)
        send_round(producer, settings, 0)
        wait_shared_and_exact(started, ground_truth(settings, base.now_ms()))

        victim.kill()
        send_round(producer, settings, 1)
        send_round(producer, settings, 2)
        assert_exact_on(survivor, ground_truth(settings, base.now_ms()))
    finally:
        for worker in started:
            worker.kill()


def test_a_worker_added_mid_stream_takes_a_share_and_totals_stay_exact(
    stack_settings: Settings, tmp_path: Path
) -> None:
    """A second worker joins while events flow (a rebalance under load), the two share the
    partitions exactly; then the first is killed and the newcomer holds everything exactly."""
    settings = stack_settings
    second = settings.model_copy(update={"processor_port": free_port(), "home": tmp_path / "b"})
    first = Worker(settings, tmp_path / "worker-0.log")
    started = [first]
    stop = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:
        producer = base.make_producer(settings)
        round_ = 0
        try:
            while not stop.is_set():
                send_round(producer, settings, round_)
                round_ += 1
                time.sleep(0.2)
        except BaseException as exc:  # re-raised in the test thread below
            errors.append(exc)

    load = threading.Thread(target=produce, daemon=True)
    try:
        first.wait_ready(timeout_s=90)
        load.start()
        base.wait_for("the first worker to count", lambda: held(first, SCOPES[0]) is not None, 60)
        joined = Worker(second, tmp_path / "worker-1.log")
        started.append(joined)
        joined.wait_ready(timeout_s=90)
        time.sleep(3)  # events keep flowing across the rebalance
        stop.set()
        load.join(timeout=30)
        assert not errors, errors
        wait_shared_and_exact(started, ground_truth(settings, base.now_ms()))

        first.kill()
        producer = base.make_producer(settings)
        send_round(producer, settings, 10_000)
        assert_exact_on(joined, ground_truth(settings, base.now_ms()))
    finally:
        stop.set()
        for worker in started:
            worker.kill()
