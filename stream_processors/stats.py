"""Routing stats: cost, latency and success per (agent or model, task type), kept on the
compacted stats topic for the shim's router.

The data plane counts each call it parsed into in-memory partial aggregates
(:meth:`StatsAggregator.count`) and publishes the changed ones at most once per interval, in
its cycle's transaction. Per event it is a few integer additions.

Partials are per calls partition (the record key ends in the partition), so exactly one worker
writes each, and each carries the highest calls offset it counted: a replay after a restart or
a rebalance skips what was already counted. Every worker reads the whole stats topic before
its app starts (blocking, in ``build_app``, so the calls consumer never waits for it) and
follows it afterwards (read_committed), so it starts from what was published and picks up a
partition's partials from its previous owner; of two values of one key the higher offset wins.
A crash loses the calls counted since the last publish (at most one interval) when their
offsets were committed meanwhile: stats undercount then, they never count a call twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from agentledger.config import Settings
from agentledger.schemas import CallFields, CallStatus, TaskStats
from agentledger.schemas.call_decode import decode_call
from agentledger.schemas.stats import latency_bucket
from agentledger.schemas.topic_specs import topic_specs
from agentledger.topic_admin import ensure_topics

from .counting import FUTURE_TOLERANCE_MS
from .declare import TopicMissing
from .kafka_clients import ClientOptions, follower_consumer

__all__ = [
    "InvalidStats",
    "StatsAggregator",
    "follow_stats",
    "rebuild_stats",
    "register_stats",
]

log = logging.getLogger(__name__)

# Lookups kept by StatsAggregator.count before it starts over (agents come and go).
PAIRS_KEPT = 100_000
# Latency -> sketch bucket, kept for this many distinct latencies (a log per event otherwise).
BUCKETS_KEPT = 100_000

Clock = Callable[[], int]


class DeadLetter(Protocol):
    def __call__(
        self,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        payload: bytes | None,
        reason: str,
    ) -> Awaitable[None]: ...


@dataclass(slots=True)
class _Partial:
    """A TaskStats being added to; mutable, so an event costs no model copy."""

    subject: str
    task_type: str | None
    partition: int
    offset: int = -1
    calls: int = 0
    successes: int = 0
    priced_calls: int = 0
    cost_nano_usd: int = 0
    buckets: dict[int, int] = field(default_factory=dict)
    first_ms: int = -1
    last_ms: int = 0

    @classmethod
    def of(cls, stats: TaskStats) -> _Partial:
        return cls(
            subject=stats.subject,
            task_type=stats.task_type,
            partition=stats.source_partition,
            offset=stats.source_offset,
            calls=stats.calls,
            successes=stats.successes,
            priced_calls=stats.priced_calls,
            cost_nano_usd=stats.cost_nano_usd,
            buckets=dict(stats.latency_ms_buckets),
            first_ms=stats.first_event_time_ms,
            last_ms=stats.last_event_time_ms,
        )

    def to_stats(self, now_ms: int) -> TaskStats:
        return TaskStats(
            subject=self.subject,
            task_type=self.task_type,
            source_partition=self.partition,
            source_offset=self.offset,
            calls=self.calls,
            successes=self.successes,
            priced_calls=self.priced_calls,
            cost_nano_usd=self.cost_nano_usd,
            latency_ms_buckets=dict(self.buckets),
            first_event_time_ms=max(self.first_ms, 0),
            last_event_time_ms=self.last_ms,
            updated_at_ms=max(now_ms, 0),
        )


@dataclass(slots=True)
class _Sums:
    """One batch's events of one (agent, model, task type, partition), summed."""

    calls: int = 0
    successes: int = 0
    priced_calls: int = 0
    cost_nano_usd: int = 0
    buckets: dict[int, int] = field(default_factory=dict)
    first_ms: int = 0
    last_ms: int = 0
    offset: int = -1


def _subjects(event: CallFields) -> tuple[str, str]:
    return f"agent:{event.agent_id}", f"model:{event.used_model}"


