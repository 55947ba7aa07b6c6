"""The agent hop at Kafka speed: calls read in batches, counted per agent, committed with one
Kafka transaction per cycle.

faust's per-message path costs ~150 us per event here, more than all our counting; so the
high-rate calls topic is read by a plain confluent-kafka consumer, in a thread of the faust
worker that hosts the rest (the second hop, policies, timers, web). Each cycle:

1. consume a batch of calls (and the allowance requests of the agents this worker owns);
2. parse each record (bad ones become dead letters), fold each agent's events into its state
   (the pure core: ``SpendFold``), settle the state (commands, alerts), forward the costs to
   the scopes topic, grant allowances;
3. write everything (the changed states to their changelog, forwards, commands, alerts, grants,
   dead letters, routing stats) and the input offsets in ONE transaction
   (KIP-447: ``send_offsets_to_transaction`` with the consumer's group metadata).

The in-memory states are replaced only once the transaction commits, so an aborted cycle
leaves them as the committed offsets stand; the consumer is rewound to those and the cycle is
read again. A new assignment is restored from the changelog before its first record counts.
Readers of these outputs use read_committed (librdkafka's default; the faust hop and the
stats follower are configured for it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from confluent_kafka import OFFSET_END, KafkaError, KafkaException, TopicPartition
from pydantic import ValidationError

from agentledger.config import Settings
from agentledger.schemas import (
    HOLDER_HEADER,
    Alert,
    AllowanceGrant,
    AllowanceRequest,
    ControlAction,
    dead_letter,
    sign_grant,
)
from agentledger.schemas.call_decode import CallRecord, decode_call
from agentledger.schemas.partitioning import crc32_partition
from agentledger.schemas.topics import ALLOWANCE_PARTITIONS

from .allowances import grant_allowance, revoke_over_allocated
from .batch_kafka import BatchConsumer, ForwardsProducer, TransactionalProducer
from .decide import Decider, Outgoing
from .dlq_rate import DlqRate
from .failpoints import Failpoints
from .fold import SpendFold
from .metrics import ProcessorMetrics, dlq_reason_class
from .policies import PolicyBook
from .recovery import encode_key, restore_states
from .scopes import MAX_COSTS_PER_RECORD, ScopeCost, encode_scope_costs, forwarded_costs
from .state import Delivery, SpendState
from .state_codec import encode_state
from .stats import StatsAggregator

__all__ = [
    "CYCLE_S",
    "DataPlane",
    "DataPlaneTopics",
    "holder_of",
    "parse_call",
]

log = logging.getLogger(__name__)

COMPONENT = "processor"
# A cycle closes this long after it starts reading (or at BATCH_MAX records): the wait adds at
# most this much to enforcement latency, and each cycle costs one transaction commit.
CYCLE_S = 0.05
BATCH_MAX = 20_000
REQUESTS_MAX = 5_000
SWEEP_EVERY_S = 1.0
FULL_SWEEP_EVERY_S = 60.0
STATS_EVERY_S = 1.0
COMMIT_TIMEOUT_S = 30.0
# A cycle that takes longer than this is reported by /health (the supervisor restarts the
# worker, which fences this one's transactional id and restores from the changelog): a
# commit can hang when the transaction coordinator's broker goes away (librdkafka #5511).
STUCK_AFTER_S = 90.0
TIMINGS_EVERY_S = 10.0
LAG_EVERY_S = 2.0


def holder_of(headers: Any) -> str | None:
    """The allowance holder named in a record's headers (a list of pairs or a mapping)."""
    if not headers:
        return None
    items = headers.items() if isinstance(headers, dict) else headers
    for name, value in items:
        if name == HOLDER_HEADER and value:
            try:
                return bytes(value).decode()
            except UnicodeDecodeError:
                return None
    return None


@dataclass(frozen=True)
class DataPlaneTopics:
    calls: str
    requests: str
    changelog: str
    scopes: str
    control: str
    alerts: str
    allowances: str
    dlq: str
    stats: str


