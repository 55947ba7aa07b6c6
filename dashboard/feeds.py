"""What the dashboard reads from Kafka: the standing command per scope (control topic, read from
the beginning), the latest alerts (the tail of the alerts topic) and the calls shims hold
paused (pauses topic, read from the beginning).

Each feed is a daemon thread with its own consumer, assigned every partition (no consumer group
membership, nothing committed), so many dashboards cost the cluster no rebalances.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from pydantic import ValidationError

from agentledger.schemas import (
    Alert,
    ControlAction,
    ControlCommand,
    PauseRecord,
    SignatureError,
    verify_command,
)

__all__ = ["AlertLog", "CommandBoard", "PauseBoard", "TopicFeed"]

log = logging.getLogger(__name__)

OnRecord = Callable[[bytes], None]
OnMessage = Callable[[bytes | None, bytes | None], None]


class CommandBoard:
    """The latest verified command per scope, as the shim sees it (newest issued_at_ms wins)."""

    def __init__(self, control_key: bytes) -> None:
        self._key = control_key
        self._lock = threading.Lock()
        self._latest: dict[str, ControlCommand] = {}
        self.rejected = 0  # malformed, unsigned or forged values seen on the topic

    def apply(self, value: bytes) -> None:
        try:
            command = ControlCommand.model_validate_json(value)
            verify_command(command, self._key)
        except (ValidationError, SignatureError) as exc:
            with self._lock:
                self.rejected += 1
            log.warning("dashboard: ignoring a control command: %s", str(exc)[:300])
            return
        with self._lock:
            current = self._latest.get(command.scope)
            if current is None or command.issued_at_ms >= current.issued_at_ms:
                self._latest[command.scope] = command

    def standing(self, now_ms: int) -> dict[str, ControlCommand]:
        """Commands in force: not a RESUME and not lapsed."""
        with self._lock:
            latest = list(self._latest.values())
        return {
            c.scope: c
            for c in latest
            if c.action is not ControlAction.RESUME and (c.until_ms is None or c.until_ms > now_ms)
        }


class AlertLog:
    """The newest alerts, newest first."""

    def __init__(self, keep: int = 50) -> None:
        self._lock = threading.Lock()
        self._alerts: deque[Alert] = deque(maxlen=keep)
        self.rejected = 0

    def apply(self, value: bytes) -> None:
        try:
            alert = Alert.model_validate_json(value)
        except ValidationError as exc:
            with self._lock:
                self.rejected += 1
            log.warning("dashboard: ignoring an alert: %s", str(exc)[:300])
            return
        with self._lock:
            self._alerts.append(alert)

    def latest(self) -> list[Alert]:
        with self._lock:
            alerts = list(self._alerts)
        return sorted(alerts, key=lambda a: a.issued_at_ms, reverse=True)


class PauseBoard:
    """The pauses shims publish, one per (process, scope), newest record per key; a tombstone
    removes one, and ``live`` leaves out (and forgets) those gone stale."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[bytes, PauseRecord] = {}
        self.rejected = 0
        self.last_rejection: str | None = None

    def _reject(self, why: str) -> None:
        with self._lock:
            self.rejected += 1
            self.last_rejection = why[:300]
        log.warning("dashboard: ignoring a pause record: %s", why[:300])

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            self._reject("a record without a key (expected '<process>|<scope>')")
            return
        if value is None:  # the pause ended
            with self._lock:
                self._records.pop(key, None)
            return
        try:
            record = PauseRecord.model_validate_json(value)
        except ValidationError as exc:
            self._reject(str(exc))
            return
        if record.key() != key:
            self._reject(
                f"key {key[:200]!r} does not match the record's process and scope "
                f"({record.key()!r})"
            )
            return
        with self._lock:
            self._records[key] = record

    def live(self, now_ms: int) -> list[PauseRecord]:
        """Pauses still waiting, oldest first."""
        with self._lock:
            for key in [k for k, r in self._records.items() if not r.live(now_ms)]:
                del self._records[key]
            records = list(self._records.values())
        return sorted(records, key=lambda r: (r.since_ms, r.scope, r.process))


class TopicFeed:
    """Follow one topic on a daemon thread: every partition from the beginning, or only its last
    ``tail`` records per partition. ``on_message`` (instead of ``on_record``) is given every
    record's key and value, tombstones (value None) included."""

    POLL_TIMEOUT_S = 0.1
    RETRY_S = 1.0

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        on_record: OnRecord | None,
        *,
        on_message: OnMessage | None = None,
        tail: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        if (on_record is None) == (on_message is None):
            raise ValueError("TopicFeed takes exactly one of on_record and on_message")
        self.topic = topic
        self._on_record = on_record
        self._on_message = on_message
        self._tail = tail
        self._config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            # librdkafka wants a group id even for manual assignment; it is never joined.
            "group.id": f"agentledger-dashboard-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "client.id": "agentledger-dashboard",
            "logger": log.getChild("librdkafka"),
            **(config or {}),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Set once every record that existed at assignment has been read.
        self.caught_up = threading.Event()
        self._targets: dict[int, int] = {}  # partition -> end offset at assignment
        self.last_error: str | None = None
        self.last_ok_monotonic: float | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"dashboard-{self.topic}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        consumer: Consumer | None = None
        try:
            consumer = Consumer(self._config)
            if not self._assign(consumer):
                return
            while not self._stop.is_set():
                msg = consumer.poll(self.POLL_TIMEOUT_S)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        self._reached(msg.partition(), None)
                    else:
                        self.last_error = str(err)
                    continue
                self.last_ok_monotonic = time.monotonic()
                value = msg.value()
                if self._on_message is not None:
                    self._on_message(msg.key(), value)
                elif value is not None and self._on_record is not None:
                    self._on_record(value)  # tombstones carry nothing to show
                offset = msg.offset()
                self._reached(msg.partition(), None if offset is None else offset + 1)
        except KafkaException as exc:
            self.last_error = f"stopped: {exc}"
            log.warning("dashboard: %s feed stopped: %s", self.topic, exc)
        finally:
            if consumer is not None:
                consumer.close()

    def _reached(self, partition: int | None, next_offset: int | None) -> None:
        """Note progress; ``next_offset`` None means the partition's end was reached."""
        if partition is None or partition not in self._targets:
            return
        if next_offset is None or next_offset >= self._targets[partition]:
            del self._targets[partition]
            if not self._targets:
                self.caught_up.set()

    def _assign(self, consumer: Consumer) -> bool:
        while not self._stop.is_set():
            try:
                metadata = consumer.list_topics(self.topic, timeout=2.0)
                topic = metadata.topics.get(self.topic)
                if topic is None or topic.error is not None or not topic.partitions:
                    self.last_error = f"topic {self.topic} not readable yet"
                else:
                    starts = []
                    for partition in sorted(topic.partitions):
                        low, high = consumer.get_watermark_offsets(
                            TopicPartition(self.topic, partition), timeout=2.0
                        )
                        if high > low:
                            self._targets[partition] = high
                        start = (
                            OFFSET_BEGINNING if self._tail is None else max(low, high - self._tail)
                        )
                        starts.append(TopicPartition(self.topic, partition, start))
                    consumer.assign(starts)
                    self.last_error = None
                    self.last_ok_monotonic = time.monotonic()
                    if not self._targets:
                        self.caught_up.set()
                    return True
            except KafkaException as exc:
                self.last_error = f"cannot read {self.topic} metadata: {exc}"
            self._stop.wait(self.RETRY_S)
        return False
