"""Both hops at Kafka speed: calls read in batches, counted per agent, summed per pool,
workflow and task type, and committed with one Kafka transaction per cycle.

faust's per-message path costs ~150 us per event here, more than all our counting; so the
calls topic and the second hop's deltas are read by plain confluent-kafka consumers, in a
thread of the faust worker that hosts the low-rate rest (policies, webhooks, web views).
Each cycle:

1. consume a batch of calls, and for the partitions this worker owns, the second hop's deltas
   and the allowance requests (partition p of both is assigned with calls partition p);
2. fold the deltas into the scopes' states; parse each call (bad ones become dead letters),
   fold each agent's events into its state (the pure core: ``SpendFold``) and sum them per
   scope into this cycle's deltas (deltas.py); settle the changed states (commands, alerts);
   answer the allowance requests;
3. write everything (the changed states to their changelogs, the deltas, commands, alerts,
   grants, dead letters, routing stats) and the input offsets in ONE transaction (KIP-447:
   ``send_offsets_to_transaction`` with the consumer's group metadata).

The in-memory states are replaced only once the transaction commits, so an aborted cycle
leaves them as the committed offsets stand; the consumers are rewound to those and the cycle
is read again. A new assignment is restored from the changelogs before its first record
counts. Readers of these outputs use read_committed (librdkafka's default; the stats follower
is configured for it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, KafkaException, TopicPartition
from pydantic import ValidationError

from agentledger.config import Settings
from agentledger.schemas import (
    HOLDER_HEADER,
    AllowanceGrant,
    AllowanceRequest,
    ControlAction,
    dead_letter,
    sign_grant,
)
from agentledger.schemas.call_decode import CallRecord, decode_call, decode_calls
from agentledger.schemas.partitioning import state_partition
from agentledger.schemas.topics import ALLOWANCE_PARTITIONS

from .allowances import grant_allowance, revoke_over_allocated
from .batch_kafka import BatchConsumer, CommandProducer, TransactionalProducer
from .decide import Decider, Outgoing
from .deltas import DeltaError, ScopeDelta, decode_delta, encode_delta, period_keys
from .dlq_rate import DlqRate
from .failpoints import Failpoints
from .fold import SpendFold
from .metrics import ProcessorMetrics, dlq_reason_class
from .policies import PolicyBook
from .recovery import RestoreStalled, encode_key, restore_states
from .state import Delivery, SpendState
from .state_codec import encode_state
from .stats import StatsAggregator
from .tracking import Activity

__all__ = [
    "CYCLE_S",
    "REPLACE_AFTER_S",
    "DataPlane",
    "DataPlaneTopics",
    "holder_of",
    "parse_call",
    "unbudgeted_grant",
]

_NO_SCOPES = (None, None, None)
#: The scope kinds with a spend state in the second hop (subtrees have none: no budget).
SCOPE_KINDS = frozenset({"pool", "workflow", "task_type"})

log = logging.getLogger(__name__)

COMPONENT = "processor"
# An idle data plane waits this long for a first record before a cycle of its timers (sweeps,
# stats) runs anyway. A cycle starts at the first record, not at the end of a fixed wait:
# the time a crossing waits to be counted is enforcement latency.
CYCLE_S = 0.05
# ...but not sooner than this after the last cycle began: each cycle costs one transaction
# commit (markers on every partition it wrote), so a trickle of events must not cost one each.
MIN_CYCLE_S = 0.02
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
# A cycle this old is given up by the worker's watchdog (app.py): a new data plane takes the
# transactional id and the group membership over, and restores from what was committed.
# Longer than a commit retrying through a broker restart takes (message timeout 15 s).
REPLACE_AFTER_S = 45.0
TIMINGS_EVERY_S = 10.0
SLOW_CYCLE_S = 0.25
LAG_EVERY_S = 2.0
# A call that needs the broker (a producer's init, committed offsets, a restore) is retried
# while Kafka is away, backing off from the first to the last of these, in seconds.
RETRY_BACKOFF_S = (0.5, 5.0)
# A request from a holder that had read policies this worker has not applied yet waits for
# them (a lowered limit must not be granted under the old one), at most this long: then it is
# answered under what is known (a recreated policies topic would otherwise hold it forever).
POLICIES_WAIT_S = 3.0
Result = TypeVar("Result")


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
    scope_changelog: str
    control: str
    alerts: str
    allowances: str
    dlq: str
    stats: str


@dataclass
class _Cycle:
    """What one cycle changes; applied to memory only once its transaction commits."""

    states: dict[str, SpendState] = field(default_factory=dict)
    #: scope ("pool:p") -> its new state, the second hop's.
    scope_states: dict[str, SpendState] = field(default_factory=dict)
    out: list[tuple[str, bytes | None, bytes | None, int | None]] = field(default_factory=list)
    stats_keys: list[str] = field(default_factory=list)
    #: scope -> what this cycle counted for it, written to the scopes topic in the transaction.
    deltas: dict[str, ScopeDelta] = field(default_factory=dict)
    counted: int = 0

    def __bool__(self) -> bool:
        return bool(self.states or self.scope_states or self.out or self.deltas)


@dataclass
class _InFlight:
    """A cycle whose transaction is committing on the committer thread while the next one
    is counted."""

    cycle: _Cycle
    positions: dict[tuple[str, int], int]
    done: Future[None]


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
        new_command_producer: Callable[[], CommandProducer] | None = None,
        stats: StatsAggregator | None = None,
        future_tolerance_ms: int,
        allowance_ttl_ms: int,
        allowance_partitions: int = ALLOWANCE_PARTITIONS,
        cycle_s: float = CYCLE_S,
        min_cycle_s: float = MIN_CYCLE_S,
        batch_max: int = BATCH_MAX,
        overlap_commits: bool = True,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.partitions = partitions
        self.book = book
        self.clock = clock
        self.metrics = metrics
        self.stats = stats
        self.future_tolerance_ms = future_tolerance_ms
        self.allowance_ttl_ms = allowance_ttl_ms
        self.allowance_partitions = allowance_partitions
        self.cycle_s = cycle_s
        self.min_cycle_s = min_cycle_s
        self.batch_max = batch_max
        self.overlap_commits = overlap_commits
        self._new_consumer = new_consumer
        self._new_requests_consumer = new_requests_consumer
        self._new_restore_consumer = new_restore_consumer
        self._new_producer = new_producer
        self._new_command_producer = new_command_producer
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
        #: scope -> its committed state (pools, workflows, task types of the owned partitions).
        self.scope_states: dict[str, SpendState] = {}
        self.owned: set[int] = set()
        # Keys with a standing command (re-decided every sweep): agent ids and scopes.
        self._standing: set[str] = set()
        self._standing_scopes: set[str] = set()
        self._stop = threading.Event()
        self._consumer: BatchConsumer | None = None
        # The owned partitions' allowance requests and second-hop deltas (assigned by hand:
        # partition p of both follows calls partition p, see _on_assign).
        self._side: BatchConsumer | None = None
        self._producer: TransactionalProducer | None = None
        # Control commands' fast copy, sent as they are decided (see _emit).
        self._commands: CommandProducer | None = None
        self._last_began = 0.0
        # The offsets the last committed transaction stood for: where an abort rewinds to.
        self._committed: dict[tuple[str, int], int] = {}
        self._swept_version: int | None = None
        self._full_sweep_at = 0.0
        self._sweep_at = 0.0
        self._stats_at = 0.0
        #: monotonic time the current cycle began (None between cycles), for /health.
        self.cycle_started: float | None = None
        self.cycles = 0
        self.timings = dict.fromkeys(("consume", "count", "commit", "records"), 0.0)
        self._noted_at = time.monotonic()
        self._noted_cycles = 0
        self._lag_at = 0.0
        self.restoring = False
        #: True once the group has given this worker its first assignment (maybe empty) and
        #: the states of it are restored: before that, calls sent are not counted yet.
        self.joined = False
        self.error: str | None = None
        self.running = False
        #: Calls consumers replaced after a fatal error (see _replace_consumer).
        self.consumers_replaced = 0
        # Requests waiting for the policies their holder had seen: (since, record, request).
        self._waiting: list[tuple[float, Any, AllowanceRequest]] = []
        # Requests partition -> the offset after the last request read from it.
        self._requests_read: dict[int, int] = {}
        self.requests_waited = 0
        # The transaction committing while the next cycle counts (overlap_commits), and the
        # states it writes: the next cycle counts on top of them.
        self._in_flight: _InFlight | None = None
        self._pending_states: dict[str, SpendState] = {}
        self._pending_scope_states: dict[str, SpendState] = {}
        # An in-flight commit that failed while a rebalance callback waited for it: handled
        # once consume returns (rewinding inside the callback is not safe).
        self._void: tuple[KafkaException, _Cycle] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def stuck(self, after_s: float = STUCK_AFTER_S) -> bool:
        """Whether the current cycle has lasted longer than ``after_s``."""
        started = self.cycle_started
        return started is not None and time.monotonic() - started > after_s

    def run(self) -> None:
        """Consume, count and commit until :meth:`stop`. A fatal error is kept in ``error``
        (``/health`` reports it) and ends the loop: the supervisor restarts the worker."""
        self.running = True
        try:
            self._producer = self._start_producer()
            if self._new_command_producer is not None:
                self._commands = self._new_command_producer()
            self._side = self._new_requests_consumer()
            self._consumer = self._subscribed()
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

    def _subscribed(self) -> BatchConsumer:
        consumer = self._new_consumer()
        consumer.subscribe(
            [self.topics.calls],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        return consumer

    def _replace_consumer(self, error: KafkaError) -> None:
        """The calls consumer failed for good: a static member fenced by another with its
        group.instance.id, which a restarted broker reports to the very member that rejoined
        after its session timed out (seen in the control-topic fault case: the worker stayed
        up holding no partitions). Its partitions are no longer ours; a new consumer joins
        (fencing any twin in turn) and restores what it is given."""
        log.error("data plane consumer failed for good (%s); replacing it", error)
        self.consumers_replaced += 1
        self._drop(sorted(self.owned))
        old, self._consumer = self._consumer, None
        if old is not None:
            try:
                old.close()
            except (KafkaException, RuntimeError) as exc:
                log.info("closing the failed consumer: %s", exc)
        self.joined = False
        self._consumer = self._subscribed()

    def _start_producer(self) -> TransactionalProducer:
        producer = self._new_producer()

        def init() -> TransactionalProducer:
            nonlocal producer
            try:
                # Fences any earlier producer with this transactional id and aborts its open
                # transaction, so what it left half-written is never read.
                producer.init_transactions(COMMIT_TIMEOUT_S)
            except KafkaException as exc:
                if exc.args[0].fatal():
                    producer = self._new_producer()  # a fatal error ends an instance
                raise
            return producer

        # With the broker away (or a previous epoch's abort still ending: CONCURRENT_
        # TRANSACTIONS), init fails; librdkafka lets it be called again.
        return self._retrying("starting the transactional producer", init, fatal_too=True)

    def _retrying(
        self, what: str, attempt: Callable[[], Result], *, fatal_too: bool = False
    ) -> Result:
        """``attempt()``, again after each Kafka error that is not fatal (the broker or a
        coordinator away, a restore held up), with backoff, for as long as the worker runs:
        a broker restart is ridden out rather than ending the data plane. Waiting inside a
        cycle counts towards STUCK_AFTER_S (/health turns 503 if Kafka never comes back);
        inside a rebalance /health shows ``restoring``."""
        delay, longest = RETRY_BACKOFF_S
        while True:
            try:
                return attempt()
            except (KafkaException, RestoreStalled) as exc:
                fatal = isinstance(exc, KafkaException) and exc.args[0].fatal()
                if (fatal and not fatal_too) or self._stop.is_set():
                    raise
                log.warning("%s failed (%s); trying again in %.1f s", what, exc, delay)
            self._stop.wait(delay)
            delay = min(delay * 2, longest)

    def _close(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            try:
                in_flight.done.result(COMMIT_TIMEOUT_S)
            except (KafkaException, TimeoutError) as exc:
                # Not committed: the next owner reads the cycle again.
                log.info("the last transaction of a stopping data plane: %s", exc)
        if self._commands is not None:
            # Undelivered fast copies are not lost: each has its copy in a transaction.
            self._commands.flush(1.0)
            self._commands = None
        for consumer in (self._consumer, self._side):
            if consumer is not None:
                try:
                    consumer.close()
                except (KafkaException, RuntimeError) as exc:
                    log.info("closing a data plane consumer: %s", exc)
        self._consumer = self._side = None

    # -- rebalances (called inside consume, between transactions) ------------------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._settle_in_callback()
        mine = sorted(tp.partition for tp in partitions if tp.topic == self.topics.calls)
        if not mine:
            self.joined = True
            return
        self.restoring = True
        try:
            self._retrying(f"restoring partitions {mine}", lambda: self._restore(mine))
        finally:
            self.restoring = False
        self.owned.update(mine)
        self._swept_version = None  # a full sweep: the restored states may need decisions
        side = [
            TopicPartition(t, p) for t in (self.topics.requests, self.topics.scopes) for p in mine
        ]
        starts = []
        for tp in self._committed_offsets(consumer, side):
            if tp.offset >= 0:
                offset = tp.offset
                self._committed[(tp.topic, tp.partition)] = tp.offset
            elif tp.topic == self.topics.requests:
                # A request never answered by this group is older than any waiting caller
                # (they ask again after a second): start from the end, not answer stale ones.
                offset = OFFSET_END
            else:
                # Deltas never applied by this group are spend: all of them count.
                offset = OFFSET_BEGINNING
            starts.append(TopicPartition(tp.topic, tp.partition, offset))
        for tp in self._committed_offsets(
            consumer, [TopicPartition(self.topics.calls, p) for p in mine]
        ):
            if tp.offset >= 0:
                self._committed[(tp.topic, tp.partition)] = tp.offset
        assert self._side is not None
        self._side.incremental_assign(starts)
        self.joined = True
        log.info("data plane assigned calls partitions %s", mine)

    def _committed_offsets(self, consumer: Any, tps: list[TopicPartition]) -> list[TopicPartition]:
        # Inside the rebalance callback: an error escaping it would end the data plane.
        return self._retrying(
            "reading the committed offsets",
            lambda: list(consumer.committed(tps, timeout=COMMIT_TIMEOUT_S)),
        )

    def _restore(self, partitions: list[int]) -> None:
        """Both hops' states of ``partitions`` from their changelogs (all of them: a retry
        after a failure starts over)."""
        for topic, into, standing in (
            (self.topics.changelog, self.states, self._standing),
            (self.topics.scope_changelog, self.scope_states, self._standing_scopes),
        ):
            restored = restore_states(
                self._new_restore_consumer, topic, partitions, on_invalid=self._bad_state
            )
            for states in restored.values():
                into.update(states)
                standing.update(k for k, st in states.items() if _stands(st))

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # What the transaction in flight counted for these partitions must be committed
        # (or known not to be) before their next owner reads the committed offsets.
        self._settle_in_callback()
        self._drop(sorted(tp.partition for tp in partitions if tp.topic == self.topics.calls))

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        log.warning("data plane lost partitions %s (session expired)", partitions)
        self._settle_in_callback()
        self._drop(sorted(tp.partition for tp in partitions if tp.topic == self.topics.calls))

    def _drop(self, gone: list[int]) -> None:
        if not gone:
            return
        dropped = set(gone)
        self.owned -= dropped
        self._waiting = [w for w in self._waiting if w[1].partition() not in dropped]
        for p in gone:
            self._requests_read.pop(p, None)
        for states, standing in (
            (self.states, self._standing),
            (self.scope_states, self._standing_scopes),
        ):
            for key in [k for k, st in states.items() if st.partition in dropped]:
                del states[key]
                standing.discard(key)
        side_topics = (self.topics.requests, self.topics.scopes)
        for p in gone:
            for topic in (self.topics.calls, *side_topics):
                self._committed.pop((topic, p), None)
        if self._side is not None:
            self._side.incremental_unassign(
                [TopicPartition(t, p) for t in side_topics for p in gone]
            )
        log.info("data plane gave up calls partitions %s", gone)

    def _bad_state(self, partition: int, offset: int, reason: str) -> None:
        log.error(
            "changelog %s:%d: %s; that agent starts empty", self.topics.changelog, partition, reason
        )

    # -- the cycle ------------------------------------------------------------------------

    def _cycle(self) -> None:
        consumer = self._consumer
        side = self._side
        assert consumer is not None and side is not None
        began = time.monotonic()
        messages = self._read(consumer, began)
        self.cycle_started = self._last_began = time.monotonic()
        self.timings["consume"] += self.cycle_started - began
        self.timings["records"] += len(messages)
        try:
            if self._void is not None:
                # The transaction in flight failed during a rebalance in consume: rewound
                # now, these records (read on top of it) are read again.
                error, void = self._void
                self._void = None
                self._failed(error, void)
                return
            # Both wait for the policies: a delta counted or a request answered before them
            # would be decided against no budget.
            positions: dict[tuple[str, int], int] = {}
            beside = (
                _good(side.consume(num_messages=REQUESTS_MAX, timeout=0), positions)
                if self.owned and self.book.ready.is_set()
                else []
            )
            cycle = _Cycle()
            deltas = [m for m in beside if m.topic() == self.topics.scopes]
            asked = [m for m in beside if m.topic() != self.topics.scopes] if deltas else beside
            now = self.clock()
            self._apply_deltas(cycle, deltas, now)
            self._count(cycle, _good(messages, positions), now)
            self._grant(cycle, asked, now, positions)
            self._sweep_if_due(cycle)
            self._stats_if_due(cycle)
            counted = time.monotonic()
            self.timings["count"] += counted - self.cycle_started
            # The previous cycle's transaction committed meanwhile (or this one is void).
            if not self._settle():
                self._discard(cycle)
                return
            if cycle or positions:
                self._commit(cycle, positions)
            committed = time.monotonic()
            self.timings["commit"] += committed - counted
            if committed - self.cycle_started > SLOW_CYCLE_S:
                # What a latency outlier (P2) is made of, when it happens.
                log.info(
                    "slow cycle: %d calls, %d deltas, %d requests; counting %.0f ms, "
                    "committing %.0f ms (%d states, %d records out)",
                    len(messages),
                    len(deltas),
                    len(asked),
                    (counted - self.cycle_started) * 1000,
                    (committed - counted) * 1000,
                    len(cycle.states) + len(cycle.scope_states),
                    len(cycle.out),
                )
        except _ConsumerFailed as failed:
            # Nothing of this cycle was committed: the new consumer's assignment restores.
            self._settle(rewind=False)
            self._replace_consumer(failed.error)
            return
        finally:
            self.cycle_started = None
        self.cycles += 1
        if began - self._noted_at >= TIMINGS_EVERY_S:
            self._note_timings(began)
        if began - self._lag_at >= LAG_EVERY_S:
            self._lag_at = began
            self._observe_lag()

    def _read(self, consumer: BatchConsumer, began: float) -> list[Any]:
        """This cycle's calls records: what arrived since the last cycle, gathered for at
        least ``min_cycle_s`` after it began; when nothing did, the first record to arrive
        within ``cycle_s`` and what is queued behind it."""
        gap = began - self._last_began
        wait = self.min_cycle_s - gap if gap < self.min_cycle_s else 0.0
        messages = consumer.consume(num_messages=self.batch_max, timeout=wait)
        if not messages:
            # Nothing to count meanwhile: the transaction in flight is settled now, so the
            # states in memory (the web views) are never a cycle behind what is committed.
            if not self._settle():
                return []
            # consume() waits out its whole timeout unless the batch fills; one record
            # returns as soon as it arrives.
            messages = consumer.consume(num_messages=1, timeout=self.cycle_s)
            if messages:
                messages += consumer.consume(num_messages=self.batch_max - 1, timeout=0)
        return messages

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
            "committing %s",
            now - self._noted_at,
            self.cycles - self._noted_cycles,
            int(spent["records"]),
            spent["consume"],
            spent["count"],
            spent["commit"],
        )
        self._noted_at, self._noted_cycles = now, self.cycles
        self.timings = dict.fromkeys(self.timings, 0.0)

    def _count(self, cycle: _Cycle, messages: list[Any], now: int) -> None:
        stats = self.stats
        by_agent: dict[str, list[tuple[CallRecord, int, int, str | None]]] = {}
        for_stats: list[tuple[CallRecord, int, int]] = []
        values = [message.value() for message in messages]
        for message, value, event in zip(
            messages, values, parse_calls(values, now, self.future_tolerance_ms), strict=True
        ):
            partition, offset = message.partition(), message.offset()
            if isinstance(event, str):
                self._dead_letter(
                    cycle, self.topics.calls, partition, offset, message.key(), value, event
                )
                continue
            if stats is not None:
                for_stats.append((event, partition, offset))
            by_agent.setdefault(event.agent_id, []).append(
                (event, partition, offset, holder_of(message.headers()))
            )
        if stats is not None and for_stats:
            stats.count_batch(for_stats)
        plan = self.book.plan
        zones = ("UTC", *sorted(plan.zones))
        with_activity = plan.concurrency or plan.spawn
        # Summed per (pool, workflow, task type) first, one add per event, then into each
        # scope's delta once per cycle: three adds per event were the biggest line here.
        combos: dict[tuple[str | None, str | None, str | None], ScopeDelta] = {}
        pending, states = self._pending_states, self.states
        for agent_id, items in by_agent.items():
            # On top of the transaction still committing, if it wrote this agent.
            state = pending.get(agent_id) or states.get(agent_id) or SpendState()
            fold = SpendFold(state, now_ms=now, plan=plan)
            for event, partition, offset, holder in items:
                time_ms = event.event_time_ms
                keys = period_keys(time_ms, zones)
                delivery = fold.add_event(
                    event, event.event_id.replace("-", ""), partition, offset, holder, keys
                )
                if delivery is Delivery.DUPLICATE:
                    log.info("event %s delivered again at %s; not counted", event.event_id, offset)
                    continue
                if delivery is Delivery.REPLAY:
                    # Counted under committed offsets already: its deltas were committed
                    # with them (one transaction), so they are not sent again.
                    continue
                cycle.counted += 1
                combo = (event.pool, event.workflow_id, event.task_type)
                if combo == _NO_SCOPES:
                    continue
                summed = combos.get(combo)
                if summed is None:
                    summed = combos[combo] = ScopeDelta("")
                # Positional: keyword calls cost a tenth of this loop.
                summed.add(
                    keys,
                    time_ms,
                    event.cost_nano_usd,
                    partition,
                    offset,
                    now,
                    plan,
                    Activity(agent_id, event.parent_agent_id, event.spawn_depth, event.latency_ms)
                    if with_activity
                    else None,
                    holder,
                )
            counted = fold.result()
            if counted is not state:
                counted, out = self.decider.settle(
                    f"agent:{agent_id}", counted, items[-1][0].event_time_ms
                )
                self._emit(cycle, out)
                cycle.states[agent_id] = counted
        deltas = cycle.deltas
        for (pool, workflow, task_type), summed in combos.items():
            for scope, activity in (
                (f"pool:{pool}" if pool else None, True),
                (f"workflow:{workflow}" if workflow else None, True),
                (f"task_type:{task_type}" if task_type else None, False),
            ):
                if scope is None:
                    continue
                delta = deltas.get(scope)
                if delta is None:
                    delta = deltas[scope] = ScopeDelta(scope)
                delta.merge(summed, with_activity=activity)
        self.metrics.batch_done(self.topics.calls, len(messages), now)

    def _apply_deltas(self, cycle: _Cycle, messages: list[Any], now: int) -> None:
        """The second hop: fold the deltas other cycles (of any worker) wrote for the scopes
        of the partitions this worker owns, one fold per scope."""
        if not messages:
            return
        by_scope: dict[str, list[tuple[ScopeDelta, int]]] = {}
        for message in messages:
            try:
                delta = decode_delta(message.value())
            except DeltaError as exc:
                self._dead_letter(
                    cycle,
                    self.topics.scopes,
                    message.partition(),
                    message.offset(),
                    message.key(),
                    message.value(),
                    str(exc),
                )
                continue
            by_scope.setdefault(delta.scope, []).append((delta, message.partition()))
        plan = self.book.plan
        for scope, items in by_scope.items():
            state = self._scope_state(cycle, scope) or SpendState()
            fold = SpendFold(state, now_ms=now, plan=plan)
            for delta, partition in items:
                fold.add_delta(delta, partition)
            counted = fold.result()
            if counted is state:
                continue
            cause = max(delta.last_ms for delta, _ in items)
            counted, out = self.decider.settle(scope, counted, cause)
            self._emit(cycle, out)
            cycle.scope_states[scope] = counted
        self.metrics.batch_done(self.topics.scopes, len(messages), now)

    def _state(self, cycle: _Cycle, agent_id: str) -> SpendState | None:
        return (
            cycle.states.get(agent_id)
            or self._pending_states.get(agent_id)
            or self.states.get(agent_id)
        )

    def _scope_state(self, cycle: _Cycle, scope: str) -> SpendState | None:
        return (
            cycle.scope_states.get(scope)
            or self._pending_scope_states.get(scope)
            or self.scope_states.get(scope)
        )

    # -- allowances -----------------------------------------------------------------------

    def _grant(
        self,
        cycle: _Cycle,
        messages: list[Any],
        now: int,
        positions: dict[tuple[str, int], int],
    ) -> None:
        """Answer allowance requests from the states of the scopes this worker owns; each
        answer commits in the transaction that writes the state it changed, so a replayed
        request is answered from the state (its seq applied already), never granted twice.

        A request waiting for policies holds its partition's committed offset back, so a
        crash or a rebalance reads it again rather than losing it."""
        waiting, self._waiting = self._waiting, []
        touched = {message.partition() for _, message, _ in waiting}
        for since, held, request in waiting:
            self._answer_request(cycle, held, request, now, since, waited=True)
        arrived = time.monotonic()
        for message in messages:
            partition = message.partition()
            touched.add(partition)
            self._requests_read[partition] = message.offset() + 1
            parsed = self._parse_request(message)
            if isinstance(parsed, str):
                self._dead_letter(
                    cycle,
                    self.topics.requests,
                    message.partition(),
                    message.offset(),
                    message.key(),
                    message.value(),
                    parsed,
                )
                continue
            self._answer_request(cycle, message, parsed, now, arrived)
        earliest: dict[int, int] = {}
        for _, message, _ in self._waiting:
            p = message.partition()
            earliest[p] = min(earliest.get(p, message.offset()), message.offset())
        for p in touched:
            key = (self.topics.requests, p)
            offset = earliest.get(p, self._requests_read.get(p))
            if offset is None or offset == self._committed.get(key):
                # Committed there already: no transaction just to say so again.
                positions.pop(key, None)
            else:
                positions[key] = offset

    def _answer_request(
        self,
        cycle: _Cycle,
        message: Any,
        request: AllowanceRequest,
        now: int,
        since: float,
        *,
        waited: bool = False,
    ) -> None:
        if request.policies_at and self.book.behind(request.policies_at):
            if time.monotonic() - since < POLICIES_WAIT_S:
                if not waited:
                    self.requests_waited += 1
                self._waiting.append((since, message, request))
                return
            log.warning(
                "allowance request %s/%d: its holder read policies up to %s, this worker has "
                "not applied them after %.0f s; answered under the policies it has",
                request.holder,
                request.seq,
                request.policies_at,
                POLICIES_WAIT_S,
            )
        scope = request.scope
        kind, _, name = scope.partition(":")
        if kind == "agent":
            before = self._state(cycle, name) or SpendState()
        elif kind in SCOPE_KINDS:
            before = self._scope_state(cycle, scope) or SpendState()
        else:
            # A scope kind without a spend state (subtree): no budget to hold.
            self._answer(cycle, request.reply_partition, unbudgeted_grant(request, now))
            return
        state, answer = grant_allowance(
            before,
            request,
            self.decider.governing(scope),
            now,
            ttl_ms=self.allowance_ttl_ms,
        )
        if state is not before:
            if state.partition is None:
                # A state made by a request alone still lives on its partition (the
                # sweep and the rebalance go by it).
                state = replace(state, partition=message.partition())
            if kind == "agent":
                cycle.states[name] = state
            else:
                cycle.scope_states[scope] = state
        self._answer(cycle, request.reply_partition, answer)

    def _parse_request(self, message: Any) -> AllowanceRequest | str:
        """The request to answer, or why it goes to the dlq instead."""
        value = message.value()
        if not value:
            return "empty value; expected an AllowanceRequest JSON object"
        try:
            request = AllowanceRequest.model_validate_json(value)
        except ValidationError as exc:
            return f"not a valid AllowanceRequest: {exc}"
        expected = state_partition(request.scope, self.partitions)
        if message.partition() != expected:
            return (
                f"allowance request for {request.scope} arrived on partition "
                f"{message.partition()}, but its spend state lives on partition {expected}: "
                "the sender must partition as agentledger.schemas.partitioning does"
            )
        if request.reply_partition >= self.allowance_partitions:
            return (
                f"reply_partition {request.reply_partition} does not exist: "
                f"{self.topics.allowances} has {self.allowance_partitions} partitions"
            )
        return request

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
        """Re-decide both hops' states: period ends (RESUME), policy changes (and allowances
        that no longer fit), states counted before the policies were loaded."""
        if not self.book.ready.is_set():
            return
        now = time.monotonic()
        changed = self.book.version != self._swept_version
        if not changed and now - self._sweep_at < SWEEP_EVERY_S:
            return
        full = changed or now - self._full_sweep_at >= FULL_SWEEP_EVERY_S
        self._sweep_at = now
        now_ms = self.clock()
        agents = list(self.states) if full else sorted(self._standing)
        for agent_id in agents:
            state = self._state(cycle, agent_id)
            if state is not None:
                settled = self._resettle(cycle, f"agent:{agent_id}", state, now_ms)
                if settled is not state:
                    cycle.states[agent_id] = settled
        scopes = list(self.scope_states) if full else sorted(self._standing_scopes)
        for scope in scopes:
            state = self._scope_state(cycle, scope)
            if state is not None:
                settled = self._resettle(cycle, scope, state, now_ms)
                if settled is not state:
                    cycle.scope_states[scope] = settled
        if full:
            self._swept_version = self.book.version
            self._full_sweep_at = now

    def _resettle(self, cycle: _Cycle, scope: str, state: SpendState, now_ms: int) -> SpendState:
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
        return settled

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
        commands = self._commands
        for item in out:
            if commands is not None and item.topic == self.topics.control:
                # The fast copy: a shim applies the STOP without waiting for this cycle's
                # commit (~35 ms at 10k events/s, P2). Commands are signed and idempotent
                # (the shim drops a command id it applied), so the transaction's copy, the
                # one that counts when this cycle aborts and is replayed, changes nothing.
                self._send_now(commands, item)
            cycle.out.append((item.topic, item.key, item.value, None))

    def _send_now(self, commands: CommandProducer, item: Outgoing) -> None:
        try:
            commands.produce(item.topic, item.value, item.key)
        except BufferError:
            # librdkafka's queue is full (the broker away): the transaction's copy carries it.
            log.info("control command fast copy not queued (producer queue full)")
            return
        self.metrics.fast_commands.inc()
        commands.poll(0)

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
        """Write the cycle and its input offsets in one transaction. With overlap_commits the
        commit runs on the committer thread while the next cycle reads and counts (a commit
        waits ~35-80 ms for the broker); that cycle opens its own transaction only once
        this one is settled (``_settle``), so the transactions stay in order."""
        producer = self._producer
        consumer = self._consumer
        assert producer is not None and consumer is not None and self._in_flight is None
        try:
            producer.begin_transaction()
            for changelog, states in (
                (self.topics.changelog, cycle.states),
                (self.topics.scope_changelog, cycle.scope_states),
            ):
                for key, state in states.items():
                    assert state.partition is not None
                    producer.produce(
                        changelog, encode_state(state), encode_key(key), partition=state.partition
                    )
            for scope, delta in cycle.deltas.items():
                self._produce(
                    producer,
                    self.topics.scopes,
                    scope.encode(),
                    encode_delta(delta),
                    state_partition(scope, self.partitions),
                )
            for topic, out_key, value, partition in cycle.out:
                self._produce(producer, topic, out_key, value, partition)
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
            if not self.overlap_commits:
                producer.commit_transaction(COMMIT_TIMEOUT_S)
        except KafkaException as exc:
            self._failed(exc, cycle)
            return
        if not self.overlap_commits:
            self._applied(cycle, positions)
            return
        done: Future[None] = Future()

        def commit() -> None:
            try:
                producer.commit_transaction(COMMIT_TIMEOUT_S)
            except BaseException as exc:  # noqa: BLE001 - re-raised by _settle's result()
                done.set_exception(exc)
            else:
                done.set_result(None)

        # A daemon thread per commit (~0.1 ms): a commit hung on a lost coordinator
        # (librdkafka #5511) must not keep the process from exiting once replaced.
        threading.Thread(target=commit, name="agentledger-commit", daemon=True).start()
        self._in_flight = _InFlight(cycle, positions, done)
        self._pending_states = cycle.states
        self._pending_scope_states = cycle.scope_states

    def _take_in_flight(self) -> tuple[_InFlight, KafkaException | None] | None:
        """Wait for the transaction in flight; it and its error (None: committed)."""
        in_flight = self._in_flight
        if in_flight is None:
            return None
        error: KafkaException | None = None
        try:
            in_flight.done.result()
        except KafkaException as exc:
            error = exc
        self._in_flight = None
        self._pending_states = {}
        self._pending_scope_states = {}
        return in_flight, error

    def _settle(self, *, rewind: bool = True) -> bool:
        """Wait for the transaction in flight and apply it to memory; False when it failed
        (then handled: the producer aborted or rebuilt, the consumers rewound)."""
        taken = self._take_in_flight()
        if taken is None:
            return True
        in_flight, error = taken
        if error is not None:
            self._failed(error, in_flight.cycle, rewind=rewind)
            return False
        self._applied(in_flight.cycle, in_flight.positions)
        return True

    def _settle_in_callback(self) -> None:
        taken = self._take_in_flight()
        if taken is None:
            return
        in_flight, error = taken
        if error is not None:
            self._void = (error, in_flight.cycle)
        else:
            self._applied(in_flight.cycle, in_flight.positions)

    def _discard(self, cycle: _Cycle) -> None:
        """A cycle counted on top of a transaction that failed: nothing of it is written."""
        if self.stats is not None and cycle.stats_keys:
            self.stats.mark_dirty(cycle.stats_keys)

    def _applied(self, cycle: _Cycle, positions: dict[tuple[str, int], int]) -> None:
        """A committed cycle: its states become the ones in memory."""
        for committed, states, standing in (
            (cycle.states, self.states, self._standing),
            (cycle.scope_states, self.scope_states, self._standing_scopes),
        ):
            states.update(committed)
            for key, state in committed.items():
                if _stands(state):
                    standing.add(key)
                else:
                    standing.discard(key)
        self._committed.update(positions)

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

    def _failed(self, exc: KafkaException, cycle: _Cycle, *, rewind: bool = True) -> None:
        """A transaction that did not commit: nothing of it is visible (read_committed), the
        states in memory are the committed ones; rewind the input to where they stand."""
        error: KafkaError = exc.args[0]
        if self._stop.is_set():
            # Given up (a replacement holds the transactional id now): a rebuilt producer
            # would fence the replacement's.
            log.info("transaction of a stopped data plane failed (%s); not retried", error)
            return
        producer = self._producer
        assert producer is not None
        if self.stats is not None and cycle.stats_keys:
            self.stats.mark_dirty(cycle.stats_keys)
        # The aborted cycle may have swept: sweep all again.
        self._swept_version = None
        if error.fatal():
            log.error("transactional producer failed for good (%s); rebuilding it", error)
            self._producer = self._start_producer()
            # Another producer with our id may have written meanwhile: restore from the
            # changelog what is ours now.
            self.states.clear()
            self.scope_states.clear()
            self._standing.clear()
            self._standing_scopes.clear()
            owned = sorted(self.owned)
            self._retrying(f"restoring partitions {owned}", lambda: self._restore(owned))
        else:
            log.warning("transaction aborted (%s); the cycle is read again", error)
            try:
                producer.abort_transaction(COMMIT_TIMEOUT_S)
            except KafkaException as again:
                log.error("abort failed (%s); rebuilding the producer", again)
                self._producer = self._start_producer()
        if rewind:
            self._rewind()

    def _rewind(self) -> None:
        consumer, side = self._consumer, self._side
        assert consumer is not None and side is not None
        # The requests are read again from the committed offsets, the waiting ones too.
        self._waiting.clear()
        self._requests_read.clear()
        calls = [TopicPartition(self.topics.calls, p) for p in sorted(self.owned)]
        try:
            committed = {
                (tp.topic, tp.partition): tp.offset
                for tp in consumer.committed(calls, timeout=COMMIT_TIMEOUT_S)
            }
        except KafkaException as exc:
            # The group coordinator is away (a broker restart): the offsets of the last
            # transaction this worker committed are where its states stand.
            log.warning("committed offsets unavailable (%s); rewinding to our own", exc)
            committed = {}
        for tp in calls:
            offset = committed.get((tp.topic, tp.partition), -1)
            if offset < 0:
                offset = self._committed.get((tp.topic, tp.partition), -1)
            # Never committed: the group starts such a partition at its earliest offset
            # (auto.offset.reset), so that is where the aborted cycle's records begin.
            consumer.seek(
                TopicPartition(tp.topic, tp.partition, offset if offset >= 0 else OFFSET_BEGINNING)
            )
        for p in sorted(self.owned):
            for topic in (self.topics.requests, self.topics.scopes):
                offset = self._committed.get((topic, p))
                if offset is not None:
                    side.seek(TopicPartition(topic, p, offset))
                elif topic == self.topics.scopes:
                    side.seek(TopicPartition(topic, p, OFFSET_BEGINNING))

    # -- views ----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "joined": self.joined,
            "restoring": self.restoring,
            "stuck": self.stuck(),
            "error": self.error,
            "cycles": self.cycles,
            "consumers_replaced": self.consumers_replaced,
            "partitions": sorted(self.owned),
            "agents": len(self.states),
            "scopes": len(self.scope_states),
            "commit_in_flight": self._in_flight is not None,
            "requests_waiting_for_policies": len(self._waiting),
            "requests_waited_for_policies": self.requests_waited,
        }


def unbudgeted_grant(request: AllowanceRequest, now_ms: int) -> AllowanceGrant:
    """The answer for a scope no budget governs: nothing to hold, call freely."""
    return AllowanceGrant(
        holder=request.holder,
        seq=request.seq,
        scope=request.scope,
        budgets=(),
        ttl_ms=0,
        issued_at_ms=now_ms,
    )


def parse_calls(
    values: list[bytes | None], now: int, future_tolerance_ms: int
) -> list[CallRecord | str]:
    """:func:`parse_call` of each value, most of them checked a batch at a time."""
    latest = now + future_tolerance_ms
    return [
        parse_call(value, now, future_tolerance_ms)
        if record is None or record.event_time_ms > latest
        else record
        for value, record in zip(values, decode_calls(values), strict=True)
    ]


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


class _ConsumerFailed(Exception):
    """A consumer reported a fatal error: it can read nothing more."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__(str(error))
        self.error = error


def _good(messages: list[Any], positions: dict[tuple[str, int], int]) -> list[Any]:
    """The records of ``messages`` (errors logged) and, per partition, the offset after the
    last one: what the transaction commits."""
    kept = []
    for message in messages:
        error = message.error()
        if error is not None:
            if error.fatal() or error.code() == KafkaError._FATAL:
                raise _ConsumerFailed(error)
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("data plane consume: %s", error)
            continue
        positions[(message.topic(), message.partition())] = message.offset() + 1
        kept.append(message)
    return kept
