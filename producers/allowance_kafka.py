"""Allowances over Kafka: requests out on ``<prefix>allowance-requests``, and one consumer that
follows the policies topic (which scopes are budgeted) and this process's partition of the
allowances topic (the answers).

Requests go straight to the partition of the scope's spend state (schemas/partitioning.py),
never to the spool: an answer to a request sent minutes late would be useless, and the call
waiting for it has long fallen back to fail-open or fail-closed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from pydantic import ValidationError

from agentledger.config import Settings
from agentledger.schemas import (
    AllowanceGrant,
    AllowanceRequest,
    SignatureError,
    verify_grant,
)
from agentledger.schemas.partitioning import crc32_partition, state_key, state_partition

from .allowance import Allowances
from .budget_directory import BudgetDirectory
from .client_log import client_log
from .control import note_reached

__all__ = ["AllowanceListener", "KafkaRequestSender"]

log = logging.getLogger(__name__)


Produce = Callable[[str, bytes, bytes, int], bool]


class KafkaRequestSender:
    """Sends requests through ``produce(topic, key, value, partition)`` (the shim transport's
    producer), to the partition of each scope's state."""

    def __init__(self, produce: Produce, topic: str) -> None:
        self._produce = produce
        self._topic = topic
        self.partitions: int | None = None
        """partitions of the requests topic (as many as calls); learned by the listener"""

    def __call__(self, request: AllowanceRequest) -> bool:
        partitions = self.partitions
        if partitions is None:
            return False
        return self._produce(
            self._topic,
            state_key(request.scope),
            request.model_dump_json().encode(),
            state_partition(request.scope, partitions),
        )


def _ignore_client_error(error: KafkaError) -> None:
    log.debug("agentledger: allowance listener: %s", error)


class AllowanceListener:
    """A daemon thread: policies from the beginning, then answers from the end of this
    process's allowances partition. Answers whose signature does not verify are ignored."""

    POLL_TIMEOUT_S = 0.05
    RETRY_S = 1.0
    METADATA_TIMEOUT_S = 1.0

    def __init__(
        self,
        settings: Settings,
        directory: BudgetDirectory,
        allowances: Allowances,
        sender: KafkaRequestSender,
        **config: Any,
    ) -> None:
        topics = settings.topics
        self._policies = topics.policies
        self._grants = topics.allowances
        self._requests = topics.allowance_requests
        self._directory = directory
        self._allowances = allowances
        self._sender = sender
        self._key = settings.control_key_bytes()
        self._config: dict[str, Any] = {
            **settings.kafka_client_config(),
            "bootstrap.servers": settings.kafka,
            "group.id": f"agentledger-shim-allowances-{allowances.holder}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "latest",
            "client.id": "agentledger-shim-allowances",
            # Answers are waited on by calls: fetch as soon as one arrives.
            "fetch.wait.max.ms": 10,
            "logger": client_log(settings.kafka),
            # Connection failures arrive as log lines (the client log says them once).
            "error_cb": _ignore_client_error,
            **config,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        """set once the answers partition is assigned, so a request's answer cannot be missed"""
        self.metrics: dict[str, int] = dict.fromkeys(
            ("grants", "bad_grants", "unsigned_grants", "policies", "errors"), 0
        )

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="agentledger-allowance-listener", daemon=True
            )
            self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        consumer: Consumer | None = None
        try:
            consumer = Consumer(self._config)
            targets = self._assign(consumer)
            if targets is None:
                return
            while not self._stop.is_set():
                self._poll_once(consumer, targets)
        except KafkaException as exc:
            self.metrics["errors"] += 1
            log.warning("agentledger: allowance listener stopped: %s", exc)
        finally:
            if consumer is not None:
                consumer.close()

    def _assign(self, consumer: Consumer) -> dict[int, int] | None:
        """Assign the policies from the beginning and the answers partition from its end;
        return the policies' end offsets that catching up means."""
        while not self._stop.is_set():
            try:
                requests = self._partitions(consumer, self._requests)
                policies = self._partitions(consumer, self._policies)
                grants = self._partitions(consumer, self._grants)
                if requests and policies and grants:
                    self._sender.partitions = len(requests)
                    targets: dict[int, int] = {}
                    for partition in policies:
                        low, high = consumer.get_watermark_offsets(
                            TopicPartition(self._policies, partition),
                            timeout=self.METADATA_TIMEOUT_S,
                        )
                        if high > low:
                            targets[partition] = high
                    reply = crc32_partition(self._allowances.holder.encode(), len(grants))
                    self._allowances.reply_partition = reply
                    _, end = consumer.get_watermark_offsets(
                        TopicPartition(self._grants, reply), timeout=self.METADATA_TIMEOUT_S
                    )
                    consumer.assign(
                        [TopicPartition(self._policies, p, OFFSET_BEGINNING) for p in policies]
                        + [TopicPartition(self._grants, reply, end)]
                    )
                    self.ready.set()
                    if not targets:
                        self._directory.loaded.set()
                    return targets
                log.debug("agentledger: allowance topics not readable yet")
            except KafkaException as exc:
                log.debug("agentledger: allowance listener: retrying: %s", exc)
            self._stop.wait(self.RETRY_S)
        return None

    def _partitions(self, consumer: Consumer, topic: str) -> list[int]:
        metadata = consumer.list_topics(topic, timeout=self.METADATA_TIMEOUT_S)
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            return []
        return sorted(found.partitions)

    def _poll_once(self, consumer: Consumer, targets: dict[int, int]) -> None:
        msg = consumer.poll(self.POLL_TIMEOUT_S)
        if msg is None:
            return
        err = msg.error()
        topic = msg.topic()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                if topic == self._policies:
                    self._reached(targets, msg.partition(), None)
            else:
                self.metrics["errors"] += 1
                log.debug("agentledger: allowance listener: %s", err)
            return
        if topic == self._policies:
            self.metrics["policies"] += 1
            offset = msg.offset()
            self._directory.apply(msg.key(), msg.value(), partition=msg.partition(), offset=offset)
            self._reached(targets, msg.partition(), None if offset is None else offset + 1)
            return
        value = msg.value()
        if not value:
            return
        try:
            grant = AllowanceGrant.model_validate_json(value)
            verify_grant(grant, self._key)
        except ValidationError:
            self.metrics["bad_grants"] += 1
            return
        except SignatureError:
            self.metrics["unsigned_grants"] += 1
            return
        self.metrics["grants"] += 1
        self._allowances.on_grant(grant)

    def _reached(
        self, targets: dict[int, int], partition: int | None, next_offset: int | None
    ) -> None:
        note_reached(targets, partition, next_offset, self._directory.loaded)