class StatsAggregator:
    """The partials of this worker, and of others as last published. No faust, no I/O."""

    def __init__(self, clock: Clock, future_tolerance_ms: int = FUTURE_TOLERANCE_MS) -> None:
        self.clock = clock
        self.future_tolerance_ms = future_tolerance_ms
        self._partials: dict[str, _Partial] = {}
        # (agent, model, task type, partition) -> (key, partial) of both subjects: building
        # the keys per event was a fifth of the data plane's counting (bench.processor_core).
        self._pairs: dict[tuple[str, str, str | None, int], tuple[tuple[str, _Partial], ...]] = {}
        self._dirty: set[str] = set()
        self._buckets: dict[int, int] = {}
        self.metrics = {"counted": 0, "replayed": 0, "unreadable": 0, "loaded": 0}

    def __len__(self) -> int:
        return len(self._partials)

    def observe(self, partition: int, offset: int, value: bytes | None) -> bool:
        """Count one calls record; False when it is a replay or not a CallEvent (the spend
        path dead-letters those, so it is not done twice here)."""
        if not value:
            self.metrics["unreadable"] += 1
            return False
        try:
            event = decode_call(value)
        except ValidationError:
            self.metrics["unreadable"] += 1
            return False
        if event.event_time_ms > self.clock() + self.future_tolerance_ms:
            # The spend path dead-letters it; counted here it would fake freshness.
            self.metrics["unreadable"] += 1
            return False
        return self.count(event, partition, offset)

    def _pair(
        self, where: tuple[str, str, str | None, int], event: CallFields
    ) -> tuple[tuple[str, _Partial], ...]:
        pair = self._pairs.get(where)
        if pair is None:
            task_type, partition = where[2], where[3]
            pair = self._pairs[where] = tuple(
                (key, self._partial(key, subject, task_type, partition))
                for subject in _subjects(event)
                for key in (f"{subject}|{task_type or ''}|{partition}",)
            )
            if len(self._pairs) > PAIRS_KEPT:
                self._pairs.clear()
                self._pairs[where] = pair
        return pair

    def count_batch(self, records: Sequence[tuple[CallFields, int, int]]) -> None:
        """:meth:`count` for a batch of (event, partition, offset), in offset order per
        partition: summed per (agent, model, task type, partition) first, then added to each
        partial once. Per event and partial, ``count`` was a third of the data plane's
        counting (bench.processor_core)."""
        groups: dict[tuple[str, str, str | None, int], list[tuple[CallFields, int]]] = {}
        for event, partition, offset in records:
            where = (event.agent_id, event.used_model, event.task_type, partition)
            group = groups.get(where)
            if group is None:
                group = groups[where] = []
            group.append((event, offset))
        # Where each partial stood before this batch: an agent's partial takes the events of
        # several models' groups, so the replay test must not see the batch's own offsets.
        starts: dict[str, int] = {}
        counted = 0
        for where, items in groups.items():
            made: tuple[int, _Sums] | None = None
            least = len(items)
            for key, partial in self._pair(where, items[0][0]):
                start = starts.setdefault(key, partial.offset)
                first = 0
                while first < len(items) and items[first][1] <= start:
                    first += 1
                least = min(least, first)
                if first == len(items):
                    continue
                if made is None or made[0] != first:
                    made = (first, self._sums(items, first))
                sums = made[1]
                partial.calls += sums.calls
                partial.successes += sums.successes
                partial.priced_calls += sums.priced_calls
                partial.cost_nano_usd += sums.cost_nano_usd
                buckets = partial.buckets
                for bucket, n in sums.buckets.items():
                    buckets[bucket] = buckets.get(bucket, 0) + n
                if partial.first_ms < 0 or sums.first_ms < partial.first_ms:
                    partial.first_ms = sums.first_ms
                if sums.last_ms > partial.last_ms:
                    partial.last_ms = sums.last_ms
                if sums.offset > partial.offset:
                    partial.offset = sums.offset
                self._dirty.add(key)
            # As count() reckons it: an event is counted when any of its partials took it.
            counted += len(items) - least
        self.metrics["counted"] += counted
        self.metrics["replayed"] += len(records) - counted

    def _sums(self, items: list[tuple[CallFields, int]], first: int) -> _Sums:
        cache = self._buckets
        if len(cache) > BUCKETS_KEPT:
            cache.clear()
        sums = _Sums()
        buckets = sums.buckets
        successes = priced = cost = 0
        low = high = items[first][0].event_time_ms
        for event, _ in items[first:] if first else items:
            if event.status is CallStatus.OK:
                successes += 1
            if event.priced:
                priced += 1
                cost += event.cost_nano_usd
            latency = event.latency_ms
            bucket = cache.get(latency)
            if bucket is None:
                bucket = cache[latency] = latency_bucket(latency)
            buckets[bucket] = buckets.get(bucket, 0) + 1
            t = event.event_time_ms
            if t < low:
                low = t
            elif t > high:
                high = t
        sums.calls = len(items) - first
        sums.successes = successes
        sums.priced_calls = priced
        sums.cost_nano_usd = cost
        sums.first_ms = low
        sums.last_ms = high
        sums.offset = items[-1][1]
        return sums

    def count(self, event: CallFields, partition: int, offset: int) -> bool:
        counted = False
        task_type = event.task_type
        pair = self._pair((event.agent_id, event.used_model, task_type, partition), event)
        bucket = latency_bucket(event.latency_ms)
        ok = event.status is CallStatus.OK
        priced = event.priced
        cost = event.cost_nano_usd
        t = event.event_time_ms
        # Inline rather than a method on _Partial: this runs twice per calls event.
        for key, partial in pair:
            if offset <= partial.offset:
                continue
            partial.offset = offset
            partial.calls += 1
            if ok:
                partial.successes += 1
            if priced:
                partial.priced_calls += 1
                partial.cost_nano_usd += cost
            buckets = partial.buckets
            buckets[bucket] = buckets.get(bucket, 0) + 1
            if partial.first_ms < 0 or t < partial.first_ms:
                partial.first_ms = t
            if t > partial.last_ms:
                partial.last_ms = t
            self._dirty.add(key)
            counted = True
        self.metrics["counted" if counted else "replayed"] += 1
        return counted

    def _partial(self, key: str, subject: str, task_type: str | None, partition: int) -> _Partial:
        partial = self._partials.get(key)
        if partial is None:
            partial = self._partials[key] = _Partial(subject, task_type, partition)
        return partial

    def load(self, value: bytes) -> str | None:
        """Take one stats-topic value unless ours is at least as far; return why it was
        rejected, or None."""
        try:
            stats = TaskStats.model_validate_json(value)
        except ValidationError as exc:
            return f"not a valid TaskStats: {exc}"
        mine = self._partials.get(stats.key)
        if mine is None or stats.source_offset > mine.offset:
            self._partials[stats.key] = _Partial.of(stats)
            self._pairs.clear()  # they may hold the partial just replaced
            self._dirty.discard(stats.key)
            self.metrics["loaded"] += 1
        return None

    def take_dirty(self) -> list[TaskStats]:
        """The partials changed since the last call, as records to publish."""
        now = self.clock()
        keys, self._dirty = self._dirty, set()
        return [self._partials[key].to_stats(now) for key in sorted(keys)]

    def mark_dirty(self, keys: list[str]) -> None:
        """Publish these partials again (their last publish was in an aborted transaction)."""
        self._dirty.update(k for k in keys if k in self._partials)

    def stats(self, key: str) -> TaskStats | None:
        partial = self._partials.get(key)
        return None if partial is None else partial.to_stats(self.clock())


