"""The faust application: spend per scope per period, budgets from the policies topic, and
signed STOP / RESUME commands on the control topic.

Two hops: calls (keyed by agent) are summed per agent, then each event's cost is forwarded,
keyed by pool / workflow / task type, to the scopes topic and summed per scope there (see
scopes.py for why that hop is exact too).

Design choices against known faust traps:
- spend lives in a plain Table keyed by agent id, with our own period buckets (windowed tables
  expire by wall clock and drop late events);
- each table value carries the applied source offset next to the spend, so one changelog
  message is one atomic, idempotent update;
- commands are derived from state and compared with the last one published, kept in the
  same value, so a crash between write and publish is repaired on replay or by the sweep timer;
- no exactly_once, agent concurrency 1.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, TypeVar

import faust
from aiokafka.errors import KafkaError
from faust.exceptions import ConsumerNotStarted
from faust.types import TP
from faust.web import Request, Response, View
from pydantic import ValidationError

from agentledger.config import Settings
from agentledger.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agentledger.metrics import metrics_authorized, render
from agentledger.schemas import (
    Alert,
    AllowanceGrant,
    AllowanceRequest,
    BudgetPolicy,
    ControlAction,
    dead_letter,
    sign_grant,
)
from agentledger.schemas.partitioning import state_key, state_partition
from agentledger.schemas.topics import ALLOWANCE_PARTITIONS

from .allowances import grant_allowance, revoke_over_allocated
from .batch_kafka import (
    calls_consumer_config,
    forwards_producer_config,
    requests_consumer_config,
    restore_consumer_config,
    transactional_producer_config,
)
from .counting import FUTURE_TOLERANCE_MS
from .data_plane import DataPlane, DataPlaneTopics, holder_of
from .decide import Decider, Outgoing
from .declare import TopicMissing
from .dlq_rate import DlqRate
from .flow import LedgerApp
from .fold import SpendFold
from .metrics import ProcessorMetrics, dlq_reason_class
from .ordering import InOrder, Verdict
from .policies import InvalidPolicy, PolicyBook, follow_policies
from .report import spend_report
from .scopes import (
    ScopeCost,
    changelog_topic_name,
    decode_scope_costs,
    ensure_scopes_topic,
    scopes_topic_name,
)
from .stall import PartitionView, Remedy, StallWatch, recovery_views
from .state import SpendState
from .state_codec import decode_state, encode_state
from .stats import StatsAggregator, register_stats
from .webhook import WebhookDelivery

__all__ = [
    "COMPONENT",
    "Processor",
    "build_app",
    "calls_partition_count",
    "data_plane_topics",
    "wall_clock_ms",
]

log = logging.getLogger(__name__)

COMPONENT = "processor"
SWEEP_INTERVAL_S = 1.0
POLICY_CHECK_EVERY_S = 0.05
FULL_SWEEP_EVERY_S = 60.0
Clock = Callable[[], int]
# A batch closes at this many events, or this long after its first one: the wait adds at
# most BATCH_WITHIN_S to enforcement latency.
BATCH_MAX = 5000
BATCH_WITHIN_S = 0.05
# Requests are few and a caller may be waiting on one: answer them sooner.
ALLOWANCE_BATCH_WITHIN_S = 0.005
# An input partition whose records wait this long without one being delivered gets the
# stall watch's remedies (see stall.py); its offsets are checked this often.
STALL_AFTER_S = 10.0
STALL_CHECK_EVERY_S = 2.0
# How often the consumer refreshes topic metadata (see build_app).
METADATA_MAX_AGE_MS = 15_000
# A partition sought back for skipped records that do not come again within this long has a
# real gap in its offsets (see ordering.py).
ACCEPT_GAP_AFTER_S = 5.0
# Longer than a rebalance plus a recovery of the tables take here (seconds under load); past
# it /health answers 503.
REBALANCE_STUCK_S = 180.0
# Scopes whose governing policies are kept (an unbounded number of agents may come and go).
GOVERNING_CACHE_SIZE = 100_000
DEAD_LETTERS_REMEMBERED = 100_000
SPEND_TABLE = "spend"  # per agent id
SCOPE_SPEND_TABLE = "scope-spend"  # per pool / workflow / task type scope


@dataclass(frozen=True)
class _Ledger:
    """One spend table, the topic that feeds it, and how its keys name scopes."""

    table: Any  # faust.Table; untyped in faust
    topic: str
    agent_keys: bool  # keys are agent ids (scope "agent:<key>") rather than whole scopes

    def scope_of(self, key: str) -> str:
        return f"agent:{key}" if self.agent_keys else key


class Record(NamedTuple):
    """One consumed message, as the batch handlers need it (a tuple: one is built per
    message, and a frozen dataclass costs several times as much to build)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    #: The shim process whose allowance the call spent (the ``agentledger-holder`` header).
    holder: str | None = None

    @classmethod
    def of(cls, event: Any) -> Record:
        message = event.message
        return cls(
            message.topic,
            message.partition,
            message.offset,
            message.key,
            event.value,
            holder_of(message.headers),
        )


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def calls_partition_count(settings: Settings, timeout_s: float = 30.0) -> int:
    """Partitions of the calls topic; the spend table's changelog must have as many."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({**settings.kafka_client_config(), "bootstrap.servers": settings.kafka})
    topic = settings.topics.calls
    meta = admin.list_topics(topic=topic, timeout=timeout_s).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise TopicMissing(
            f"calls topic {topic!r} is missing on {settings.kafka}; create the stack's topics "
            "first (agentledger up, or deploy.ensure_topics)"
        )
    return len(meta.partitions)


class Processor:
    """The work done per event and per timer tick, around the pure core (state, counting,
    fold, decisions, report)."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        clock: Clock,
        partitions: int,
        future_tolerance_ms: int = FUTURE_TOLERANCE_MS,
        allowance_partitions: int = ALLOWANCE_PARTITIONS,
    ) -> None:
        self.app = app
        self.settings = settings
        self.clock = clock
        self.future_tolerance_ms = future_tolerance_ms
        self.book = PolicyBook()
        self.dlq_rate = DlqRate.from_settings(settings)
        self.webhook = WebhookDelivery.from_settings(settings)
        self._key = settings.control_key_bytes()
        # The timer and the agent both read-modify-write state and publish; one at a time.
        self._lock = asyncio.Lock()
        # Sweep bookkeeping, in memory only: the first sweep after a start is a full one.
        self._standing: set[tuple[str, str]] = set()  # (table name, key)
        self._swept_version: int | None = None
        self._swept_actives: frozenset[tuple[str, int]] = frozenset()
        self._full_sweep_at = 0.0
        # Offset order per input partition, see in_order.
        self.order: InOrder[TP] = InOrder(ACCEPT_GAP_AFTER_S)
        self._order_generation: int | None = None
        # Partition stall watch, see unstick.
        self.stalls: StallWatch[Any] = StallWatch(STALL_AFTER_S)
        self.recovery_stalls: StallWatch[Any] = StallWatch(STALL_AFTER_S)
        self._earliest: dict[Any, int] = {}  # per assignment; see unstick
        self._rebalancing_since: float | None = None
        # Decoded table values, see _load; and sends not yet acknowledged, see _confirm.
        self._decoded: dict[tuple[str, str], tuple[Any, SpendState]] = {}
        self._unconfirmed: list[Awaitable[Any]] = []
        # Input records dead-lettered by this worker, oldest first (see dead_letter_record).
        self._dead_lettered: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        # Routing stats, fed by on_calls (see build_app); None when not registered.
        self.stats: StatsAggregator | None = None
        # Prometheus metrics (GET /metrics); _cause_ms is the event time a settle is deciding
        # on, for the enforcement latency of the commands it publishes.
        self.metrics = ProcessorMetrics()
        self._cause_ms: int | None = None
        topics = settings.topics
        self.calls = app.topic(topics.calls, key_serializer="raw", value_serializer="raw")
        self.control = app.topic(topics.control, key_serializer="raw", value_serializer="raw")
        self.dlq = app.topic(topics.dlq, key_serializer="raw", value_serializer="raw")
        self.alerts = app.topic(topics.alerts, key_serializer="raw", value_serializer="raw")
        self.scopes = app.topic(
            scopes_topic_name(settings), key_serializer="raw", value_serializer="raw"
        )
        self.allowance_requests = app.topic(
            topics.allowance_requests, key_serializer="raw", value_serializer="raw"
        )
        self.allowances = app.topic(topics.allowances, key_serializer="raw", value_serializer="raw")
        self.allowance_ttl_ms = int(settings.allowance_ttl_s * 1000)
        self.partitions = partitions
        self.allowance_partitions = allowance_partitions
        self.scope_spend = app.Table(SCOPE_SPEND_TABLE, partitions=partitions, value_type=bytes)
        # The agents' states live in the data plane (data_plane.py), not in faust.
        self.ledgers = (_Ledger(self.scope_spend, scopes_topic_name(settings), agent_keys=False),)
        self.decider = Decider(
            self.book,
            self._key,
            control_topic=topics.control,
            alerts_topic=topics.alerts,
            metrics=self.metrics,
            clock=clock,
        )
        #: The batch data plane counting the calls topic (None in apps built without it).
        self.plane: DataPlane | None = None

    # -- dead letters -----------------------------------------------------------------------

    async def dead_letter(
        self,
        *,
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
        self._unconfirmed.append(await self.dlq.send(key=record.key, value=record.value))
        too_many = self.dlq_rate.record(self.clock(), reason)
        if too_many is not None:
            await self.raise_alert(too_many)

    async def raise_alert(self, alert: Alert) -> None:
        """Publish ``alert`` to the alerts topic, and hand it to the webhook (never waits)."""
        await self._send(self.decider.alert(alert))

    async def dead_letter_record(self, record: Record, reason: str) -> None:
        """Dead-letter an input record once per worker: faust delivers records again around
        rebalances and recovery (the states skip what they applied), and each delivery would
        otherwise add the same dead letter. A restarted worker that replays a partition
        dead-letters its bad records again; readers can tell by topic, partition and offset."""
        where = (record.topic, record.partition, record.offset)
        if where in self._dead_lettered:
            log.debug("%s:%s@%s delivered again; dead-lettered already", *where)
            return
        self._dead_lettered[where] = None
        if len(self._dead_lettered) > DEAD_LETTERS_REMEMBERED:
            self._dead_lettered.popitem(last=False)
        await self.dead_letter(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            payload=record.value,
            reason=reason,
        )

    async def reject_policy(self, bad: InvalidPolicy) -> None:
        await self.dead_letter(
            topic=self.settings.topics.policies,
            partition=bad.partition,
            offset=bad.offset,
            key=bad.key,
            payload=bad.value,
            reason=bad.reason,
        )
        await self._confirm()

    # -- commands ---------------------------------------------------------------------------

    async def settle(self, scope: str, state: SpendState) -> SpendState:
        """Publish what the state calls for, if it differs from what stands; return the state
        with the published command recorded."""
        state, out = self.decider.settle(scope, state, self._cause_ms)
        for item in out:
            await self._send(item)
        return state

    async def _send(self, item: Outgoing) -> None:
        topic = self.control if item.command is not None else self.alerts
        self._unconfirmed.append(await topic.send(key=item.key, value=item.value))
        if item.alert is not None and self.webhook is not None:
            self.webhook.offer(item.alert)

    def _governing(self, scope: str) -> list[BudgetPolicy]:
        return self.decider.governing(scope)

    # -- the stream -------------------------------------------------------------------------

    def _load(self, table: Any, key: str) -> SpendState:
        """The decoded state of ``key``. Decoding is most of the cost of a small update, so the
        last decoded state is kept while the table still holds the very value it came from (a
        recovery or a rebalance replaces the value, and the state is decoded again)."""
        raw = table.get(key)
        if raw is None:
            return SpendState()
        cached = self._decoded.get((table.name, key))
        if cached is not None and cached[0] is raw:
            return cached[1]
        state = decode_state(raw)
        self._decoded[(table.name, key)] = (raw, state)
        return state

    def _store(self, table: Any, key: str, state: SpendState, partition: int) -> None:
        """Write ``state`` to the store and its changelog, on the partition the key lives on.

        Written by hand rather than through ``table[key] = ...``: in a batch there is no single
        current event for faust to take the partition from. The changelog write is confirmed
        before the batch's offsets can be committed (see :meth:`_confirm`).
        """
        value = encode_state(state)
        table.data[key] = value
        self._decoded[(table.name, key)] = (value, state)
        self._unconfirmed.append(table.send_changelog(partition, key, value))

    async def _confirm(self) -> None:
        """Wait until everything sent for the current batch is acknowledged by Kafka.

        faust commits the offsets of acked events without waiting for changelog writes and
        sends; a crash after such a commit would lose them. The batch's events are acked only
        after this returns, so a batch is either wholly effective or replayed.
        """
        pending, self._unconfirmed = self._unconfirmed, []
        if pending:
            await asyncio.gather(*pending)

    async def on_scope_costs(self, batch: list[Record]) -> None:
        """Count a batch of forwarded costs, once per scope per batch (see :meth:`on_calls`)."""
        batch = await self.in_order(batch)
        by_scope: dict[str, list[tuple[ScopeCost, int]]] = {}
        for record in batch:
            try:
                costs = decode_scope_costs(record.value)
            except ValueError as exc:
                await self.dead_letter_record(record, str(exc))
                continue
            for cost in costs:
                by_scope.setdefault(cost.scope, []).append((cost, record.partition))
        debug = log.isEnabledFor(logging.DEBUG)
        async with self._lock:
            now = self.clock()
            for scope, items in by_scope.items():
                state = self._load(self.scope_spend, scope)
                if debug:
                    log.debug(
                        "scope %s: %d costs %s; applied before %s",
                        scope,
                        len(items),
                        [(c.partition, c.offset) for c, _ in items],
                        state.applied,
                    )
                fold = SpendFold(state, now_ms=now, plan=self.book.plan)
                for cost, state_partition in items:
                    fold.add_cost(
                        event_id=cost.event_id,
                        event_time_ms=cost.event_time_ms,
                        cost_nano_usd=cost.cost_nano_usd,
                        partition=cost.partition,
                        offset=cost.offset,
                        state_partition=state_partition,
                        activity=cost.activity,
                        holder=cost.holder,
                    )
                counted = fold.result()
                if counted is state:
                    continue
                self._cause_ms = max(c.event_time_ms for c, _ in items)
                counted = await self.settle(scope, counted)
                self._cause_ms = None
                self._store(self.scope_spend, scope, counted, items[-1][1])
                self._track(SCOPE_SPEND_TABLE, scope, counted)
            await self._confirm()
        self.metrics.batch_done(self.scopes.get_topic_name(), len(batch), self.clock())

    # -- allowances -------------------------------------------------------------------------

    def _parse_request(self, record: Record) -> AllowanceRequest | str:
        """The request to answer, or why it goes to the dlq instead."""
        if not record.value:
            return "empty value; expected an AllowanceRequest JSON object"
        try:
            request = AllowanceRequest.model_validate_json(record.value)
        except ValidationError as exc:
            return f"not a valid AllowanceRequest: {exc}"
        expected = state_partition(request.scope, self.partitions)
        if record.partition != expected:
            return (
                f"allowance request for {request.scope} arrived on partition "
                f"{record.partition}, but its spend state lives on partition {expected}: "
                "the sender must partition as agentledger.schemas.partitioning does"
            )
        if request.reply_partition >= self.allowance_partitions:
            return (
                f"reply_partition {request.reply_partition} does not exist: "
                f"{self.settings.topics.allowances} has {self.allowance_partitions} partitions"
            )
        return request

    async def on_allowance_requests(self, batch: list[Record]) -> None:
        """Answer a batch of allowance requests from the scopes' states. Each state is written
        and acknowledged before any answer leaves, so a crash in between is answered again
        from the state on replay (the request's seq is applied already), never granted
        twice."""
        batch = await self.in_order(batch)
        by_key: dict[tuple[int, str], list[tuple[AllowanceRequest, int]]] = {}
        for record in batch:
            request = self._parse_request(record)
            if isinstance(request, str):
                await self.dead_letter_record(record, request)
                continue
            kind = request.scope.partition(":")[0]
            if kind == "agent":
                continue  # the data plane, which holds the agents' states, answers it
            # -1: a scope kind without a spend state (subtree): no budget
            index = 0 if kind in {"pool", "workflow", "task_type"} else -1
            by_key.setdefault((index, state_key(request.scope).decode()), []).append(
                (request, record.partition)
            )
        if not by_key:
            return
        while not self.book.ready.is_set():
            # Answering before the policies are known would say "no budget" for a budgeted
            # scope; the shim waits a bounded time for the answer instead.
            await asyncio.sleep(0.05)
        answers: list[tuple[int, AllowanceGrant]] = []
        async with self._lock:
            now = self.clock()
            for (index, key), requests in by_key.items():
                if index < 0:
                    for request, _ in requests:
                        answers.append((request.reply_partition, _unbudgeted(request, now)))
                    continue
                ledger = self.ledgers[index]
                state = before = self._load(ledger.table, key)
                scope = ledger.scope_of(key)
                governing = self._governing(scope)
                for request, _ in requests:
                    state, answer = grant_allowance(
                        state,
                        request,
                        governing,
                        now,
                        ttl_ms=self.allowance_ttl_ms,
                    )
                    answers.append((request.reply_partition, answer))
                if state is not before:
                    if state.partition is None:
                        # A state made by a request alone still lives on its partition (the
                        # sweep drops states that say none).
                        state = replace(state, partition=requests[-1][1])
                    self._store(ledger.table, key, state, requests[-1][1])
            await self._confirm()
            for partition, answer in answers:
                await self._send_grant(partition, answer)
            await self._confirm()

    async def _send_grant(self, partition: int, answer: AllowanceGrant) -> None:
        signed = sign_grant(answer, self._key)
        self._unconfirmed.append(
            await self.allowances.send(
                key=answer.holder.encode(),
                value=signed.model_dump_json().encode(),
                partition=partition,
            )
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "allowance %s seq %s for %s: %s",
                answer.holder,
                answer.seq,
                answer.scope,
                [(b.budget, b.granted_nano_usd) for b in answer.budgets],
            )

    async def _revoke_over_allocated(
        self, ledger: _Ledger, key: str, state: SpendState
    ) -> SpendState:
        """Take back allowances that no longer fit (a policy was lowered); see allowances.py."""
        if not state.leases:
            return state
        scope = ledger.scope_of(key)
        revoked, answers = revoke_over_allocated(
            state, self._governing(scope), scope, self.clock(), ttl_ms=self.allowance_ttl_ms
        )
        for partition, answer in answers:
            log.info(
                "allowances of %s taken back from %s: the budget was lowered", scope, answer.holder
            )
            await self._send_grant(partition, answer)
        return revoked

    # -- offset order -----------------------------------------------------------------------

    async def in_order(self, batch: list[Record]) -> list[Record]:
        """The records of ``batch`` to count now, in each partition's offset order (see
        ordering.py); partitions that skipped records are sought back to the first missing one.
        """
        generation = self.app.consumer_generation_id
        if generation != self._order_generation:
            self.order.reset()
            self._order_generation = generation
        order = self.order
        unknown = {TP(r.topic, r.partition) for r in batch} - set(order.known())
        if unknown:
            try:
                starts = await committed_or_earliest(self.app, unknown)
            except (TimeoutError, KafkaError) as exc:
                # Without the committed offsets the first record of a partition is where it
                # starts; a hole before it cannot be seen this once.
                log.warning("committed offsets unavailable (%s); counting as delivered", exc)
                starts = {}
            for tp in unknown:
                first = min(r.offset for r in batch if (r.topic, r.partition) == tp)
                order.start(tp, starts.get(tp, first))
        now = time.monotonic()
        kept: list[Record] = []
        seeks: dict[TP, int] = {}
        for record in batch:
            tp = TP(record.topic, record.partition)
            verdict = order.admit(tp, record.offset, now)
            if verdict is Verdict.COUNT:
                kept.append(record)
            elif verdict is Verdict.SEEK:
                seeks[tp] = order.expected(tp)
        if len(kept) == len(batch):
            return kept
        for tp, offset in seeks.items():
            log.warning(
                "partition %s:%s skipped records (next to count %s); seeking back to it",
                tp.topic,
                tp.partition,
                offset,
            )
        if seeks:
            try:
                # On faust's consumer thread, and it also lowers faust's read offset, which
                # would otherwise drop the records read again.
                await self.app.consumer.seek_wait(seeks)
            except (TimeoutError, KafkaError) as exc:
                # Records held back are acked with the batch: count them rather than lose them.
                log.warning("seek back failed (%s); counting the batch as delivered", exc)
                order.reset()
                return batch
        return kept

    # -- the timer --------------------------------------------------------------------------

    def stuck_rebalancing(self) -> bool:
        """A rebalance (or the recovery after it) has lasted longer than any healthy one: faust
        can wait forever there for an event that never gets acked."""
        since = self._rebalancing_since
        return since is not None and time.monotonic() - since > REBALANCE_STUCK_S

    async def unstick(self) -> None:
        """Feed each input partition's progress to the stall watch (stall.py) and apply the
        remedies it returns: a seek to the committed offset, a group rejoin, and finally an
        unhealthy /health. Runs on its own timer, every STALL_CHECK_EVERY_S: the end offsets
        come from the broker through faust's consumer thread, which can take a second."""
        now = time.monotonic()
        if self.app.rebalancing or self.app.in_recovery:
            self.stalls.reset()
            self._earliest.clear()
            if self._rebalancing_since is None:
                self._rebalancing_since = now
            if self.app.in_recovery:
                await self._unstick_recovery(now)
            else:
                self.recovery_stalls.reset()
            return
        self._rebalancing_since = None
        self.recovery_stalls.reset()
        consumer = self.app.consumer
        inputs = {self.settings.topics.calls, scopes_topic_name(self.settings)}
        # faust pauses partitions only while it rebalances or recovers (handled above), and
        # sets back-pressured ones aside only while the stream works through its buffer, which
        # moves the delivered offset. Either one held still for the stall period is stuck, so
        # they are watched too; the sets are faust's private state, read only.
        set_aside = set(getattr(consumer, "_paused_partitions", ())) | set(
            getattr(consumer, "_buffered_partitions", ())
        )
        tps = [tp for tp in consumer.assignment() if tp.topic in inputs]
        if not tps:
            self.stalls.reset()
            self.metrics.observe_lag({}, 0)
            return
        read = getattr(consumer, "_read_offset", {})
        committed = dict(getattr(consumer, "_committed_offset", {}))
        try:
            ends = await consumer.highwaters(*tps)
            unknown = [tp for tp in tps if committed.get(tp) is None and tp not in self._earliest]
            if unknown:
                self._earliest.update(await consumer.earliest_offsets(*unknown))
        except (TimeoutError, KafkaError, ConsumerNotStarted) as exc:
            # The broker is away; the next check asks again.
            log.info("stall check skipped: offsets unavailable (%s)", exc)
            return
        for tp in tps:
            if committed.get(tp) is None:
                committed[tp] = self._earliest.get(tp)
        views = {tp: PartitionView(read.get(tp), committed.get(tp), ends.get(tp)) for tp in tps}
        due = self.stalls.observe(views, now)
        self.metrics.observe_lag(views, len(self.stalls.unhealthy))
        for tp in set_aside & set(due):
            # A seek does not lift a pause; the rejoin further up the ladder does.
            log.warning("partition %s:%s is paused or set aside by faust", tp.topic, tp.partition)
        await self._apply_remedies("partition", due, views, lambda view: view.committed)

    async def _unstick_recovery(self, now: float) -> None:
        """The stall watch for the changelog partitions a table recovery reads: faust waits for
        them without a timeout, with every stream partition paused meanwhile."""
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]  # TableManager's
        views = recovery_views(
            list(recovery.active_tps), recovery.active_offsets, recovery.active_highwaters
        )
        due = self.recovery_stalls.observe(views, now)
        # faust's recovery offsets are those of the last record read: go on from the next.
        await self._apply_remedies(
            "recovery of",
            due,
            views,
            lambda view: None if view.delivered is None else view.delivered + 1,
        )

    async def _apply_remedies(
        self,
        what: str,
        due: dict[Any, Remedy],
        views: dict[Any, PartitionView],
        seek_to: Callable[[PartitionView], int | None],
    ) -> None:
        """Apply the stall watch's remedies: seek ``seek_to(view)``, rejoin, or report."""
        for tp, remedy in due.items():
            view = views[tp]
            name = f"{what} {tp.topic}:{tp.partition}"
            target = seek_to(view)
            if remedy is Remedy.SEEK and target is not None:
                log.warning(
                    "%s stalled (delivered %s, end %s); seeking to %s",
                    name,
                    view.delivered,
                    view.end,
                    target,
                )
                await seek_fetch_position(self.app, tp, target)
            elif remedy is Remedy.REJOIN:
                log.warning("%s still stalled after seeking; asking the group to rebalance", name)
                await request_rejoin(self.app)
            elif remedy is Remedy.UNHEALTHY:
                log.error(
                    "%s stalled for good (delivered %s, end %s): /health reports 503 so the "
                    "supervisor restarts this worker",
                    name,
                    view.delivered,
                    view.end,
                )

    async def sweep(self) -> None:
        """Re-decide local agents: period rollovers (RESUME), policy changes, and agents whose
        events arrived before the policies were loaded.

        Only keys with a standing command can roll over, so a tick looks at those alone; every
        agent is looked at when the policies or the assigned partitions changed, and at least
        every FULL_SWEEP_EVERY_S as a backstop.
        """
        if not self.book.ready.is_set() or self.app.rebalancing or self.app.in_recovery:
            return
        assigned = self.app.assignor.assigned_actives()
        actives = frozenset((tp.topic, tp.partition) for tp in assigned)
        now = time.monotonic()
        full = (
            self.book.version != self._swept_version
            or actives != self._swept_actives
            or now - self._full_sweep_at >= FULL_SWEEP_EVERY_S
        )
        async with self._lock:
            for ledger in self.ledgers:
                name = ledger.table.name
                if full:
                    keys = list(ledger.table.data.keys())
                else:
                    keys = sorted(k for t, k in self._standing if t == name)
                for key in keys:
                    await self._sweep_one(ledger, key, actives)
            await self._confirm()
        if full:
            self._swept_version = self.book.version
            self._swept_actives = actives
            self._full_sweep_at = now

    async def _sweep_one(
        self, ledger: _Ledger, key: str, actives: frozenset[tuple[str, int]]
    ) -> None:
        name = ledger.table.name
        raw = ledger.table.get(key)
        if raw is None:
            self._standing.discard((name, key))
            return
        state = self._load(ledger.table, key)
        if state.partition is None or (ledger.topic, state.partition) not in actives:
            # Revoked: another worker owns it now (see holds). A later assignment recovers it
            # from the changelog again.
            self._standing.discard((name, key))
            ledger.table.data.pop(key, None)
            self._decoded.pop((name, key), None)
            return
        settled = await self.settle(ledger.scope_of(key), state)
        settled = await self._revoke_over_allocated(ledger, key, settled)
        self._track(name, key, settled)
        if settled is not state:
            self._store(ledger.table, key, settled, state.partition)

    def _track(self, table: str, key: str, state: SpendState) -> None:
        command = state.last_command
        # Any standing command (not only STOP) lapses at its period's end.
        if command is not None and command.action is not ControlAction.RESUME:
            self._standing.add((table, key))
        else:
            self._standing.discard((table, key))

    # -- web --------------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        expected = f"Bearer {self.settings.api_token_value()}"
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), expected.encode())

    def state_of(self, scope: str) -> dict[str, Any] | None:
        """The live report for ``scope``, or None when it names no scope kind we sum."""
        kind, _, name = scope.partition(":")
        if not name:
            return None
        if kind == "agent":
            plane = self.plane
            found = plane.states.get(name) if plane is not None else None
            return spend_report(found, self.book.policies, scope, self.clock())
        if kind in {"pool", "workflow", "task_type"}:
            ledger, key = self.ledgers[0], scope
        else:
            return None
        table = ledger.table
        state = self._load(table, key) if table.get(key) is not None else None
        if state is not None and not self.holds(ledger, state):
            state = None  # another worker owns it now; this copy is stale
        return spend_report(state, self.book.policies, scope, self.clock())

    def holds(self, ledger: _Ledger, state: SpendState) -> bool:
        """Whether this worker owns the partition ``state`` lives on. After a rebalance faust
        keeps the revoked partitions' values in the in-memory table; they stop being updated,
        so they must be neither served nor re-decided (sweep drops them)."""
        actives = self.app.assignor.assigned_actives()
        return state.partition is not None and TP(ledger.topic, state.partition) in actives