@dataclass
class _Cycle:
    """What one cycle changes; applied to memory only once its transaction commits."""

    states: dict[str, SpendState] = field(default_factory=dict)
    out: list[tuple[str, bytes | None, bytes | None, int | None]] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    stats_keys: list[str] = field(default_factory=list)
    #: (scope, record) for the second hop: sent outside the transaction (see _commit).
    forwards: list[tuple[bytes, bytes]] = field(default_factory=list)
    counted: int = 0

    def __bool__(self) -> bool:
        return bool(self.states or self.out or self.forwards)


class DataPlane:
    """The batch loop; :meth:`run` is a thread's body. States are read by the web views from
    the faust thread: the dict holds immutable states and is replaced key by key."""

    def __init__(
        self,
        settings: Settings,
        *,
        topics: DataPlaneTopics,
        partitions: int,
        book: PolicyBook,
        clock: Callable[[], int],
        metrics: ProcessorMetrics,
        new_consumer: Callable[[], BatchConsumer],
        new_requests_consumer: Callable[[], BatchConsumer],
        new_restore_consumer: Callable[[], Any],
        new_producer: Callable[[], TransactionalProducer],
        new_forwards_producer: Callable[[], ForwardsProducer],
        stats: StatsAggregator | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        future_tolerance_ms: int,
        allowance_ttl_ms: int,
        allowance_partitions: int = ALLOWANCE_PARTITIONS,
        cycle_s: float = CYCLE_S,
        batch_max: int = BATCH_MAX,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.partitions = partitions
        self.book = book
        self.clock = clock
        self.metrics = metrics
        self.stats = stats
        self.on_alert = on_alert
        self.future_tolerance_ms = future_tolerance_ms
        self.allowance_ttl_ms = allowance_ttl_ms
        self.allowance_partitions = allowance_partitions
        self.cycle_s = cycle_s
        self.batch_max = batch_max
        self._new_consumer = new_consumer
        self._new_requests_consumer = new_requests_consumer
        self._new_restore_consumer = new_restore_consumer
        self._new_producer = new_producer
        self._forwards: ForwardsProducer = new_forwards_producer()
        self._forward_errors: list[str] = []
        self.failpoints = Failpoints()
        self._key = settings.control_key_bytes()
        self.decider = Decider(
            book,
            self._key,
            control_topic=topics.control,
            alerts_topic=topics.alerts,
            metrics=metrics,
            clock=clock,
        )
        self.dlq_rate = DlqRate.from_settings(settings)
        #: agent id -> its committed state, for the agents of the partitions this worker owns.
        self.states: dict[str, SpendState] = {}
        self.owned: set[int] = set()
        self._standing: set[str] = set()
        self._stop = threading.Event()
        self._consumer: BatchConsumer | None = None
        self._requests: BatchConsumer | None = None
        self._producer: TransactionalProducer | None = None
        # The offsets the last committed transaction stood for: where an abort rewinds to.
        self._committed: dict[tuple[str, int], int] = {}
        self._swept_version: int | None = None
        self._full_sweep_at = 0.0
        self._sweep_at = 0.0
        self._stats_at = 0.0
        #: monotonic time the current cycle began (None between cycles), for /health.
        self.cycle_started: float | None = None
        self.cycles = 0
        self.timings = dict.fromkeys(("consume", "count", "forwards", "commit", "records"), 0.0)
        self._noted_at = time.monotonic()
        self._noted_cycles = 0
        self._lag_at = 0.0
        self.restoring = False
        #: True once the group has given this worker its first assignment (maybe empty) and
        #: the states of it are restored: before that, calls sent are not counted yet.
        self.joined = False
        self.error: str | None = None
        self.running = False

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def stuck(self) -> bool:
        started = self.cycle_started
        return started is not None and time.monotonic() - started > STUCK_AFTER_S

    def run(self) -> None:
        """Consume, count and commit until :meth:`stop`. A fatal error is kept in ``error``
        (``/health`` reports it) and ends the loop: the supervisor restarts the worker."""
        self.running = True
        try:
            self._producer = self._start_producer()
            self._requests = self._new_requests_consumer()
            consumer = self._consumer = self._new_consumer()
            consumer.subscribe(
                [self.topics.calls],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            while not self._stop.is_set():
                self._cycle()
        except Exception as exc:
            # The thread's last word: kept for /health, which turns 503, and logged whole.
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("data plane stopped")
            raise
        finally:
            self.running = False
            self._close()

    def _start_producer(self) -> TransactionalProducer:
        producer = self._new_producer()
        # Fences any earlier producer with this transactional id and aborts its open
        # transaction, so what it left half-written is never read.
        producer.init_transactions(COMMIT_TIMEOUT_S)
        return producer

    def _close(self) -> None:
        for consumer in (self._consumer, self._requests):
            if consumer is not None:
                try:
                    consumer.close()
                except (KafkaException, RuntimeError) as exc:
                    log.info("closing a data plane consumer: %s", exc)
        self._consumer = self._requests = None

    # -- rebalances (called inside consume, between transactions) ------------------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        mine = sorted(tp.partition for tp in partitions if tp.topic == self.topics.calls)
        if not mine:
            self.joined = True
            return
        self.restoring = True
        try:
            restored = restore_states(
                self._new_restore_consumer, self.topics.changelog, mine, on_invalid=self._bad_state
            )
        finally:
            self.restoring = False
        for states in restored.values():
            self.states.update(states)
            self._standing.update(k for k, s in states.items() if _stands(s))
        self.owned.update(mine)
        self._swept_version = None  # a full sweep: the restored states may need decisions
        requests = [TopicPartition(self.topics.requests, p) for p in mine]
        committed = consumer.committed(requests, timeout=COMMIT_TIMEOUT_S)
        starts = []
        for tp in committed:
            # A request never answered by this group is older than any waiting caller (they
            # ask again after a second): start from the end rather than answer stale ones.
            offset = tp.offset if tp.offset >= 0 else OFFSET_END
            starts.append(TopicPartition(tp.topic, tp.partition, offset))
            if tp.offset >= 0:
                self._committed[(tp.topic, tp.partition)] = tp.offset
        for tp in consumer.committed(
            [TopicPartition(self.topics.calls, p) for p in mine], timeout=COMMIT_TIMEOUT_S
        ):
            if tp.offset >= 0:
                self._committed[(tp.topic, tp.partition)] = tp.offset
        assert self._requests is not None
        self._requests.incremental_assign(starts)
        self.joined = True
        log.info("data plane assigned calls partitions %s", mine)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._drop(sorted(tp.partition for tp in partitions if tp.topic == self.topics.calls))

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        log.warning("data plane lost partitions %s (session expired)", partitions)
        self._drop(sorted(tp.partition for tp in partitions if tp.topic == self.topics.calls))

    def _drop(self, gone: list[int]) -> None:
        if not gone:
            return
        dropped = set(gone)
        self.owned -= dropped
        for agent_id in [a for a, s in self.states.items() if s.partition in dropped]:
            del self.states[agent_id]
            self._standing.discard(agent_id)
        for p in gone:
            self._committed.pop((self.topics.calls, p), None)
            self._committed.pop((self.topics.requests, p), None)
        if self._requests is not None:
            self._requests.incremental_unassign(
                [TopicPartition(self.topics.requests, p) for p in gone]
            )
        log.info("data plane gave up calls partitions %s", gone)

    def _bad_state(self, partition: int, offset: int, reason: str) -> None:
        log.error(
            "changelog %s:%d: %s; that agent starts empty", self.topics.changelog, partition, reason
        )

    # -- the cycle ------------------------------------------------------------------------

    def _cycle(self) -> None:
        consumer = self._consumer
        requests = self._requests
        assert consumer is not None and requests is not None
        began = time.monotonic()
        messages = consumer.consume(num_messages=self.batch_max, timeout=self.cycle_s)
        self.cycle_started = time.monotonic()
        self.timings["consume"] += self.cycle_started - began
        self.timings["records"] += len(messages)
        try:
            asked = (
                requests.consume(num_messages=REQUESTS_MAX, timeout=0)
                if self.owned and self.book.ready.is_set()
                else []
            )
            cycle = _Cycle()
            positions: dict[tuple[str, int], int] = {}
            self._count(cycle, _good(messages, positions), self.clock())
            self._grant(cycle, _good(asked, positions), self.clock())
            self._sweep_if_due(cycle)
            self._stats_if_due(cycle)
            counted = time.monotonic()
            self.timings["count"] += counted - self.cycle_started
            if cycle or positions:
                self._commit(cycle, positions)
                self.timings["commit"] += time.monotonic() - counted
        finally:
            self.cycle_started = None
        self.cycles += 1
        if began - self._noted_at >= TIMINGS_EVERY_S:
            self._note_timings(began)
        if began - self._lag_at >= LAG_EVERY_S:
            self._lag_at = began
            self._observe_lag()

    def _observe_lag(self) -> None:
        """Lag per owned calls partition for /metrics, from the end offsets librdkafka caches
        from its fetches (no request to the broker)."""
        consumer = self._consumer
        assert consumer is not None
        tps = [TopicPartition(self.topics.calls, p) for p in sorted(self.owned)]
        lags: dict[tuple[str, int], int] = {}
        for tp in consumer.position(tps) if tps else []:
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            where = (tp.topic, tp.partition)
            position = tp.offset if tp.offset >= 0 else self._committed.get(where)
            if position is None and low >= 0:
                # Nothing read or committed yet: the group starts at the earliest offset.
                position = low
            if high >= 0 and position is not None:
                lags[where] = max(high - position, 0)
        self.metrics.observe_plane_lag(lags)

    def _note_timings(self, now: float) -> None:
        """Where the cycles' time went since the last note: the first thing to read when the
        data plane falls behind (waiting in consume means it keeps up)."""
        spent = {k: round(v, 2) for k, v in self.timings.items()}
        log.info(
            "data plane, last %.0f s: %d cycles, %d records; seconds consuming %s, counting %s, "
            "forwarding %s, committing %s",
            now - self._noted_at,
            self.cycles - self._noted_cycles,
            int(spent["records"]),
            spent["consume"],
            spent["count"],
            spent["forwards"],
            spent["commit"],
        )
        self._noted_at, self._noted_cycles = now, self.cycles
        self.timings = dict.fromkeys(self.timings, 0.0)

    def _count(self, cycle: _Cycle, messages: list[Any], now: int) -> None:
        stats = self.stats
        by_agent: dict[str, list[tuple[CallRecord, int, int, str | None]]] = {}
        for message in messages:
            value = message.value()
            event = parse_call(value, now, self.future_tolerance_ms)
            partition, offset = message.partition(), message.offset()
            if isinstance(event, str):
                self._dead_letter(
                    cycle, self.topics.calls, partition, offset, message.key(), value, event
                )
                continue
            if stats is not None:
                stats.count(event, partition, offset)
            by_agent.setdefault(event.agent_id, []).append(
                (event, partition, offset, holder_of(message.headers()))
            )
        forwards: dict[str, list[ScopeCost]] = {}
        plan = self.book.plan
        for agent_id, items in by_agent.items():
            state = self.states.get(agent_id) or SpendState()
            fold = SpendFold(state, now_ms=now, plan=plan)
            for event, partition, offset, holder in items:
                event_id = event.event_id.hex
                delivery = fold.add_event(event, event_id, partition, offset, holder)
                if delivery is Delivery.DUPLICATE:
                    log.info("event %s delivered again at %s; not counted", event.event_id, offset)
                    continue
                if delivery is Delivery.REPLAY:
                    # Counted under committed offsets already: its forwards were committed
                    # with them (one transaction), so they are not sent again.
                    continue
                cycle.counted += 1
                for cost in forwarded_costs(event, partition, offset, event_id, holder):
                    forwards.setdefault(cost.scope, []).append(cost)
            counted = fold.result()
            if counted is not state:
                counted, out = self.decider.settle(
                    f"agent:{agent_id}", counted, items[-1][0].event_time_ms
                )
                self._emit(cycle, out)
                cycle.states[agent_id] = counted
        for scope, costs in forwards.items():
            # The scope's state skips a cost at or below the last applied offset of its source
            # partition (replay): two agents of one scope on one calls partition would
            # otherwise interleave and the second's lower offsets look like replays.
            costs.sort(key=lambda c: (c.partition, c.offset))
            for start in range(0, len(costs), MAX_COSTS_PER_RECORD):
                chunk = costs[start : start + MAX_COSTS_PER_RECORD]
                cycle.forwards.append((scope.encode(), encode_scope_costs(scope, chunk)))
        self.metrics.batch_done(self.topics.calls, len(messages), now)

    def _state(self, cycle: _Cycle, agent_id: str) -> SpendState | None:
        return cycle.states.get(agent_id) or self.states.get(agent_id)

    # -- allowances -----------------------------------------------------------------------

    def _grant(self, cycle: _Cycle, messages: list[Any], now: int) -> None:
        """Answer the agents' allowance requests from their states (the faust hop answers
        pools, workflows and task types, and dead-letters malformed requests)."""
        for message in messages:
            value = message.value()
            if not value:
                continue
            try:
                request = AllowanceRequest.model_validate_json(value)
            except ValidationError:
                continue  # the faust hop dead-letters it
            if not request.scope.startswith("agent:"):
                continue
            if request.reply_partition >= self.allowance_partitions:
                continue  # the faust hop dead-letters it
            agent_id = request.scope.removeprefix("agent:")
            if crc32_partition(agent_id.encode(), self.partitions) != message.partition():
                continue  # the faust hop dead-letters it: wrong partition
            before = self._state(cycle, agent_id) or SpendState()
            state, answer = grant_allowance(
                before,
                request,
                self.decider.governing(request.scope),
                now,
                ttl_ms=self.allowance_ttl_ms,
            )
            if state is not before:
                if state.partition is None:
                    state = replace(state, partition=message.partition())
                cycle.states[agent_id] = state
            self._answer(cycle, request.reply_partition, answer)

    def _answer(self, cycle: _Cycle, partition: int, answer: AllowanceGrant) -> None:
        signed = sign_grant(answer, self._key)
        cycle.out.append(
            (
                self.topics.allowances,
                answer.holder.encode(),
                signed.model_dump_json().encode(),
                partition,
            )
        )

    # -- timers ---------------------------------------------------------------------------

    def _sweep_if_due(self, cycle: _Cycle) -> None:
        """Re-decide agents: period ends (RESUME), policy changes (and allowances that no
        longer fit), agents whose events came before the policies were loaded."""
        if not self.book.ready.is_set():
            return
        now = time.monotonic()
        changed = self.book.version != self._swept_version
        if not changed and now - self._sweep_at < SWEEP_EVERY_S:
            return
        full = changed or now - self._full_sweep_at >= FULL_SWEEP_EVERY_S
        self._sweep_at = now
        keys = list(self.states) if full else sorted(self._standing)
        now_ms = self.clock()
        for agent_id in keys:
            state = self._state(cycle, agent_id)
            if state is None:
                continue
            scope = f"agent:{agent_id}"
            settled, out = self.decider.settle(scope, state)
            self._emit(cycle, out)
            if settled.leases:
                revoked, answers = revoke_over_allocated(
                    settled,
                    self.decider.governing(scope),
                    scope,
                    now_ms,
                    ttl_ms=self.allowance_ttl_ms,
                )
                for partition, answer in answers:
                    log.info("allowances of %s taken back from %s", scope, answer.holder)
                    self._answer(cycle, partition, answer)
                settled = revoked
            if settled is not state:
                cycle.states[agent_id] = settled
        if full:
            self._swept_version = self.book.version
            self._full_sweep_at = now

    def _stats_if_due(self, cycle: _Cycle) -> None:
        stats = self.stats
        now = time.monotonic()
        if stats is None or now - self._stats_at < STATS_EVERY_S:
            return
        self._stats_at = now
        for record in stats.take_dirty():
            cycle.stats_keys.append(record.key)
            cycle.out.append(
                (self.topics.stats, record.key.encode(), record.model_dump_json().encode(), None)
            )

    # -- output ---------------------------------------------------------------------------

    def _emit(self, cycle: _Cycle, out: Sequence[Outgoing]) -> None:
        for item in out:
            cycle.out.append((item.topic, item.key, item.value, None))
            if item.alert is not None:
                cycle.alerts.append(item.alert)

    def _dead_letter(
        self,
        cycle: _Cycle,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        payload: bytes | None,
        reason: str,
    ) -> None:
        record = dead_letter(
            topic=topic,
            partition=partition,
            offset=offset,
            reason=reason,
            component=COMPONENT,
            detected_at_ms=self.clock(),
            key=key,
            payload=payload,
        )
        self.metrics.dlq.labels(dlq_reason_class(reason)).inc()
        cycle.out.append((self.topics.dlq, record.key, record.value, None))
        too_many = self.dlq_rate.record(self.clock(), reason)
        if too_many is not None:
            self._emit(cycle, [self.decider.alert(too_many)])

    def _commit(self, cycle: _Cycle, positions: dict[tuple[str, int], int]) -> None:
        producer = self._producer
        consumer = self._consumer
        assert producer is not None and consumer is not None
        if cycle.forwards and not self._send_forwards(cycle.forwards):
            # Not all acknowledged: the transaction is not committed, the cycle is read again
            # and forwards again (the scopes' states skip the costs they counted already).
            if self.stats is not None and cycle.stats_keys:
                self.stats.mark_dirty(cycle.stats_keys)
            self._rewind()
            return
        try:
            producer.begin_transaction()
            for agent_id, state in cycle.states.items():
                assert state.partition is not None
                producer.produce(
                    self.topics.changelog,
                    encode_state(state),
                    encode_key(agent_id),
                    partition=state.partition,
                )
            for topic, key, value, partition in cycle.out:
                self._produce(producer, topic, key, value, partition)
            if positions:
                producer.send_offsets_to_transaction(
                    [TopicPartition(t, p, o) for (t, p), o in positions.items()],
                    consumer.consumer_group_metadata(),
                    COMMIT_TIMEOUT_S,
                )
            if self.failpoints.armed:
                # The records on the broker, the transaction open: the crash under test.
                producer.flush(COMMIT_TIMEOUT_S)
                self.failpoints.hit("before_commit")
            producer.commit_transaction(COMMIT_TIMEOUT_S)
        except KafkaException as exc:
            self._failed(exc, cycle)
            return
        self.states.update(cycle.states)
        for agent_id, state in cycle.states.items():
            if _stands(state):
                self._standing.add(agent_id)
            else:
                self._standing.discard(agent_id)
        self._committed.update(positions)
        if self.on_alert is not None:
            for alert in cycle.alerts:
                self.on_alert(alert)

    def _send_forwards(self, forwards: list[tuple[bytes, bytes]]) -> bool:
        """Send the second hop's records and wait until Kafka has them all; False if any
        failed. Outside the transaction on purpose: a transaction leaves a marker at the next
        offset, and faust's consumer of the scopes topic tells records it dropped around a
        rebalance by gaps in the offsets (ordering.py). The scope states skip a cost at or
        below the last calls offset they applied, so the forwards of an aborted cycle, sent
        again when it is read again, are not counted twice."""
        errors = self._forward_errors
        errors.clear()

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                errors.append(str(error))

        producer = self._forwards
        for key, value in forwards:
            while True:
                try:
                    producer.produce(self.topics.scopes, value, key, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.05)
        began = time.monotonic()
        left = producer.flush(COMMIT_TIMEOUT_S)
        self.timings["forwards"] += time.monotonic() - began
        if left or errors:
            log.warning(
                "forwards to %s not acknowledged (%d left, errors %s); the cycle is read again",
                self.topics.scopes,
                left,
                errors[:3],
            )
            return False
        return True

    def _produce(
        self,
        producer: TransactionalProducer,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
    ) -> None:
        while True:
            try:
                if partition is None:
                    producer.produce(topic, value, key)
                else:
                    producer.produce(topic, value, key, partition=partition)
                return
            except BufferError:
                # librdkafka's queue is full: let it send, then go on.
                producer.poll(0.05)

    def _failed(self, exc: KafkaException, cycle: _Cycle) -> None:
        """A transaction that did not commit: nothing of it is visible (read_committed), the
        states in memory are the committed ones; rewind the input to where they stand."""
        error: KafkaError = exc.args[0]
        producer = self._producer
        assert producer is not None
        if self.stats is not None and cycle.stats_keys:
            self.stats.mark_dirty(cycle.stats_keys)
        if error.fatal():
            log.error("transactional producer failed for good (%s); rebuilding it", error)
            self._producer = self._start_producer()
            # Another producer with our id may have written meanwhile: restore from the
            # changelog what is ours now.
            owned = sorted(self.owned)
            self.states.clear()
            self._standing.clear()
            for states in restore_states(
                self._new_restore_consumer, self.topics.changelog, owned, on_invalid=self._bad_state
            ).values():
                self.states.update(states)
                self._standing.update(k for k, s in states.items() if _stands(s))
        else:
            log.warning("transaction aborted (%s); the cycle is read again", error)
            try:
                producer.abort_transaction(COMMIT_TIMEOUT_S)
            except KafkaException as again:
                log.error("abort failed (%s); rebuilding the producer", again)
                self._producer = self._start_producer()
        self._rewind()

    def _rewind(self) -> None:
        consumer, requests = self._consumer, self._requests
        assert consumer is not None and requests is not None
        calls = [TopicPartition(self.topics.calls, p) for p in sorted(self.owned)]
        committed = {
            (tp.topic, tp.partition): tp.offset
            for tp in consumer.committed(calls, timeout=COMMIT_TIMEOUT_S)
        }
        for tp in calls:
            offset = committed.get((tp.topic, tp.partition), -1)
            if offset < 0:
                offset = self._committed.get((tp.topic, tp.partition), -1)
            if offset >= 0:
                consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        for p in sorted(self.owned):
            offset = self._committed.get((self.topics.requests, p))
            if offset is not None:
                requests.seek(TopicPartition(self.topics.requests, p, offset))

    # -- views ----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "joined": self.joined,
            "restoring": self.restoring,
            "stuck": self.stuck(),
            "error": self.error,
            "cycles": self.cycles,
            "partitions": sorted(self.owned),
            "agents": len(self.states),
        }


def parse_call(value: bytes | None, now: int, future_tolerance_ms: int) -> CallRecord | str:
    """The event to count, or why it goes to the dlq instead (pydantic's reason: the msgspec
    decode falls back to it for anything it does not accept for certain)."""
    if not value:
        return "empty value; expected a CallEvent JSON object"
    try:
        event = decode_call(value)
    except ValidationError as exc:
        return f"not a valid CallEvent: {exc}"
    if event.event_time_ms > now + future_tolerance_ms:
        return (
            f"event_time_ms {event.event_time_ms} is {event.event_time_ms - now} ms "
            f"in the future; at most {future_tolerance_ms} ms is tolerated"
        )
    return event


def _stands(state: SpendState) -> bool:
    command = state.last_command
    return command is not None and command.action is not ControlAction.RESUME


def _good(messages: list[Any], positions: dict[tuple[str, int], int]) -> list[Any]:
    """The records of ``messages`` (errors logged) and, per partition, the offset after the
    last one: what the transaction commits."""
    kept = []
    for message in messages:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("data plane consume: %s", error)
            continue
        positions[(message.topic(), message.partition())] = message.offset() + 1
        kept.append(message)
    return kept
