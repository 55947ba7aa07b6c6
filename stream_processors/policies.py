"""Budget policies, read from the compacted policies topic and kept in memory.

Every worker needs every policy (a policy's scope says nothing about which partition its
agents land in), so the follower reads the whole topic with its own consumer: no group, all
partitions, from the beginning, and keeps following it for hot reloads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from agentledger.schemas import BudgetPolicy

from .declare import TopicMissing
from .kafka_clients import ClientOptions, follower_consumer, metadata_producer
from .tracking import EMPTY_PLAN, BucketPlan, plan_for

__all__ = ["InvalidPolicy", "PolicyBook", "follow_policies"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InvalidPolicy:
    """A policies record that could not be applied, for the dead-letter topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str


class PolicyBook:
    """The policies in force, keyed ``<scope>|<period>`` like the topic."""

    def __init__(self) -> None:
        self._policies: dict[str, BudgetPolicy] = {}
        self._lock = threading.Lock()
        self._snapshot: dict[str, BudgetPolicy] = {}
        self._snapshot_version = 0
        self.ready = asyncio.Event()
        #: Bumped on every change, so a consumer can tell that decisions may differ now.
        self.version = 0
        self._plan = EMPTY_PLAN
        self._plan_version = 0
        self._positions: dict[int, int] = {}

    def advanced(self, partition: int, next_offset: int) -> None:
        """Every record before ``next_offset`` on ``partition`` is applied (or rejected)."""
        if next_offset > self._positions.get(partition, 0):
            self._positions[partition] = next_offset

    def behind(self, positions: Mapping[int, int]) -> bool:
        """Whether some record a reader had applied at ``positions`` is not applied here."""
        mine = self._positions
        return any(offset > mine.get(partition, 0) for partition, offset in positions.items())

    @property
    def plan(self) -> BucketPlan:
        """What spend states must keep for the policies in force (see tracking.py)."""
        version = self.version
        if self._plan_version != version:
            self._plan = plan_for(self.policies.values())
            self._plan_version = version
        return self._plan

    @property
    def policies(self) -> Mapping[str, BudgetPolicy]:
        """A snapshot that never changes under its reader: the data plane thread reads the
        policies while faust's thread applies records."""
        if self._snapshot_version != self.version:
            with self._lock:
                self._snapshot = dict(self._policies)
                self._snapshot_version = self.version
        return self._snapshot

    def __len__(self) -> int:
        return len(self._policies)

    def apply(self, key: bytes | None, value: bytes | None) -> str | None:
        """Apply one record; return why it was rejected, or None when it was applied.

        An empty value is a tombstone and deletes the policy under that key.
        """
        if not key:
            return "policies record has no key; expected '<scope>|<period>'"
        try:
            name = key.decode()
        except UnicodeDecodeError:
            return "policies record key is not UTF-8; expected '<scope>|<period>'"
        if not value:
            with self._lock:
                if self._policies.pop(name, None) is not None:
                    self.version += 1
            return None
        try:
            policy = BudgetPolicy.model_validate_json(value)
        except ValidationError as exc:
            return f"policies record {name!r} is not a valid BudgetPolicy: {exc}"
        if policy.key != name:
            return (
                f"policies record key {name!r} does not match its policy "
                f"(scope|period = {policy.key!r}); publish it under {policy.key!r}"
            )
        if self._policies.get(name) != policy:
            with self._lock:
                self._policies[name] = policy
                self.version += 1
        return None


async def _partitions_of(
    bootstrap: str, topic: str, options: ClientOptions | None, timeout_ms: int = 30_000
) -> set[int]:
    # A group-less consumer only knows metadata of assigned topics; the producer API fetches
    # a topic's metadata on request.
    from aiokafka.errors import KafkaTimeoutError

    producer = metadata_producer(bootstrap, options, timeout_ms=timeout_ms)
    await producer.start()
    try:
        numbers: set[int] = await producer.partitions_for(topic)
    except KafkaTimeoutError:
        raise TopicMissing(
            f"policies topic {topic!r} not found on {bootstrap}; create the stack's topics "
            "first (agentledger up, or agentledger.topic_admin.ensure_topics)"
        ) from None
    finally:
        await producer.stop()
    return numbers


OnInvalid = Callable[[InvalidPolicy], Awaitable[None]]


async def follow_policies(
    book: PolicyBook,
    *,
    bootstrap: str,
    topic: str,
    on_invalid: OnInvalid,
    poll_timeout_ms: int = 200,
    client_options: ClientOptions | None = None,
) -> None:
    """Read ``topic`` into ``book`` forever; set ``book.ready`` once caught up.

    Caught up means: positions reached the end offsets seen at start, on every partition.
    ``client_options`` are the security settings (``Settings.aiokafka_options()``). Runs
    until cancelled.
    """
    from aiokafka import TopicPartition

    numbers = await _partitions_of(bootstrap, topic, client_options)
    consumer = follower_consumer(bootstrap, client_options)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(numbers)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        targets: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        while True:
            batches = await consumer.getmany(timeout_ms=poll_timeout_ms)
            for tp, records in batches.items():
                for record in records:
                    before = book.version
                    reason = book.apply(record.key, record.value)
                    if book.version != before and book.ready.is_set():
                        # Says when a change took effect: a decision made before it used the
                        # old policies.
                        log.info(
                            "policy %s %s at %s@%s: %d in force",
                            (record.key or b"").decode(errors="replace"),
                            "set" if record.value else "removed",
                            tp,
                            record.offset,
                            len(book),
                        )
                    if reason is not None:
                        log.warning("rejected policies record at %s@%s", tp, record.offset)
                        await on_invalid(
                            InvalidPolicy(
                                tp.partition, record.offset, record.key, record.value, reason
                            )
                        )
                    # After apply: a request that saw this record waits until then.
                    book.advanced(tp.partition, record.offset + 1)
            if not book.ready.is_set():
                positions = {tp: await consumer.position(tp) for tp in tps}
                if all(positions[tp] >= targets[tp] for tp in tps):
                    log.info("policies loaded: %d in force", len(book))
                    book.ready.set()
    finally:
        await consumer.stop()