def _unbudgeted(request: AllowanceRequest, now_ms: int) -> AllowanceGrant:
    return AllowanceGrant(
        holder=request.holder,
        seq=request.seq,
        scope=request.scope,
        budgets=(),
        ttl_ms=0,
        issued_at_ms=now_ms,
    )


Result = TypeVar("Result")


async def on_consumer_thread(app: faust.App, work: Callable[[Any], Awaitable[Result]]) -> Result:
    """Run ``work(aiokafka_consumer)`` on faust's consumer thread and return its result.

    faust runs aiokafka in a thread of its own; calling aiokafka from the app's thread races
    its fetcher (a seek landing while that thread drained fetched records made aiokafka raise
    KeyError and crashed the worker after a broker restart)."""
    thread = app.consumer._thread  # type: ignore[attr-defined]

    async def call() -> Result:
        return await work(thread._ensure_consumer())

    result: Result = await thread.call_thread(call)
    return result


async def committed_or_earliest(app: faust.App, tps: set[TP]) -> dict[TP, int]:
    """Each partition's committed offset in the group, or its earliest offset when the group
    never committed one (the consumer's auto_offset_reset is earliest)."""

    async def committed(consumer: Any) -> dict[TP, int | None]:
        return {tp: await consumer.committed(tp) for tp in tps}

    found = await on_consumer_thread(app, committed)
    missing = [tp for tp, offset in found.items() if offset is None]
    earliest = await app.consumer.earliest_offsets(*missing) if missing else {}
    return {tp: offset if offset is not None else earliest[tp] for tp, offset in found.items()}


