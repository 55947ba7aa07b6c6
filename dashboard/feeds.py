"""What the dashboard reads from Kafka: the standing command per scope (control topic, read from
the beginning) and the latest alerts (the tail of the alerts topic).

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
    SignatureError,
    verify_command,
)

__all__ = ["AlertLog", "CommandBoard", "TopicFeed"]

log = logging.getLogger(__name__)

OnRecord = Callable[[bytes], None]


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


class TopicFeed:
    """Follow one topic on a daemon thread: every partition from the beginning, or only its last
    ``tail`` records per partition."""

    POLL_TIMEOUT_S = 0.1
    RETRY_S = 1.0

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        on_record: OnRecord,
        *,
        tail: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self._on_record = on_record
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
                if value is not None:  # tombstones carry nothing to show
                    self._on_record(value)
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