@dataclass(frozen=True)
class InvalidStats:
    """A stats-topic record that is not a TaskStats, for the dlq."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str


def rebuild_stats(
    aggregator: StatsAggregator, settings: Settings, timeout_s: float = 60.0
) -> tuple[dict[int, int], list[InvalidStats]]:
    """Read the stats topic to its end into ``aggregator``, blocking (before the app starts,
    so the calls consumer, shared with the spend agents, never waits for it). Returns the
    offset to follow on from per partition, and the records that were not TaskStats."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    topic = settings.topics.stats
    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "bootstrap.servers": settings.kafka,
            "group.id": f"{settings.topic_prefix}stats-rebuild",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    invalid: list[InvalidStats] = []
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise TopicMissing(
                f"stats topic {topic!r} is missing on {settings.kafka}; create the stack's "
                "topics first (agentledger up, or agentledger.topic_admin.ensure_topics)"
            )
        ends: dict[int, int] = {}
        pending: set[int] = set()
        for partition in meta.partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout_s
            )
            ends[partition] = high
            if high > low:
                pending.add(partition)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"could not read the stats topic {topic!r} to its end within {timeout_s}s"
                )
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            partition = msg.partition()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(partition)
                else:
                    log.warning("stats rebuild: %s", err)
                continue
            value, offset = msg.value(), msg.offset()
            if partition is None or offset is None:
                continue
            if value is not None:
                reason = aggregator.load(value)
                if reason is not None:
                    invalid.append(InvalidStats(partition, offset, msg.key(), value, reason))
            if offset + 1 >= ends[partition]:
                pending.discard(partition)
    finally:
        consumer.close()
    log.info("stats rebuilt: %d partials", len(aggregator))
    return ends, invalid


