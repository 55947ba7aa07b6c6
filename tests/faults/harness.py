"""What every fault case needs: the real services as processes (deploy.Stack), a workload from
agentledger.workload produced in the background at its planned pace, and the exact ground truth
compared with the processor's /state and the sink's ClickHouse (through its query server)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from agentledger.config import Settings
from agentledger.deploy.stack import Stack
from agentledger.review.query import QueryClient, QueryError
from agentledger.schemas import CallEvent
from agentledger.stream_processors.periods import DAY_MS
from agentledger.traces import load_trace
from agentledger.workload import (
    PlannedCall,
    late_and_duplicates,
    plan_to_events,
    replay_trace,
    runaway_retry_loop,
)

__all__ = [
    "FaultStack",
    "Load",
    "ScopeTruth",
    "SinkTruth",
    "control_records",
    "fleet_events",
    "processor_day_buckets",
    "scope_truth",
    "sink_truth",
    "wait_exact",
]

ScopeTruth = dict[str, dict[int, int]]
"""scope -> UTC day start (ms) -> spend in nano-USD"""
SinkTruth = dict[str, tuple[int, int, int]]
"""agent id -> (rows, distinct event ids, sum of cost)"""


def fleet_events(
    count: int, seconds: float, *, seed: int = 0, start_ms: int | None = None
) -> list[tuple[int, CallEvent]]:
    """The Azure conversation trace over 16 agents in 4 pools and 4 workflows, squeezed into
    ``seconds``, with a runaway retry loop, late events (a day back) and duplicates (the same
    event id twice). Returns (offset ms, event) pairs in sending order."""
    trace = load_trace("conv", limit=count)
    span_ms = max(trace[-1].arrival_ms - trace[0].arrival_ms, 1)
    plan: list[PlannedCall] = replay_trace(
        trace, agents=16, pools=4, workflows=4, speedup=span_ms / (seconds * 1000), seed=seed
    )
    plan += runaway_retry_loop(trace, attempts=max(count // 20, 1), every_ms=int(seconds * 20))
    plan = late_and_duplicates(plan, late_every=25, duplicate_every=13, seed=seed)
    plan.sort(key=lambda c: c.at_ms)
    start = start_ms if start_ms is not None else time.time_ns() // 1_000_000
    events = plan_to_events(plan, start_ms=start)
    return [(call.at_ms, event) for call, event in zip(plan, events, strict=True)]


def scope_truth(events: Iterable[CallEvent]) -> ScopeTruth:
    """Spend per scope and UTC day of event time, each event id once."""
    seen: set[str] = set()
    totals: ScopeTruth = defaultdict(lambda: defaultdict(int))
    for event in events:
        if event.event_id.hex in seen:
            continue
        seen.add(event.event_id.hex)
        day = event.event_time_ms - event.event_time_ms % DAY_MS
        for scope in event.scopes():
            totals[scope][day] += event.cost_nano_usd
    return {scope: dict(days) for scope, days in totals.items()}


def sink_truth(events: Iterable[CallEvent]) -> SinkTruth:
    """One row per distinct event id, per agent."""
    unique: dict[str, CallEvent] = {}
    for event in events:
        unique.setdefault(event.event_id.hex, event)
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for event in unique.values():
        row = rows[event.agent_id]
        row[0] += 1
        row[1] += 1
        row[2] += event.cost_nano_usd
    return {agent: (r[0], r[1], r[2]) for agent, r in rows.items()}


class Load:
    """Produces (offset, event) pairs at their offsets from a background thread, keyed by
    agent id, through a plain idempotent producer that rides out a broker outage (its
    messages wait in librdkafka's queue for up to ``message_timeout_ms``)."""

    def __init__(
        self,
        settings: Settings,
        events: Sequence[tuple[int, CallEvent]],
        *,
        message_timeout_ms: int = 300_000,
    ) -> None:
        self.topic = settings.topics.calls
        self.events = list(events)
        self.produced = 0
        self.failures: list[str] = []
        self._producer = Producer(
            {
                "bootstrap.servers": settings.kafka,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 5,
                "message.timeout.ms": message_timeout_ms,
                "reconnect.backoff.max.ms": 500,
                # Once in ~20 broker restarts this producer went silent after the broker's
                # "no leader" answers of its controlled shutdown, never reconnected, and every
                # message timed out after 5 min; a periodic metadata refresh (default 5 min)
                # learns the leaders again.
                "topic.metadata.refresh.interval.ms": 10_000,
            }
        )
        self._thread = threading.Thread(target=self._run, name="fault-load", daemon=True)

    def _report(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.failures.append(str(err))

    def _run(self) -> None:
        started = time.monotonic()
        for at_ms, event in self.events:
            wait = started + at_ms / 1000 - time.monotonic()
            if wait > 0:
                self._producer.poll(wait)
            key, value = event.agent_id.encode(), event.model_dump_json().encode()
            while True:
                try:
                    self._producer.produce(self.topic, value, key, on_delivery=self._report)
                    break
                except BufferError:
                    self._producer.poll(0.05)
            self._producer.poll(0)
            self.produced += 1

    def start(self) -> Load:
        self._thread.start()
        return self

    def wait_produced(self, fraction: float, timeout_s: float = 120.0) -> None:
        """Block until ``fraction`` of the events were handed to the producer."""
        want = int(len(self.events) * fraction)
        wait_until(f"{want} events produced", lambda: self.produced >= want, timeout_s)

    def finish(self, timeout_s: float = 300.0) -> None:
        """Wait for the last event, then for every delivery report; no event may fail."""
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the load did not finish producing"
        left = self._producer.flush(timeout_s)
        assert left == 0, f"{left} events still undelivered after {timeout_s}s"
        assert not self.failures, f"{len(self.failures)} deliveries failed: {self.failures[:3]}"


def wait_until(what: str, check: Callable[[], object], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


def _get_json(url: str, token: str) -> tuple[int, dict[str, Any]] | None:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (urllib.error.URLError, OSError):
        return None  # not listening (yet): a restarting service


def control_records(settings: Settings, scope: str, timeout_s: float = 10.0) -> list[str]:
    """What a fresh reader finds on the control topic for ``scope`` (action, offset, issued
    at): tells a command never published from one a listener did not receive."""
    topic = settings.topics.control
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka,
            "group.id": f"fault-diagnostics-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    found: list[str] = []
    try:
        partitions = consumer.list_topics(topic, timeout=timeout_s).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        left = set(partitions)
        deadline = time.monotonic() + timeout_s
        while left and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error() is not None:
                left.discard(msg.partition())
                continue
            if msg.key() == scope.encode() and msg.value():
                command = json.loads(msg.value() or b"{}")
                found.append(
                    f"{command.get('action')}@{msg.partition()}:{msg.offset()} "
                    f"issued {command.get('issued_at_ms')}"
                )
        if left:
            found.append(f"(partitions {sorted(left)} not read to their end)")
    finally:
        consumer.close()
    return found


def processor_day_buckets(settings: Settings, port: int, scope: str) -> dict[int, int] | None:
    """The day buckets of ``scope`` on the processor at ``port``; None when it is down or does
    not hold the scope's partition (no applied offsets)."""
    answer = _get_json(f"http://127.0.0.1:{port}/state/{scope}", settings.api_token_value())
    if answer is None or answer[0] != 200 or not answer[1].get("applied_offsets"):
        return None
    buckets: dict[str, int] = answer[1]["buckets"]
    return {int(k[4:]): int(v) for k, v in buckets.items() if k.startswith("day:")}


class FaultStack:
    """Processor and sink as real processes on the given broker, under ``settings.home``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stack = Stack(settings, progress=lambda _m: None, manage_kafka=False)
        self.query = QueryClient.from_settings(settings)

    def up(self) -> None:
        """Start the services and wait until the processor holds its input partitions and
        has read the policies: /health answers before the worker has joined its group, and a
        fault injected during faust's startup tests the start, not the running pipeline (a
        broker stopped then crashed the worker creating its changelog topics)."""
        try:
            self.stack.up(timeout_s=180)
            wait_until("the processor to hold its partitions", self.processor_ready, 180)
        except BaseException:
            # The caller never gets the stack to tear down: leave no service running.
            self.stack.down()
            raise

    def processor_ready(self) -> bool:
        health = self.health()
        if health is None or not health.get("policies_loaded"):
            return False
        # Both hops are the data plane's.
        return bool(health.get("data_plane", {}).get("partitions"))

    def kill(self, name: str) -> None:
        """kill -9 of the processor or the sink."""
        assert self.stack.stop_service(name, kill=True), f"{name} was not running"

    def start(self, name: str) -> None:
        self.stack.start_service(name, timeout_s=180)

    def down(self) -> None:
        self.stack.down()
        self.query.close()

    def log(self, name: str, tail: int = 4000) -> str:
        path: Path = self.stack.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else "(no log)"

    def processor_lines(self, *needles: str, limit: int = 60) -> str:
        """The processor log's lines that contain any of ``needles`` (the last ``limit``): its
        full log is mostly the fetcher's connection errors of an outage."""
        path: Path = self.stack.log_dir / "processor.log"
        if not path.exists():
            return "(no log)"
        lines = path.read_text(errors="replace").splitlines()
        found = [line for line in lines if any(n in line for n in needles)]
        return "\n".join(found[-limit:])

    def health(self) -> dict[str, Any] | None:
        """The processor's /health (partitions assigned, paused, read and committed offsets)."""
        answer = _get_json(
            f"http://127.0.0.1:{self.settings.processor_port}/health",
            self.settings.api_token_value(),
        )
        return None if answer is None else answer[1]

    def scope_report(self, scope: str) -> dict[str, Any] | None:
        """The processor's /state of ``scope`` without its buckets, or None when it is down."""
        answer = _get_json(
            f"http://127.0.0.1:{self.settings.processor_port}/state/{scope}",
            self.settings.api_token_value(),
        )
        if answer is None:
            return None
        report = dict(answer[1])
        report.pop("buckets", None)
        return report

    def processor_diff(self, truth: ScopeTruth) -> dict[str, tuple[object, dict[int, int]]]:
        """Scopes whose live day buckets differ from the truth (empty when exact)."""
        port = self.settings.processor_port
        found = {s: processor_day_buckets(self.settings, port, s) for s in truth}
        return {s: (got, truth[s]) for s, got in found.items() if got != truth[s]}

    def sink_totals(self) -> SinkTruth | None:
        try:
            result = self.query.query(
                "SELECT agent_id, count(), uniqExact(event_id), sum(toInt128(cost_nano_usd)) "
                "FROM calls GROUP BY agent_id"
            )
        except (QueryError, OSError):
            return None  # the sink is down or not ready: ask again
        return {str(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in result.rows}


def wait_exact(
    stack: FaultStack, events: Sequence[CallEvent], timeout_s: float = 180.0
) -> dict[str, float]:
    """Wait until the processor's day buckets of every scope and the sink's rows per agent
    equal the ground truth; fail with the differences otherwise. Returns how long each took
    (from the call) in seconds."""
    truth, rows = scope_truth(events), sink_truth(events)
    started = time.monotonic()
    deadline = started + timeout_s
    took: dict[str, float] = {}
    diff: dict[str, tuple[object, dict[int, int]]] = {}
    seen: SinkTruth | None = None
    while time.monotonic() < deadline:
        if "processor" not in took:
            diff = stack.processor_diff(truth)
            if not diff:
                took["processor"] = round(time.monotonic() - started, 1)
        if "sink" not in took:
            seen = stack.sink_totals()
            if seen == rows:
                took["sink"] = round(time.monotonic() - started, 1)
        if len(took) == 2:
            return took
        time.sleep(0.5)
    problems = []
    if "processor" not in took:
        problems.append(f"processor differs on {len(diff)} scopes: {dict(list(diff.items())[:4])}")
        problems.append(f"processor log:\n{stack.log('processor')}")
    if "sink" not in took:
        wrong = {a: (None if seen is None else seen.get(a), rows[a]) for a in rows}
        wrong = {a: pair for a, pair in wrong.items() if pair[0] != pair[1]}
        problems.append(f"sink (rows, ids, cost) differ (got, want): {wrong}")
        problems.append(f"sink log:\n{stack.log('sink')}")
    raise AssertionError("\n".join(problems))
