"""The data plane's Kafka clients: what it needs of a consumer and a transactional producer,
and their confluent-kafka configuration.

The protocols are the subset of confluent-kafka's ``Consumer`` and ``Producer`` the data plane
calls, so an in-memory pair can stand in for them in tests.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, Protocol

from agentledger.config import Settings

__all__ = [
    "TRANSACTION_TIMEOUT_MS",
    "BatchConsumer",
    "CommandProducer",
    "TransactionalProducer",
    "calls_consumer_config",
    "command_producer_config",
    "data_plane_group",
    "requests_consumer_config",
    "restore_consumer_config",
    "transactional_producer_config",
    "worker_identity",
]

# A takeover after a worker died mid-transaction waits (read_committed) until its transaction
# is aborted: by its restart (init_transactions fences it) or by this timeout.
TRANSACTION_TIMEOUT_MS = 20_000
# Below the transaction timeout: a produce that cannot be delivered fails the transaction
# before the broker aborts it on its own (librdkafka requires message.timeout.ms <= it).
MESSAGE_TIMEOUT_MS = 15_000


class BatchConsumer(Protocol):
    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[[Any, list[Any]], None] = ...,
        on_revoke: Callable[[Any, list[Any]], None] = ...,
        on_lost: Callable[[Any, list[Any]], None] = ...,
    ) -> None: ...
    def consume(self, num_messages: int = ..., timeout: float = ...) -> list[Any]: ...
    def assignment(self) -> list[Any]: ...
    def position(self, partitions: list[Any]) -> list[Any]: ...
    def committed(self, partitions: list[Any], timeout: float = ...) -> list[Any]: ...
    def seek(self, partition: Any) -> None: ...
    def incremental_assign(self, partitions: list[Any]) -> None: ...
    def incremental_unassign(self, partitions: list[Any]) -> None: ...
    def consumer_group_metadata(self) -> Any: ...
    def get_watermark_offsets(
        self, partition: Any, timeout: float = ..., cached: bool = ...
    ) -> tuple[int, int]: ...
    def close(self) -> None: ...


class CommandProducer(Protocol):
    """A plain (idempotent, not transactional) producer for the fast copy of control commands."""

    def produce(
        self,
        topic: str,
        value: bytes | None = ...,
        key: bytes | None = ...,
        partition: int = ...,
    ) -> None: ...
    def poll(self, timeout: float = ...) -> int: ...
    def flush(self, timeout: float = ...) -> int: ...


class TransactionalProducer(CommandProducer, Protocol):
    def init_transactions(self, timeout: float = ...) -> None: ...
    def begin_transaction(self) -> None: ...
    def send_offsets_to_transaction(
        self, positions: list[Any], group_metadata: Any, timeout: float = ...
    ) -> None: ...
    def commit_transaction(self, timeout: float = ...) -> None: ...
    def abort_transaction(self, timeout: float = ...) -> None: ...


def worker_identity(settings: Settings) -> str:
    """Host and web port name a worker (two on one host cannot share the port): the static
    group member id and the transactional id derive from it, so a restarted worker takes its
    partitions back at once and fences a zombie of itself."""
    return f"{settings.topic_prefix}processor-{socket.gethostname()}-{settings.processor_port}"


def data_plane_group(settings: Settings) -> str:
    # Not faust's group (<prefix>processor): that one speaks faust's assignor protocol.
    return f"{settings.topic_prefix}processor-calls"


def _base(settings: Settings) -> dict[str, Any]:
    return {**settings.kafka_client_config(), "bootstrap.servers": settings.kafka}


def calls_consumer_config(settings: Settings) -> dict[str, Any]:
    return {
        **_base(settings),
        "group.id": data_plane_group(settings),
        "group.instance.id": f"{worker_identity(settings)}-calls",
        "partition.assignment.strategy": "cooperative-sticky",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        # A fetch answered at the first byte makes the broker serve thousands of tiny fetches
        # a second at 10k events/s; 64 KB or 20 ms keeps the data plane's wait short.
        "fetch.wait.max.ms": 20,
        "fetch.min.bytes": 65536,
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 3_000,
        # The stack's topics exist before workers start; a worker must not create them.
        "allow.auto.create.topics": False,
        "topic.metadata.refresh.interval.ms": 15_000,
    }


def requests_consumer_config(settings: Settings) -> dict[str, Any]:
    """The allowance requests and the second hop's deltas follow the calls partitions by manual
    assignment (partition p of each with calls partition p: all are keyed to the same state
    partition); their offsets go in the same transactions, under the calls consumer's group."""
    return {
        **_base(settings),
        "group.id": data_plane_group(settings),
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "allow.auto.create.topics": False,
    }


def restore_consumer_config(settings: Settings) -> dict[str, Any]:
    return {
        **_base(settings),
        "group.id": f"{data_plane_group(settings)}-restore",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "allow.auto.create.topics": False,
    }


def transactional_producer_config(settings: Settings) -> dict[str, Any]:
    return {
        **_base(settings),
        "transactional.id": worker_identity(settings),
        "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
        "message.timeout.ms": MESSAGE_TIMEOUT_MS,
        # Java's and aiokafka's partitioner: the control topic is compacted by scope and the
        # scopes topic is read by the scope's owner, so a key must land where faust put it.
        "partitioner": "murmur2_random",
        "linger.ms": 5,
    }


def command_producer_config(settings: Settings) -> dict[str, Any]:
    """Control commands sent the moment they are decided, before their cycle commits (their
    authoritative copy rides in the transaction): a shim reads a STOP without waiting for the
    commit. Same partitioner as the transactional producer: both copies land on the
    partition the compacted control topic keeps the scope's latest command on."""
    return {
        **_base(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 0,
        "message.timeout.ms": MESSAGE_TIMEOUT_MS,
        "partitioner": "murmur2_random",
    }
