"""The faust worker: hosts the batch data plane (both spend hops, data_plane.py) and runs the
low-rate rest: policies from the policies topic, webhooks, routing stats, the HTTP views.

faust consumes no calls, deltas or requests any more: its per-message path costs ~150 us per
event, and its consumer needed repairs around rebalances (ordering, stalls, commit bounds) that
a transactional confluent-kafka loop does not (stream_processors/README.md, "Data plane").
Known faust traps still avoided where faust is used: no windowed tables, no exactly_once, no
agent concurrency > 1.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import faust
from faust.web import Request, Response, View
from pydantic import ValidationError

from agentledger.config import Settings
from agentledger.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agentledger.metrics import metrics_authorized, render
from agentledger.schemas import Alert, dead_letter
from agentledger.schemas.topics import ALLOWANCE_PARTITIONS

from .batch_kafka import (
    calls_consumer_config,
    command_producer_config,
    requests_consumer_config,
    restore_consumer_config,
    transactional_producer_config,
)
from .counting import FUTURE_TOLERANCE_MS
from .data_plane import REPLACE_AFTER_S, DataPlane, DataPlaneTopics
from .decide import Decider, Outgoing
from .declare import TopicMissing
from .dlq_rate import DlqRate
from .flow import LedgerApp
from .metrics import ProcessorMetrics, dlq_reason_class
from .policies import InvalidPolicy, PolicyBook, follow_policies
from .report import spend_report
from .scopes import changelog_topic_name, ensure_scopes_topic, scopes_topic_name
from .stats import StatsAggregator, register_stats
from .webhook import WebhookDelivery

__all__ = [
    "COMPONENT",
    "SCOPE_SPEND_TABLE",
    "SPEND_TABLE",
    "Processor",
    "build_app",
    "build_data_plane",
    "calls_partition_count",
    "data_plane_topics",
    "keep_data_plane",
    "wall_clock_ms",
]

log = logging.getLogger(__name__)

COMPONENT = "processor"
Clock = Callable[[], int]
# How often the watchdog looks at the data plane, and how long it waits between replacements.
WATCHDOG_EVERY_S = 5.0
REPLACE_BACKOFF_S = 30.0
# How often the producer refreshes topic metadata.
METADATA_MAX_AGE_MS = 15_000
# The changelog topics keep faust's names (``<app id>-<table>-changelog``) so a stack that
# ran the faust hops restores from them.
SPEND_TABLE = "spend"  # per agent id
SCOPE_SPEND_TABLE = "scope-spend"  # per pool / workflow / task type scope


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def calls_partition_count(settings: Settings, timeout_s: float = 30.0) -> int:
    """Partitions of the calls topic; the changelogs and the scopes topic must have as many."""
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
    """What the faust worker holds beside the data plane: policies, webhooks, metrics, and
    the dead letters and alerts of its own low-rate work (policies, routing stats)."""

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
        self._unconfirmed: list[Any] = []
        # Routing stats, counted by the data plane (see build_app).
        self.stats: StatsAggregator | None = None
        # Prometheus metrics (GET /metrics), shared with the data plane.
        self.metrics = ProcessorMetrics()
        topics = settings.topics
        self.dlq = app.topic(topics.dlq, key_serializer="raw", value_serializer="raw")
        self.alerts = app.topic(topics.alerts, key_serializer="raw", value_serializer="raw")
        self.control = app.topic(topics.control, key_serializer="raw", value_serializer="raw")
        self.allowance_ttl_ms = int(settings.allowance_ttl_s * 1000)
        self.partitions = partitions
        self.allowance_partitions = allowance_partitions
        self.decider = Decider(
            self.book,
            self._key,
            control_topic=topics.control,
            alerts_topic=topics.alerts,
            metrics=self.metrics,
            clock=clock,
        )
        #: The batch data plane counting both hops (None in apps built without it).
        self.plane: DataPlane | None = None

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

    async def _send(self, item: Outgoing) -> None:
        topic = self.control if item.command is not None else self.alerts
        self._unconfirmed.append(await topic.send(key=item.key, value=item.value))

    def offer_alert(self, value: bytes | None) -> None:
        """Hand an alerts-topic record to the webhook (never waits; the queue is bounded)."""
        if self.webhook is None or not value:
            return
        try:
            alert = Alert.model_validate_json(value)
        except ValidationError as exc:
            # Written by our own components only; a foreign record is not ours to post.
            log.warning("alerts record is not an Alert, not posted: %s", exc)
            return
        self.webhook.offer(alert)

    async def _confirm(self) -> None:
        """Wait until everything sent so far is acknowledged by Kafka."""
        pending, self._unconfirmed = self._unconfirmed, []
        if pending:
            await asyncio.gather(*pending)

    def authorized(self, request: Request) -> bool:
        expected = f"Bearer {self.settings.api_token_value()}"
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), expected.encode())

    def state_of(self, scope: str) -> dict[str, Any] | None:
        """The live report for ``scope``, or None when it names no scope kind we sum."""
        kind, _, name = scope.partition(":")
        if not name or kind not in {"agent", "pool", "workflow", "task_type"}:
            return None
        plane = self.plane
        if plane is None:
            found = None
        elif kind == "agent":
            found = plane.states.get(name)
        else:
            found = plane.scope_states.get(scope)
        return spend_report(found, self.book.policies, scope, self.clock())

    def reports(self) -> list[dict[str, Any]]:
        """Every scope this worker holds, without buckets and offsets (the dashboard's view)."""
        plane = self.plane
        if plane is None:
            return []
        now = self.clock()
        reports = []
        held = [(f"agent:{a}", s) for a, s in list(plane.states.items())]
        held += list(plane.scope_states.items())
        for scope, state in held:
            report = spend_report(state, self.book.policies, scope, now)
            del report["buckets"], report["applied_offsets"]
            reports.append(report)
        reports.sort(key=lambda r: str(r["scope"]))
        return reports


def build_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    calls_partitions: int | None = None,
    future_tolerance_ms: int = FUTURE_TOLERANCE_MS,
) -> faust.App:
    """Build (but do not start) the processor app. Reads the calls topic's partition count
    from the broker unless ``calls_partitions`` is given, and creates the scopes topic and
    the changelogs if they are missing."""
    partitions = calls_partitions or calls_partition_count(settings)
    ensure_scopes_topic(settings, partitions, tables=(SPEND_TABLE, SCOPE_SPEND_TABLE))
    # LedgerApp: faust's App with a read_committed consumer and a producer that rides out a
    # broker gone while the worker starts (flow.py, declare.py).
    app = LedgerApp(
        f"{settings.topic_prefix}processor",
        broker=[f"kafka://{server.strip()}" for server in settings.kafka.split(",")],
        broker_credentials=settings.faust_credentials(),
        store="memory://",
        datadir=str(settings.home.resolve() / "processor"),
        autodiscover=False,
        producer_linger=0.005,
        consumer_metadata_max_age_ms=METADATA_MAX_AGE_MS,
        consumer_group_instance_id=(
            f"{settings.topic_prefix}processor-{socket.gethostname()}-{settings.processor_port}"
        ),
        # Its one input is the alerts topic, for webhooks: a new group starts at the end, so a
        # first start does not post the history.
        consumer_auto_offset_reset="latest",
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        table_standby_replicas=0,
        topic_disable_leader=True,
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
    # Routing stats: counted by the data plane from its parsed calls; this registers the
    # stats-topic follower (the data plane publishes in its transactions).
    proc.stats = register_stats(app, settings, proc.clock, proc.dead_letter)
    proc.plane = build_data_plane(settings, proc, partitions, future_tolerance_ms)

    # Both hops are counted by the batch data plane in a daemon thread of its own
    # (data_plane.py); the stop flag ends it within a cycle when the worker stops.
    @app.task  # type: ignore[untyped-decorator]
    async def data_plane() -> None:
        try:
            await keep_data_plane(
                proc, lambda: build_data_plane(settings, proc, partitions, future_tolerance_ms)
            )
        finally:
            if proc.plane is not None:
                proc.plane.stop()

    # Webhooks post the committed alerts of every worker (read_committed), each once per
    # group: whichever worker holds the alert's partition posts it.
    @app.agent(proc.alerts, concurrency=1)
    async def post_alerts(stream: Any) -> None:
        async for value in stream:
            proc.offer_alert(value)

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

    @app.page("/health")
    async def health(web: View, request: Request) -> Response:
        plane = proc.plane
        assert plane is not None
        plane_health = plane.health()
        status = (
            f"data plane failed: {plane.error}"
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
                "policies": len(proc.book),
                "policies_loaded": proc.book.ready.is_set(),
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
        return web.json({"now_ms": proc.clock(), "scopes": proc.reports()})

    return app


async def keep_data_plane(
    proc: Processor, build: Callable[[], DataPlane], *, every_s: float = WATCHDOG_EVERY_S
) -> None:
    """Run ``proc.plane`` in a thread and replace it (with ``build()``) when it hangs or fails.

    librdkafka can block in ``send_offsets_to_transaction`` past its timeout (#5456) or for
    good when the coordinator's broker goes away (#5511), and a blocked C call cannot be
    interrupted. So a cycle older than REPLACE_AFTER_S, or a data plane that stopped with an
    error, is given up: a new one (new clients, same transactional id and group instance id)
    fences the old producer, aborting its open transaction, takes the group membership over,
    restores the states from the changelogs and goes on from the committed offsets. The old
    thread is a daemon; if its call ever returns, its stop flag makes it exit unretried.
    """
    plane = proc.plane
    assert plane is not None
    threading.Thread(target=plane.run, name="data-plane", daemon=True).start()
    replaced_at = 0.0
    while True:
        await asyncio.sleep(every_s)
        plane = proc.plane
        assert plane is not None
        hung = plane.stuck(REPLACE_AFTER_S)
        if not (hung or plane.error) or time.monotonic() - replaced_at < REPLACE_BACKOFF_S:
            continue
        log.error(
            "data plane %s; starting a new one in its place",
            f"cycle hung for over {REPLACE_AFTER_S:.0f} s" if hung else f"failed: {plane.error}",
        )
        plane.stop()
        proc.metrics.plane_replaced.inc()
        proc.plane = plane = build()
        threading.Thread(target=plane.run, name="data-plane", daemon=True).start()
        replaced_at = time.monotonic()


def data_plane_topics(settings: Settings) -> DataPlaneTopics:
    """What the data plane reads and writes. The agents' changelog keeps the name faust gave
    the spend table's, so a worker upgraded from the faust hop restores from it."""
    topics = settings.topics
    return DataPlaneTopics(
        calls=topics.calls,
        requests=topics.allowance_requests,
        changelog=changelog_topic_name(settings, SPEND_TABLE),
        scopes=scopes_topic_name(settings),
        scope_changelog=changelog_topic_name(settings, SCOPE_SPEND_TABLE),
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
) -> DataPlane:
    """The data plane of ``proc``'s worker, on confluent-kafka clients."""
    from confluent_kafka import Consumer, Producer

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
        new_command_producer=lambda: Producer(command_producer_config(settings)),
        stats=proc.stats,
        future_tolerance_ms=future_tolerance_ms,
        allowance_ttl_ms=proc.allowance_ttl_ms,
        allowance_partitions=proc.allowance_partitions,
    )
