"""Where the shim's messages go: a Kafka producer, or a list in memory for tests and dry runs.

A transport never raises into the agent for a broker problem: an outage, a full local queue or a
failed delivery is counted in ``stats`` and logged, and the agent keeps working.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from confluent_kafka import KafkaError, KafkaException, Message, Producer

__all__ = ["EventTransport", "InMemoryTransport", "KafkaTransport", "TransportStats"]

log = logging.getLogger(__name__)


@runtime_checkable
class EventTransport(Protocol):
    def send(self, topic: str, key: bytes, value: bytes) -> None:
        """Queue one message; must not raise for broker outages."""

    def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for queued messages; return how many are still queued."""

    def close(self) -> None:
        """Deliver what can still be delivered within a bound, then release resources; what
        was not delivered is counted, and later sends are dropped."""


@dataclass
class TransportStats:
    sent: int = 0
    """accepted into the local queue"""
    delivered: int = 0
    delivery_errors: int = 0
    dropped: int = 0
    """never queued: local queue full past the blocking bound, produce refused, or closed"""
    last_error: str | None = None


class InMemoryTransport:
    """Keeps every message as ``(topic, key, value)``, in send order."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bytes]] = []
        self.stats = TransportStats()
        self._closed = False
        self._lock = threading.Lock()

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        with self._lock:
            if self._closed:
                self.stats.dropped += 1
                self.stats.last_error = "transport closed"
                return
            self.messages.append((topic, key, value))
            self.stats.sent += 1
            self.stats.delivered += 1

    def flush(self, timeout_s: float) -> int:
        return 0

    def close(self) -> None:
        with self._lock:
            self._closed = True


# librdkafka's defaults favour throughput over the guarantees we need; these make a delivered
# event land exactly once per produce call and keep batches small in latency.
KAFKA_PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable.idempotence": True,
    "linger.ms": 5,
    "compression.type": "lz4",
    "client.id": "agentledger-shim",
}


class KafkaTransport:
    """confluent-kafka Producer with idempotence; ``**config`` overrides librdkafka settings.

    When librdkafka's local queue is full, ``send`` blocks the caller for at most
    ``block_s`` seconds while serving deliveries, then drops the message and counts it: an agent
    is slowed down by a slow broker, never stopped by it. ``close`` waits at most
    ``close_timeout_s`` for queued messages, then purges them (counted as delivery errors).
    """

    LOG_EVERY_S = 10.0

    def __init__(
        self, bootstrap: str, *, block_s: float = 1.0, close_timeout_s: float = 10.0, **config: Any
    ) -> None:
        self._config: dict[str, Any] = {
            **KAFKA_PRODUCER_DEFAULTS,
            # librdkafka would otherwise write its own lines to the agent's stderr.
            "logger": log.getChild("librdkafka"),
            **config,
            "bootstrap.servers": bootstrap,
        }
        self._block_s = block_s
        self._last_log_at = float("-inf")
        self._close_timeout_s = close_timeout_s
        self.stats = TransportStats()
        self._lock = threading.Lock()
        self._producer: Producer | None = None
        self._closed = False

    def _get_producer(self) -> Producer:
        # Created on first send, so building a Ledger opens no connection.
        producer = self._producer
        if producer is None:
            with self._lock:
                if self._producer is None:
                    self._producer = Producer(self._config)
                producer = self._producer
        return producer

    def _warn(self, what: str) -> None:
        """Log at most one warning per LOG_EVERY_S: an outage fails every queued message, and
        a line per message would flood the agent's log. Called with the lock held."""
        now = time.monotonic()
        if now - self._last_log_at < self.LOG_EVERY_S:
            return
        self._last_log_at = now
        stats = self.stats
        log.warning(
            "agentledger: %s (so far: %d delivery errors, %d dropped, %d delivered)",
            what,
            stats.delivery_errors,
            stats.dropped,
            stats.delivered,
        )

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        with self._lock:
            if err is None:
                self.stats.delivered += 1
                return
            self.stats.delivery_errors += 1
            self.stats.last_error = str(err)
            self._warn(f"event delivery failed: {err}")

    def _drop(self, why: str) -> None:
        with self._lock:
            self.stats.dropped += 1
            self.stats.last_error = why
            self._warn(f"event dropped: {why}")

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        if self._closed:
            self._drop("transport closed")
            return
        try:
            producer = self._get_producer()
        except KafkaException as exc:
            self._drop(f"cannot create producer: {exc}")
            return
        deadline = time.monotonic() + self._block_s
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                break
            except BufferError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._drop(f"local queue full for {self._block_s}s (broker unreachable?)")
                    return
                producer.poll(min(remaining, 0.05))
            except KafkaException as exc:
                self._drop(f"produce refused: {exc}")
                return
        with self._lock:
            self.stats.sent += 1
        # Serves delivery callbacks without waiting.
        producer.poll(0)

    def flush(self, timeout_s: float) -> int:
        producer = self._producer
        if producer is None:
            return 0
        return int(producer.flush(timeout_s))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        producer = self._producer
        if producer is None:
            return
        left = int(producer.flush(self._close_timeout_s))
        if left:
            log.warning(
                "agentledger: %d events not delivered within %ss of close; purging them",
                left,
                self._close_timeout_s,
            )
            # Purged messages come back through the delivery callback as errors, so they are
            # counted; Producer.close() would instead wait for them without a bound.
            producer.purge()
            producer.flush(0)