async def seek_fetch_position(app: faust.App, tp: TP, offset: int) -> None:
    """Move the consumer's fetch position of ``tp`` to ``offset``, on faust's consumer thread.

    Not faust's ``Consumer.seek``: it calls aiokafka from the app's thread (see
    on_consumer_thread), and it also moves faust's read offset, which would look like progress
    to the stall watch. Records read again are recognised by the applied offsets in the state."""

    async def seek(consumer: Any) -> None:
        consumer.seek(tp, offset)

    await on_consumer_thread(app, seek)


async def request_rejoin(app: faust.App) -> None:
    """Make the consumer rejoin its group, which rebuilds every fetch position.

    faust has no public call for it; aiokafka's coordinator lives on faust's consumer thread,
    so the request runs there."""

    async def rejoin(consumer: Any) -> None:
        consumer._coordinator.request_rejoin()

    await on_consumer_thread(app, rejoin)


def partition_report(app: faust.App) -> dict[str, list[str]]:
    """Which partitions this worker is assigned, and which its consumer has set aside: a
    partition that is assigned but never fetched (the faust stall in the README) shows here."""
    consumer = app.consumer

    def names(tps: Any) -> list[str]:
        return sorted(f"{tp.topic}:{tp.partition}" for tp in (tps or ()))

    # faust keeps paused and back-pressured partitions in private sets; read, never written.
    return {
        "assigned": names(consumer.assignment()),
        "paused": names(getattr(consumer, "_paused_partitions", None)),
        "buffered": names(getattr(consumer, "_buffered_partitions", None)),
        "active": names(getattr(consumer, "_active_partitions", None)),
        "read_offsets": sorted(
            f"{tp.topic}:{tp.partition}@{offset}"
            for tp, offset in (getattr(consumer, "_read_offset", None) or {}).items()
        ),
        "committed_offsets": sorted(
            f"{tp.topic}:{tp.partition}@{offset}"
            for tp, offset in (getattr(consumer, "_committed_offset", None) or {}).items()
        ),
    }


