"""The commands that stand for each budget scope, as read from the compacted control topic.

Only commands signed with the shared control key count. Anyone who can write to the topic but
lacks the key cannot stop an agent, nor lift a STOP by replaying an older RESUME.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any, Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from pydantic import ValidationError

from agentledger.config import Settings
from agentledger.schemas import ControlAction, ControlCommand, SignatureError, verify_command
from agentledger.schemas.control import SUBTREE_KIND

from .client_log import client_log

__all__ = ["ControlState", "KafkaControlListener", "RecordSink"]

log = logging.getLogger(__name__)

METRIC_NAMES = (
    "accepted",
    "rejected_unsigned",
    "rejected_forged",
    "rejected_replayed",
    "rejected_invalid",
)


class ControlState:
    """Verified standing commands per scope. Thread-safe: the listener writes, agents read."""

    def __init__(self, control_key: bytes) -> None:
        if len(control_key) < 16:
            raise ValueError(
                "control_key must be at least 16 bytes (the key the processor signs with)"
            )
        self._key = control_key
        self._lock = threading.Lock()
        self._standing: dict[str, ControlCommand] = {}
        # Subtree scopes with a standing command: while there are none, agents need not list
        # the subtrees they are in (see AgentLedger.scopes).
        self._subtrees: set[str] = set()
        # The newest accepted command per scope, kept after a RESUME clears the standing one, so
        # a replay of the older STOP is still recognised.
        self._latest: dict[str, tuple[int, uuid.UUID]] = {}
        # The latest spend the processor reported per scope (any command carrying spend and
        # limit), for the local reservation check; a RESUME starts a new period and drops it.
        self._reports: dict[str, ControlCommand] = {}
        self.metrics: dict[str, int] = dict.fromkeys(METRIC_NAMES, 0)

    @classmethod
    def from_settings(cls, settings: Settings) -> ControlState:
        return cls(settings.control_key_bytes())

    def _count(self, metric: str) -> None:
        with self._lock:
            self.metrics[metric] += 1

    def apply(self, command_bytes: bytes) -> bool:
        """Apply one control-topic value; return whether it was accepted."""
        try:
            command = ControlCommand.model_validate_json(command_bytes)
        except ValidationError as exc:
            self._count("rejected_invalid")
            log.warning(
                "agentledger: ignoring malformed control command: %s",
                exc.errors(include_url=False, include_input=False),
            )
            return False
        if not command.signature:
            self._count("rejected_unsigned")
            log.warning(
                "agentledger: ignoring unsigned control command %s for %s",
                command.command_id,
                command.scope,
            )
            return False
        try:
            verify_command(command, self._key)
        except SignatureError as exc:
            self._count("rejected_forged")
            log.warning("agentledger: ignoring control command: %s", exc)
            return False
        with self._lock:
            latest = self._latest.get(command.scope)
            if latest is not None and (
                command.issued_at_ms < latest[0] or command.command_id == latest[1]
            ):
                self.metrics["rejected_replayed"] += 1
                return False
            self._latest[command.scope] = (command.issued_at_ms, command.command_id)
            subtree = command.scope.startswith(f"{SUBTREE_KIND}:")
            if command.action is ControlAction.RESUME:
                self._standing.pop(command.scope, None)
                self._reports.pop(command.scope, None)
                self._subtrees.discard(command.scope)
            else:
                self._standing[command.scope] = command
                if subtree:
                    self._subtrees.add(command.scope)
                if command.spend_nano_usd is not None and command.limit_nano_usd is not None:
                    self._reports[command.scope] = command
            self.metrics["accepted"] += 1
        return True

    def report(self, scope: str, now_ms: int) -> ControlCommand | None:
        """The latest unlapsed command for ``scope`` that stated its spend and limit."""
        found = self._reports.get(scope)
        if found is None or (found.until_ms is not None and found.until_ms <= now_ms):
            return None
        return found

    @property
    def has_reports(self) -> bool:
        return bool(self._reports)

    @property
    def has_standing(self) -> bool:
        return bool(self._standing)

    @property
    def has_subtree(self) -> bool:
        """Whether a command stands for some subtree (``subtree:<workflow>|<agent>``)."""
        return bool(self._subtrees)

    def standing(self, scopes: Iterable[str], now_ms: int | None = None) -> list[ControlCommand]:
        """The commands standing for ``scopes``, in that order; with ``now_ms``, lapsed ones
        (``until_ms <= now_ms``) are left out."""
        with self._lock:
            found = [self._standing[s] for s in scopes if s in self._standing]
        if now_ms is None:
            return found
        return [c for c in found if c.until_ms is None or c.until_ms > now_ms]


class RecordSink(Protocol):
    """What a listener feeds each record value to (ControlState; the router's StatsBook)."""

    def apply(self, value: bytes, /) -> bool: ...


class KafkaControlListener:
    """A daemon thread that reads every partition of the control topic from the beginning.

    It joins no consumer group (manual assignment, nothing committed), so each agent process
    sees every standing command, and starting many agents costs the cluster no rebalances.
    ``topic`` lets the router follow the compacted stats topic the same way.
    """

    POLL_TIMEOUT_S = 0.1
    # How often a quiet listener asks the broker for metadata, to know it is still reachable.
    HEARTBEAT_S = 2.0
    RETRY_S = 1.0
    # Retriable metadata errors this soon after start are a topic still settling, not a fault.
    SETTLE_S = 10.0
    # Short, so close() never waits long on a listener stuck asking a dead broker; not
    # shorter, since a live broker on a loaded machine took over 0.5 s to answer.
    METADATA_TIMEOUT_S = 1.0
    # While librdkafka reports every broker down, a request can only time out, and close()
    # must not wait for it. Only that report (not a timeout, which load can cause) selects it.
    DOWN_METADATA_TIMEOUT_S = 0.25

    def __init__(
        self, settings: Settings, state: RecordSink, *, topic: str | None = None, **config: Any
    ) -> None:
        self._topic = topic or settings.topics.control
        self._state = state
        self._config: dict[str, Any] = {
            **settings.kafka_client_config(),
            "bootstrap.servers": settings.kafka,
            "group.id": f"agentledger-shim-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "client.id": "agentledger-shim-control",
            # librdkafka would otherwise reach the agent's stderr, a line per retry.
            "logger": client_log(settings.kafka),
            "error_cb": self._on_client_error,
            **config,
        }
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        self.last_error: str | None = None
        self.started_at = time.monotonic()
        self._next_heartbeat = 0.0
        self.last_ok: float | None = None
        """``time.monotonic()`` of the last answer from the broker"""
        self._brokers_down = False

    def _on_client_error(self, err: KafkaError) -> None:
        # Served by poll(); connection failures also arrive as log lines (the ClientLog
        # says them), so this only notes the outage.
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._brokers_down = True
        log.debug("agentledger: control listener client: %s", err)

    def _metadata_timeout_s(self) -> float:
        return self.DOWN_METADATA_TIMEOUT_S if self._brokers_down else self.METADATA_TIMEOUT_S

    def _answered(self) -> None:
        self._brokers_down = False
        self.last_ok = time.monotonic()

    def unreachable_for_s(self) -> float:
        """Seconds since the broker last answered (since the start if it never did)."""
        since = self.last_ok if self.last_ok is not None else self.started_at
        return time.monotonic() - since

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="agentledger-control", daemon=True)
        self._thread.start()

    def wait_caught_up(self, timeout_s: float) -> bool:
        """Block until every command that existed when the listener started has been applied."""
        return self._caught_up.wait(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _note_error(self, what: str) -> None:
        # While the broker is down the same error comes back every retry; say it once.
        level = logging.DEBUG if what == self.last_error else logging.WARNING
        self.errors += 1
        self.last_error = what
        log.log(level, "agentledger: control listener: %s", what)

    def _run(self) -> None:
        consumer: Consumer | None = None
        try:
            consumer = Consumer(self._config)
            targets = self._assign(consumer)
            if targets is None:
                return
            while not self._stop.is_set():
                self._poll_once(consumer, targets)
                if time.monotonic() >= self._next_heartbeat:
                    self._heartbeat(consumer)
        except KafkaException as exc:
            # A broken client (bad config, fatal error): the agent keeps running, unprotected
            # by remote commands, and says so.
            self._note_error(f"stopped: {exc}")
        finally:
            if consumer is not None:
                consumer.close()

    def _heartbeat(self, consumer: Consumer) -> None:
        self._next_heartbeat = time.monotonic() + self.HEARTBEAT_S
        try:
            consumer.list_topics(self._topic, timeout=self._metadata_timeout_s())
        except KafkaException as exc:
            self._note_error(f"control topic unreachable: {exc}")
            return
        self._answered()

    def _assign(self, consumer: Consumer) -> dict[int, int] | None:
        """Assign all partitions from the beginning; return the end offset per partition that
        catching up means, or None when stopped before the topic could be read."""
        while not self._stop.is_set():
            try:
                metadata = consumer.list_topics(self._topic, timeout=self._metadata_timeout_s())
                topic = metadata.topics.get(self._topic)
                if topic is None or topic.error is not None or not topic.partitions:
                    why = topic.error if topic is not None else "missing"
                    self._note_error(f"control topic {self._topic} not readable yet: {why}")
                else:
                    targets: dict[int, int] = {}
                    for partition in topic.partitions:
                        low, high = consumer.get_watermark_offsets(
                            TopicPartition(self._topic, partition),
                            timeout=self._metadata_timeout_s(),
                        )
                        if high > low:
                            targets[partition] = high
                    consumer.assign(
                        [TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in topic.partitions]
                    )
                    if not targets:
                        self._caught_up.set()
                    self._answered()
                    return targets
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                settling = time.monotonic() - self.started_at < self.SETTLE_S
                if settling and isinstance(error, KafkaError) and _settling_error(error):
                    # A topic created moments ago answers NOT_LEADER until its leader is
                    # known everywhere; only an error that outlasts that is worth counting.
                    log.debug("agentledger: control listener: retrying: %s", exc)
                else:
                    self._note_error(f"cannot read control topic metadata: {exc}")
            self._serve(consumer)
            self._stop.wait(self.RETRY_S)
        return None

    def _serve(self, consumer: Consumer) -> None:
        """Serve the client's queue before there is an assignment to poll: its log lines and
        error events wait there, and an outage would otherwise be told only at close."""
        msg = consumer.poll(0)
        if msg is not None and msg.error() is not None:
            log.debug("agentledger: control listener: %s", msg.error())

    def _poll_once(self, consumer: Consumer, targets: dict[int, int]) -> None:
        msg = consumer.poll(self.POLL_TIMEOUT_S)
        if msg is None:
            return
        err = msg.error()
        partition = msg.partition()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                self._reached(targets, partition, None)
            else:
                self._note_error(str(err))
            return
        value = msg.value()
        # Tombstones are unsigned, so they never lift a STOP; compaction uses them only to
        # forget a scope after its RESUME.
        if value is not None:
            self._state.apply(value)
        offset = msg.offset()
        self._reached(targets, partition, None if offset is None else offset + 1)

    def _reached(
        self, targets: dict[int, int], partition: int | None, next_offset: int | None
    ) -> None:
        note_reached(targets, partition, next_offset, self._caught_up)


def note_reached(
    targets: dict[int, int],
    partition: int | None,
    next_offset: int | None,
    caught_up: threading.Event,
) -> None:
    """Catching up a topic read from the beginning: ``targets`` holds each partition's end
    offset at start. Drop ``partition`` once ``next_offset`` reaches it (None: end of
    partition); set ``caught_up`` when none is left."""
    if caught_up.is_set() or partition is None or partition not in targets:
        return
    if next_offset is None or next_offset >= targets[partition]:
        del targets[partition]
        if not targets:
            caught_up.set()


# What a topic created moments ago answers until its leader is known everywhere. librdkafka
# does not flag all of them retriable: a watermark query got NOT_LEADER_FOR_PARTITION,
# unflagged, on a one-broker cluster under load.
_SETTLING_CODES = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._TIMED_OUT,
    }
)


def _settling_error(error: KafkaError) -> bool:
    return bool(error.retriable()) or error.code() in _SETTLING_CODES