async def follow_stats(
    aggregator: StatsAggregator,
    *,
    bootstrap: str,
    topic: str,
    start: dict[int, int],
    on_invalid: Callable[[InvalidStats], Awaitable[None]],
    poll_timeout_ms: int = 200,
    client_options: ClientOptions | None = None,
) -> None:
    """Keep reading the stats topic into ``aggregator`` from ``start`` (offset per partition),
    so partitions taken over from another worker continue from its latest partials. Runs
    until cancelled. ``client_options`` are the security settings (see kafka_clients.py)."""
    from aiokafka import TopicPartition

    consumer = follower_consumer(bootstrap, client_options)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(start)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, start[tp.partition])
        while True:
            batches = await consumer.getmany(timeout_ms=poll_timeout_ms)
            for tp, records in batches.items():
                for record in records:
                    if record.value is None:
                        continue  # a tombstone forgets a key; nothing to rebuild from it
                    reason = aggregator.load(record.value)
                    if reason is not None:
                        await on_invalid(
                            InvalidStats(
                                tp.partition, record.offset, record.key, record.value, reason
                            )
                        )
    finally:
        await consumer.stop()


def register_stats(
    app: Any, settings: Settings, clock: Clock, dead_letter: DeadLetter
) -> StatsAggregator:
    """Rebuild the aggregator from the stats topic and add its follower to a faust app.

    Call it once from ``build_app``; the aggregator is returned (and kept as
    ``app.stats_aggregator``) for tests and tooling. The data plane feeds it with the calls it
    parsed (:meth:`StatsAggregator.count`) and publishes it in its transactions."""
    topics = settings.topics
    ensure_topics(
        settings.kafka,
        [s for s in topic_specs(topics) if s.name == topics.stats],
        client_config=settings.kafka_client_config(),
    )
    aggregator = StatsAggregator(clock)
    start, invalid = rebuild_stats(aggregator, settings)
    app.stats_aggregator = aggregator

    async def reject(bad: InvalidStats) -> None:
        await dead_letter(
            topic=topics.stats,
            partition=bad.partition,
            offset=bad.offset,
            key=bad.key,
            payload=bad.value,
            reason=bad.reason,
        )

    @app.task  # type: ignore[untyped-decorator]
    async def load_stats() -> None:
        for bad in invalid:
            await reject(bad)
        await follow_stats(
            aggregator,
            bootstrap=settings.kafka,
            topic=topics.stats,
            start=start,
            on_invalid=reject,
            client_options=settings.aiokafka_options(),
        )

    return aggregator