def build_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    calls_partitions: int | None = None,
    future_tolerance_ms: int = FUTURE_TOLERANCE_MS,
) -> faust.App:
    """Build (but do not start) the processor app. Reads the calls topic's partition count
    from the broker unless ``calls_partitions`` is given, and creates the scopes topic (the
    second hop) if it is missing."""
    partitions = calls_partitions or calls_partition_count(settings)
    ensure_scopes_topic(settings, partitions, tables=(SPEND_TABLE, SCOPE_SPEND_TABLE))
    # LedgerApp: faust's App, except that resuming flow keeps queued events (see flow.py).
    app = LedgerApp(
        f"{settings.topic_prefix}processor",
        broker=[f"kafka://{server.strip()}" for server in settings.kafka.split(",")],
        broker_credentials=settings.faust_credentials(),
        store="memory://",
        datadir=str(settings.home.resolve() / "processor"),
        autodiscover=False,
        # A few ms of linger turn a batch's changelog writes and forwards into a few produce
        # requests instead of one each (py-spy: socket writes were ~10% of the worker); the
        # shim must see a STOP within 2 s of the crossing event, and this adds 5 ms.
        producer_linger=0.005,
        broker_commit_interval=1.0,
        # A group joined while a restarted broker still lists no partitions for the input
        # topics assigns this worker nothing; only a metadata refresh that sees them again
        # triggers the rejoin. faust's default (5 min) left a worker started just before a
        # broker restart idle for that long; a refresh is one small request.
        consumer_metadata_max_age_ms=METADATA_MAX_AGE_MS,
        # Static membership: a worker restarted after a crash takes its partitions back at
        # once instead of waiting for the dead member's session to expire. Host and port
        # identify a worker (two on one host cannot share the web port).
        consumer_group_instance_id=(
            f"{settings.topic_prefix}processor-{socket.gethostname()}-{settings.processor_port}"
        ),
        # A worker that is gone for good loses its partitions after this long.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        stream_buffer_maxsize=1024,
        # Drain in-flight events before a rebalance completes (faust's default). With False, a
        # survivor that took over a killed worker's partitions under load never consumed some
        # of them in 2 of 3 runs of the two-worker test; True passed 4 runs alone but still
        # failed once in the full suite, so the stall is not fully understood (see README).
        stream_wait_empty=True,
        table_standby_replicas=0,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        web_enabled=True,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        web_port=settings.processor_port,
        # faust's built-in pages expose tables and internals without authentication.
        web_router_enabled=False,
        web_tables_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        web_metrics_enabled=False,
    )
    proc = Processor(app, settings, clock or wall_clock_ms, partitions, future_tolerance_ms)
    app.processor = proc  # type: ignore[attr-defined]  # for tests and tooling
    # Held-back records are acked with their batch; commits stop at the first record not yet
    # counted (commits.py).
    app.commit_bound = proc.order.commit_bound
    # Routing stats: counted by on_calls from its parsed events rather than by an agent of
    # their own, which cost a second faust stream and a second parse per calls record.
    proc.stats = register_stats(
        app, settings, proc.clock, proc.dead_letter, own_agent=False, publish=False
    )
    proc.plane = plane = build_data_plane(
        settings, proc, partitions, future_tolerance_ms, loop=app.loop
    )

    # Batches: per-event overhead (a state decode, a changelog write and three forwards per
    # event) held the worker to ~500 events/s; per batch it is paid once per key. take_events
    # acks a batch's events only after the body returns, and the body waits for its writes.
    # The calls topic is counted by the batch data plane in a thread of its own (see
    # data_plane.py); the stop flag ends it within a cycle when the worker stops.
    @app.task  # type: ignore[untyped-decorator]
    async def data_plane() -> None:
        try:
            await asyncio.to_thread(plane.run)
        finally:
            plane.stop()

    # Batches: faust's per-event hand-over costs more than the counting; take_events acks a
    # batch's events only after the body returns, and the body waits for its writes.
    @app.agent(proc.scopes, concurrency=1)
    async def process_scope_costs(stream: Any) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            await proc.on_scope_costs([Record.of(event) for event in events])

    @app.agent(proc.allowance_requests, concurrency=1)
    async def process_allowance_requests(stream: Any) -> None:
        async for events in stream.take_events(BATCH_MAX, within=ALLOWANCE_BATCH_WITHIN_S):
            await proc.on_allowance_requests([Record.of(event) for event in events])

    @app.task  # type: ignore[untyped-decorator]
    async def deliver_alerts() -> None:
        if proc.webhook is not None:
            await proc.webhook.run()

    @app.task  # type: ignore[untyped-decorator]  # faust types app.task loosely
    async def load_policies() -> None:
        await follow_policies(
            proc.book,
            bootstrap=settings.kafka,
            topic=settings.topics.policies,
            on_invalid=proc.reject_policy,
            client_options=settings.aiokafka_options(),
        )

    @app.timer(interval=SWEEP_INTERVAL_S)  # type: ignore[untyped-decorator]
    async def sweep() -> None:
        await proc.sweep()

    # A lowered policy must take allowances back at once, not at the next 1 s sweep: the
    # processes holding them spend meanwhile.
    @app.timer(interval=POLICY_CHECK_EVERY_S)  # type: ignore[untyped-decorator]
    async def sweep_on_policy_change() -> None:
        if proc.book.version != proc._swept_version:
            await proc.sweep()

    @app.timer(interval=STALL_CHECK_EVERY_S)  # type: ignore[untyped-decorator]
    async def watch_stalls() -> None:
        await proc.unstick()

    @app.page("/health")
    async def health(web: View, request: Request) -> Response:
        try:
            partitions = partition_report(app)
        except ConsumerNotStarted:
            # The web server starts before the consumer thread; a probe in that gap gets a
            # retryable answer instead of a 500.
            return web.json({"status": "starting", "policies_loaded": False}, status=503)
        stalled = sorted(
            f"{tp.topic}:{tp.partition}"
            for tp in proc.stalls.unhealthy | proc.recovery_stalls.unhealthy
        )
        stuck = proc.stuck_rebalancing()
        plane_health = plane.health()
        status = (
            "stalled"
            if stalled
            else "stuck rebalancing"
            if stuck
            else f"data plane failed: {plane.error}"
            if plane.error
            else "data plane stuck"
            if plane_health["stuck"]
            else "data plane starting"
            if not plane_health["joined"]
            else "ok"
        )
        return web.json(
            {
                "status": status,
                "stalled_partitions": stalled,
                "policies": len(proc.book),
                "policies_loaded": proc.book.ready.is_set(),
                "rebalancing": bool(app.rebalancing),
                "in_recovery": bool(app.in_recovery),
                "partitions": partitions,
                "data_plane": plane_health,
            },
            status=200 if status == "ok" else 503,
        )

    @app.page("/metrics")
    async def metrics(web: View, request: Request) -> Response:
        if not metrics_authorized(settings, request.headers.get("Authorization")):
            return web.json({"error": "missing or wrong bearer token"}, status=401)
        # aiohttp refuses parameters in content_type=, so the full type goes in the header.
        return web.bytes(
            render(proc.metrics.registry), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    # Agent ids may contain "/", so the scope takes the rest of the path.
    @app.page("/state/{scope:.+}")
    async def state(web: View, request: Request, scope: str) -> Response:
        if not proc.authorized(request):
            return web.json({"error": "missing or wrong bearer token"}, status=401)
        report = proc.state_of(scope)
        if report is None:
            return web.json(
                {
                    "error": "scope must look like 'agent:<id>', 'pool:<id>', "
                    f"'workflow:<id>' or 'task_type:<id>', got {scope!r}"
                },
                status=404,
            )
        return web.json(report)

    # For the dashboard: every scope this worker holds, in one request per refresh. Buckets and
    # applied offsets are left out: the dashboard polls this every half second.
    @app.page("/scopes")
    async def scopes(web: View, request: Request) -> Response:
        if not proc.authorized(request):
            return web.json({"error": "missing or wrong bearer token"}, status=401)
        now = proc.clock()
        reports = []
        for ledger in proc.ledgers:
            for key, raw in list(ledger.table.data.items()):
                state = decode_state(raw)
                if not proc.holds(ledger, state):
                    continue
                report = spend_report(state, proc.book.policies, ledger.scope_of(key), now)
                del report["buckets"], report["applied_offsets"]
                reports.append(report)
        for agent_id, state in list(plane.states.items()):
            report = spend_report(state, proc.book.policies, f"agent:{agent_id}", now)
            del report["buckets"], report["applied_offsets"]
            reports.append(report)
        reports.sort(key=lambda r: str(r["scope"]))
        return web.json({"now_ms": now, "scopes": reports})

    return app


def data_plane_topics(settings: Settings) -> DataPlaneTopics:
    """What the data plane reads and writes. The agents' changelog keeps the name faust gave
    the spend table's, so a worker upgraded from the faust hop restores from it."""
    topics = settings.topics
    return DataPlaneTopics(
        calls=topics.calls,
        requests=topics.allowance_requests,
        changelog=changelog_topic_name(settings, SPEND_TABLE),
        scopes=scopes_topic_name(settings),
        control=topics.control,
        alerts=topics.alerts,
        allowances=topics.allowances,
        dlq=topics.dlq,
        stats=topics.stats,
    )


def build_data_plane(
    settings: Settings,
    proc: Processor,
    partitions: int,
    future_tolerance_ms: int,
    *,
    loop: asyncio.AbstractEventLoop,
) -> DataPlane:
    """The data plane of ``proc``'s worker, on confluent-kafka clients."""
    from confluent_kafka import Consumer, Producer

    webhook = proc.webhook

    def on_alert(alert: Alert) -> None:
        # From the data plane's thread: the webhook's queue belongs to the event loop.
        if webhook is not None:
            loop.call_soon_threadsafe(webhook.offer, alert)

    return DataPlane(
        settings,
        topics=data_plane_topics(settings),
        partitions=partitions,
        book=proc.book,
        clock=proc.clock,
        metrics=proc.metrics,
        new_consumer=lambda: Consumer(calls_consumer_config(settings)),
        new_requests_consumer=lambda: Consumer(requests_consumer_config(settings)),
        new_restore_consumer=lambda: Consumer(restore_consumer_config(settings)),
        new_producer=lambda: Producer(transactional_producer_config(settings)),
        new_forwards_producer=lambda: Producer(forwards_producer_config(settings)),
        stats=proc.stats,
        on_alert=on_alert,
        future_tolerance_ms=future_tolerance_ms,
        allowance_ttl_ms=proc.allowance_ttl_ms,
        allowance_partitions=proc.allowance_partitions,
    )
