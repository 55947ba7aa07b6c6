"""Where the shim's messages go: a Kafka producer, or a list in memory for tests and dry runs.

A transport never raises into the agent for a broker problem: an outage, a full local queue or a
failed delivery is counted in ``stats`` and logged, and the agent keeps working.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from .client_log import client_log
from .spool import Spool

__all__ = ["EventTransport", "InMemoryTransport", "KafkaTransport", "TransportStats"]

log = logging.getLogger(__name__)


Headers = list[tuple[str, str | bytes | None]]


@runtime_checkable
class EventTransport(Protocol):
    def send(self, topic: str, key: bytes, value: bytes, headers: Headers | None = None) -> None:
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
    """known after ``flush()`` or ``close()``: sent, minus failed, minus still queued"""
    delivery_errors: int = 0
    dropped: int = 0
    """never queued: local queue full past the blocking bound, produce refused, or closed"""
    last_error: str | None = None
    spooled: int = 0
    """written to the local spool: queue full, broker down, failed delivery, or left at close"""
    replayed: int = 0
    """delivered from the spool"""


class InMemoryTransport:
    """Keeps every message as ``(topic, key, value)``, in send order."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bytes]] = []
        #: The headers of each message, index for index.
        self.headers: list[Headers | None] = []
        self.stats = TransportStats()
        self._closed = False
        self._lock = threading.Lock()

    def send(self, topic: str, key: bytes, value: bytes, headers: Headers | None = None) -> None:
        with self._lock:
            if self._closed:
                self.stats.dropped += 1
                self.stats.last_error = "transport closed"
                return
            self.messages.append((topic, key, value))
            self.headers.append(headers)
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


_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})


class KafkaTransport:
    """confluent-kafka Producer with idempotence; ``**config`` overrides librdkafka settings.

    When librdkafka's local queue is full, ``send`` blocks the caller for at most
    ``block_s`` seconds while serving deliveries, then drops the message and counts it: an agent
    is slowed down by a slow broker, never stopped by it. ``close`` waits at most
    ``close_timeout_s`` for queued messages, then purges them (counted as delivery errors).

    With a spool, messages are never lost to an outage, so waiting for a broker known to be
    down is pointless: ``flush`` and ``close`` together wait at most ``OUTAGE_WAIT_S`` per
    outage, and what ``close`` then purges is spooled. A spool that a dead process left is
    adopted, and replayed in the background, as soon as the transport is built.
    """

    LOG_EVERY_S = 10.0

    REPLAY_RETRY_S = 1.0
    REPLAY_FLUSH_S = 30.0
    OUTAGE_WAIT_S = 0.5
    # flush() waits in slices this long, so an outage reported during the wait cuts it short.
    FLUSH_SLICE_S = 0.05
    # The replayer's metadata request. Close waits for a request in flight, so while
    # librdkafka reports every broker down (when a request can only time out) it is short.
    PROBE_TIMEOUT_S = 1.0
    DOWN_PROBE_TIMEOUT_S = 0.25
    # The replayer is stopped at close before it joins; it may be in a metadata request.
    REPLAY_JOIN_S = 5.0

    def __init__(
        self,
        bootstrap: str,
        *,
        block_s: float = 1.0,
        close_timeout_s: float = 10.0,
        spool: Spool | None = None,
        **config: Any,
    ) -> None:
        self._config: dict[str, Any] = {
            **KAFKA_PRODUCER_DEFAULTS,
            # librdkafka would otherwise reach the agent's stderr, a line per retry.
            "logger": client_log(bootstrap),
            "error_cb": self._on_error,
            # A report per delivered message would cost the agent a Python callback (and a
            # Message object) per event; only failures need handling, and a replay, which
            # must see every outcome, passes its own per-message callback.
            "on_delivery": self._on_delivery,
            "delivery.report.only.error": True,
            **config,
            "bootstrap.servers": bootstrap,
        }
        self._spool = spool
        # While spooling, every send goes to the spool too, so events stay in order behind
        # the spooled ones; the replayer switches it off once the spool is drained.
        self._spooling = False
        self._outage = False
        # When flush/close stop waiting for the current outage (monotonic); None when no
        # wait has started since the broker last answered.
        self._outage_wait_until: float | None = None
        self._mode_lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._replayer: threading.Thread | None = None
        self._block_s = block_s
        self._last_log_at = float("-inf")
        self._close_timeout_s = close_timeout_s
        self.stats = TransportStats()
        self._lock = threading.Lock()
        self._producer: Producer | None = None
        self._closed = False
        if spool is not None and spool.has_orphans():
            # Replay what a dead process left now, not at this process's first send, which
            # may never come (an agent that only reads commands, a short CLI run).
            try:
                self._get_producer()
            except KafkaException as exc:
                log.warning("agentledger: cannot create producer to replay the spool: %s", exc)

    def _get_producer(self) -> Producer:
        # Created on first send, so building a Ledger opens no connection.
        producer = self._producer
        if producer is None:
            with self._lock:
                if self._producer is None:
                    self._producer = Producer(self._config)
                    if self._spool is not None and self._spool.adopt_orphans():
                        with self._mode_lock:
                            self._start_spooling()
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

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:  # only with a caller's delivery.report.only.error=False
            return
        topic, key, value = msg.topic(), msg.key(), msg.value()
        spooled = self._spool is not None and topic is not None and value is not None
        with self._lock:
            self.stats.delivery_errors += 1
            self.stats.last_error = str(err)
            # A message purged at close and spooled is kept, not failed: nothing to say.
            if not (spooled and err.code() in _PURGED):
                self._warn(f"event delivery failed: {err}")
        if spooled:
            assert topic is not None and value is not None
            with self._mode_lock:
                self._spool_one(topic, key or b"", value)

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN and self._spool is not None:
            # Spool from now on instead of filling librdkafka's memory: a crash while the
            # broker is down then loses nothing sent after this point.
            with self._mode_lock:
                self._outage = True
                self._start_spooling()
        log.debug("agentledger: producer: %s", err)

    def _start_spooling(self) -> None:
        """Called with the mode lock held."""
        self._spooling = True
        self._wake.set()
        if self._replayer is None and not self._closed:
            self._replayer = threading.Thread(
                target=self._replay_loop, name="agentledger-spool-replay", daemon=True
            )
            self._replayer.start()

    def _spool_one(self, topic: str, key: bytes, value: bytes) -> None:
        """Called with the mode lock held."""
        assert self._spool is not None
        try:
            self._spool.append(topic, key, value)
        except OSError as exc:
            self._drop(f"cannot write the spool: {exc}")
            return
        with self._lock:
            self.stats.spooled += 1
        self._start_spooling()

    def _broker_reachable(self, producer: Producer) -> bool:
        # While spooling, no send polls the producer: serve its log lines and error events
        # here, or they wait in librdkafka's queue and the outage is told only at close.
        producer.poll(0)
        try:
            timeout = self.DOWN_PROBE_TIMEOUT_S if self._outage else self.PROBE_TIMEOUT_S
            producer.list_topics(timeout=timeout)
        except KafkaException:
            return False
        return True

    def _replay_loop(self) -> None:
        spool = self._spool
        assert spool is not None
        while not self._stop.is_set():
            self._wake.clear()
            segment = spool.take()
            if segment is None:
                with self._mode_lock:
                    if spool.is_empty() and not self._outage:
                        self._spooling = False
                if not self._spooling:
                    self._wake.wait()
                    continue
            producer = self._producer
            if producer is None or not self._broker_reachable(producer):
                self._stop.wait(self.REPLAY_RETRY_S)
                continue
            with self._mode_lock:
                self._outage = False
                self._outage_wait_until = None
            if segment is not None and not self._replay(producer, spool, segment):
                self._stop.wait(self.REPLAY_RETRY_S)

    def _replay(self, producer: Producer, spool: Spool, segment: Path) -> bool:
        """Send one segment in order; delete it once every record is delivered. A failed
        attempt is retried whole: duplicates keep their event ids, so consumers drop them."""
        records, lines = spool.load(segment)
        failed = 0

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            nonlocal failed
            if err is not None:
                failed += 1

        for topic, key, value in records:
            while True:
                try:
                    producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.1)
                except KafkaException as exc:
                    self._note(f"spool replay refused: {exc}")
                    return False
            if self._stop.is_set():
                return False
        left = producer.flush(self.REPLAY_FLUSH_S)
        if left or failed:
            self._note(f"spool replay incomplete: {failed} failed, {left} still queued")
            return False
        spool.done(segment, lines)
        with self._lock:
            self.stats.replayed += len(records)
        return True

    def _note(self, what: str) -> None:
        with self._lock:
            self.stats.last_error = what
            self._warn(what)

    def _drop(self, why: str) -> None:
        with self._lock:
            self.stats.dropped += 1
            self.stats.last_error = why
            self._warn(f"event dropped: {why}")

    def send(self, topic: str, key: bytes, value: bytes, headers: Headers | None = None) -> None:
        if self._closed:
            self._drop("transport closed")
            return
        try:
            producer = self._get_producer()
        except KafkaException as exc:
            self._drop(f"cannot create producer: {exc}")
            return
        if self._spool is not None:
            self._send_or_spool(producer, topic, key, value, headers)
            return
        deadline = time.monotonic() + self._block_s
        while True:
            try:
                producer.produce(topic, value, key, headers=headers)
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

    def _send_or_spool(
        self, producer: Producer, topic: str, key: bytes, value: bytes, headers: Headers | None
    ) -> None:
        # The spool keeps topic, key and value only: a replayed event loses its allowance
        # holder, so the processor counts it as spend without moving it out of an allowance
        # (conservative: the allowance lapses with its TTL).
        with self._mode_lock:
            if self._spooling:
                self._spool_one(topic, key, value)
                return
            try:
                producer.produce(topic, value, key, headers=headers)
            except BufferError:
                self._spool_one(topic, key, value)
                return
            except KafkaException as exc:
                self._drop(f"produce refused: {exc}")
                return
            # Every send with a spool holds the mode lock here, so it guards this count too.
            self.stats.sent += 1
        producer.poll(0)

    def produce_now(self, topic: str, key: bytes, value: bytes | None, partition: int) -> bool:
        """Queue one message for ``partition`` (``value`` None: a tombstone), never spooled,
        never blocking; False when it could not be queued (closed, queue full, refused)."""
        if self._closed:
            return False
        try:
            producer = self._get_producer()
            producer.produce(topic, value, key, partition=partition)
        except (BufferError, KafkaException):
            return False
        producer.poll(0)
        return True

    @property
    def spooling(self) -> bool:
        return self._spooling

    def _count_delivered(self, left: int) -> None:
        with self._lock:
            stats = self.stats
            stats.delivered = max(stats.sent - stats.delivery_errors - left, 0)

    def flush(self, timeout_s: float) -> int:
        producer = self._producer
        if producer is None:
            return 0
        left = self._wait_delivered(producer, timeout_s)
        self._count_delivered(left)
        return left

    def _wait_delivered(self, producer: Producer, timeout_s: float) -> int:
        """``producer.flush(timeout_s)``, except that with a spool, once the broker is known
        to be down, waiting ends ``OUTAGE_WAIT_S`` after the first wait of that outage began:
        the messages left are safe (a failed delivery is spooled, and close spools the rest)."""
        if self._spool is None:
            return int(producer.flush(timeout_s))
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            end = deadline
            if self._outage:
                with self._mode_lock:
                    if self._outage_wait_until is None:
                        self._outage_wait_until = now + self.OUTAGE_WAIT_S
                    end = min(deadline, self._outage_wait_until)
            left = int(producer.flush(max(0.0, min(end - now, self.FLUSH_SLICE_S))))
            if left == 0 or time.monotonic() >= end:
                return left

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The replayer winds down while queued messages are waited for: a replay in flight
        # is delivered with them, or purged with them and kept on disk.
        self._stop.set()
        self._wake.set()
        producer = self._producer
        if producer is not None:
            left = self._wait_delivered(producer, self._close_timeout_s)
            if left:
                fate = "spooling" if self._spool is not None else "purging"
                log.warning("agentledger: %d events not delivered at close; %s them", left, fate)
                # Purged messages come back through the delivery callback as errors, so they
                # are counted (and spooled); Producer.close() would instead wait for them
                # without a bound.
                producer.purge()
                producer.flush(0)
            self._count_delivered(0)
        if self._replayer is not None:
            self._replayer.join(self.REPLAY_JOIN_S)
        if self._spool is not None:
            self._spool.close()
