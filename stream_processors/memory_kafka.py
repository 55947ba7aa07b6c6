"""An in-memory Kafka for the data plane: the subset of confluent-kafka's ``Consumer`` and
``Producer`` that ``batch_kafka``'s protocols name, on a broker held in memory.

What it keeps of Kafka's semantics, because the data plane's exactness rests on them:
- **Partitions** are append-only logs with offsets; keys land where the producer's
  ``partitioner`` puts them (``murmur2_random``: Java's murmur2; otherwise librdkafka's
  default, CRC-32), or on the partition given.
- **Transactions** (``transactional.id``): ``init_transactions`` fences the previous producer
  of that id (its next call raises a fatal ``_FENCED`` error) and aborts its open transaction;
  records are in the log as soon as they are produced, and a commit or abort resolves them
  all and writes one marker per partition written (an offset no reader is given, as in
  Kafka). Offsets sent with ``send_offsets_to_transaction`` are committed for the group with
  the transaction, and never if it aborts. A transaction open longer than the producer's
  ``transaction.timeout.ms`` is aborted by the broker; the producer's next call on it raises
  an abortable error.
- **read_committed** (librdkafka's default ``isolation.level``): a reader never sees an
  aborted record or a marker, and stops at the first record of an open transaction (the last
  stable offset) until it is resolved; read_uncommitted sees every record.
- **Consumer groups**: committed offsets per group; members of a subscribed group get the
  partitions spread evenly and stickily (what a member keeps stays; cooperative: a moving
  partition is revoked from its owner, in the owner's ``consume``, before the new owner is
  given it in its own). A member's ``consume`` runs its ``on_revoke`` and ``on_assign``
  callbacks; a newly assigned partition starts at the group's committed offset, else at
  ``auto.offset.reset``. ``group.instance.id`` (static membership): a new member with the id
  of a live one replaces it; the old one's ``consume`` returns a fatal ``_FATAL`` error event
  and its other calls raise it. Sending
  offsets for a member no longer in its group raises an abortable error, as a zombie's
  ``TxnOffsetCommit`` does.

Left out: replication, retention and compaction (a compacted topic keeps every record; the
last one per key wins on reading), session timeouts (a member that stops calling ``consume``
keeps its partitions until it closes; a closed static member leaves at once, where Kafka
waits ``session.timeout.ms`` for it), quotas, headers beyond a list of pairs, and timeouts of
calls (nothing waits on a network).

Test code builds the clients from the broker: ``broker.consumer(config)`` and
``broker.producer(config)``, with the same config dicts as the real ones (``batch_kafka``).
"""

from __future__ import annotations

import itertools
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from agentledger.schemas.partitioning import murmur2_partition

if TYPE_CHECKING:
    from .batch_kafka import BatchConsumer, TransactionalProducer

__all__ = [
    "GroupMetadata",
    "MemoryBroker",
    "MemoryConsumer",
    "MemoryMessage",
    "MemoryProducer",
]

Where = tuple[str, int]
Rebalance = Callable[[Any, list[TopicPartition]], None]
DEFAULT_TRANSACTION_TIMEOUT_MS = 60_000


class MemoryMessage:
    """A consumed record, with confluent-kafka's ``Message`` accessors."""

    __slots__ = ("_error", "_headers", "_key", "_offset", "_partition", "_topic", "_value")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None,
        error: KafkaError | None = None,
    ) -> None:
        self._topic = topic
        self._partition = partition
        self._offset = offset
        self._key = key
        self._value = value
        self._headers = headers
        self._error = error

    def error(self) -> KafkaError | None:
        return self._error

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def __repr__(self) -> str:
        return f"MemoryMessage({self._topic}:{self._partition}@{self._offset})"


@dataclass
class _Transaction:
    txn_id: str
    epoch: int
    started_at: float
    timeout_s: float
    state: str = "open"  # open | committed | aborted
    written: set[Where] = field(default_factory=set)
    offsets: dict[str, dict[Where, int]] = field(default_factory=dict)
    #: Why the broker aborted it on its own (the transaction timeout), for the producer.
    aborted_by_broker: str | None = None


@dataclass
class _Entry:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    txn: _Transaction | None = None
    marker: bool = False

    def visible(self, read_committed: bool) -> bool | None:
        """True: deliver; False: skip; None: stop here (an open transaction, read_committed)."""
        if self.marker:
            return False
        if self.txn is None:
            return True
        if self.txn.state == "aborted":
            return not read_committed
        if self.txn.state == "open" and read_committed:
            return None
        return True


@dataclass
class _Member:
    member_id: str
    instance_id: str | None
    topics: tuple[str, ...]
    consumer: MemoryConsumer
    target: set[Where] = field(default_factory=set)


@dataclass
class _Group:
    committed: dict[Where, int] = field(default_factory=dict)
    members: dict[str, _Member] = field(default_factory=dict)
    owner: dict[Where, str] = field(default_factory=dict)
    generation: int = 0


@dataclass(frozen=True)
class GroupMetadata:
    """What ``consumer_group_metadata()`` returns: which member of which group sends offsets."""

    group_id: str
    member_id: str | None


def _error(
    code: int, reason: str, *, fatal: bool = False, abortable: bool = False
) -> KafkaException:
    return KafkaException(KafkaError(code, reason, fatal=fatal, txn_requires_abort=abortable))


class MemoryBroker:
    """Topics, groups and transactions in memory, safe to use from several threads."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._logs: dict[str, list[list[_Entry]]] = {}
        self._groups: dict[str, _Group] = {}
        #: transactional id -> the epoch of the producer that owns it now.
        self._epochs: dict[str, int] = {}
        self._open: dict[str, _Transaction] = {}
        self._ids = itertools.count(1)

    # -- topics -----------------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        with self._lock:
            if name in self._logs:
                if len(self._logs[name]) != partitions:
                    raise ValueError(
                        f"topic {name!r} exists with {len(self._logs[name])} partitions, "
                        f"not {partitions}"
                    )
                return
            self._logs[name] = [[] for _ in range(partitions)]

    def partitions(self, topic: str) -> int:
        with self._lock:
            return len(self._log_of(topic))

    def _log_of(self, topic: str) -> list[list[_Entry]]:
        log = self._logs.get(topic)
        if log is None:
            raise _error(KafkaError.UNKNOWN_TOPIC_OR_PART, f"topic {topic!r} does not exist")
        return log

    def _partition_log(self, topic: str, partition: int) -> list[_Entry]:
        log = self._log_of(topic)
        if not 0 <= partition < len(log):
            raise _error(
                KafkaError.UNKNOWN_TOPIC_OR_PART,
                f"{topic!r} has {len(log)} partitions, no partition {partition}",
            )
        return log[partition]

    def watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        with self._lock:
            return 0, len(self._partition_log(topic, partition))

    def stable_end(self, topic: str, partition: int) -> int:
        """The last stable offset: the first record of an open transaction, else the end."""
        with self._lock:
            self._expire_transactions()
            entries = self._partition_log(topic, partition)
            for offset, entry in enumerate(entries):
                if entry.txn is not None and entry.txn.state == "open":
                    return offset
            return len(entries)

    def records(self, topic: str, *, read_committed: bool = True) -> list[MemoryMessage]:
        """Every record of ``topic`` a reader from the beginning gets now (read_committed stops
        each partition at its first open transaction), partition by partition."""
        with self._lock:
            self._expire_transactions()
            found = []
            for partition, entries in enumerate(self._log_of(topic)):
                for offset, entry in enumerate(entries):
                    verdict = entry.visible(read_committed)
                    if verdict is None:
                        break
                    if verdict:
                        found.append(
                            MemoryMessage(
                                topic, partition, offset, entry.key, entry.value, entry.headers
                            )
                        )
            return found

    def append(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        *,
        partition: int,
        headers: list[tuple[str, bytes]] | None = None,
        txn: _Transaction | None = None,
    ) -> int:
        """Append one record; returns its offset."""
        with self._changed:
            entries = self._partition_log(topic, partition)
            entries.append(_Entry(key, value, headers, txn))
            if txn is not None:
                txn.written.add((topic, partition))
            self._changed.notify_all()
            return len(entries) - 1

    def wait_for_change(self, timeout_s: float) -> None:
        with self._changed:
            self._changed.wait(timeout_s)

    # -- transactions -----------------------------------------------------------------------

    def _init_producer(self, txn_id: str) -> int:
        with self._changed:
            self._expire_transactions()
            epoch = self._epochs.get(txn_id, 0) + 1
            self._epochs[txn_id] = epoch
            left = self._open.pop(txn_id, None)
            if left is not None:
                self._resolve(left, "aborted")
            self._changed.notify_all()
            return epoch

    def _check_epoch(self, txn_id: str, epoch: int | None) -> None:
        if epoch is None:
            raise _error(KafkaError._STATE, "init_transactions() was not called")
        if self._epochs.get(txn_id) != epoch:
            raise _error(
                KafkaError._FENCED,
                f"producer with transactional.id {txn_id!r} was fenced by a newer instance",
                fatal=True,
            )

    def _begin(self, txn_id: str, epoch: int | None, timeout_s: float) -> _Transaction:
        with self._lock:
            self._expire_transactions()
            self._check_epoch(txn_id, epoch)
            assert epoch is not None
            txn = _Transaction(txn_id, epoch, time.monotonic(), timeout_s)
            self._open[txn_id] = txn
            return txn

    def _usable(self, txn: _Transaction | None, epoch: int | None) -> _Transaction:
        """The producer's open transaction, or the error its next call gets."""
        self._expire_transactions()
        if txn is None:
            raise _error(KafkaError._STATE, "no transaction in progress (begin_transaction())")
        self._check_epoch(txn.txn_id, epoch)
        if txn.state == "aborted":
            raise _error(
                KafkaError.INVALID_PRODUCER_EPOCH,
                txn.aborted_by_broker or "the transaction was aborted",
                abortable=True,
            )
        return txn

    def _add_offsets(
        self,
        txn: _Transaction | None,
        epoch: int | None,
        meta: Any,
        offsets: list[TopicPartition],
    ) -> None:
        with self._lock:
            txn = self._usable(txn, epoch)
            if not isinstance(meta, GroupMetadata):
                raise _error(KafkaError._INVALID_ARG, "group metadata of another client")
            group = self._groups.setdefault(meta.group_id, _Group())
            if meta.member_id is not None and meta.member_id not in group.members:
                raise _error(
                    KafkaError.UNKNOWN_MEMBER_ID,
                    f"member {meta.member_id} is no longer in group {meta.group_id!r}",
                    abortable=True,
                )
            kept = txn.offsets.setdefault(meta.group_id, {})
            for tp in offsets:
                kept[(tp.topic, tp.partition)] = tp.offset

    def _end(self, txn: _Transaction | None, epoch: int | None, outcome: str) -> None:
        with self._changed:
            if outcome == "aborted" and txn is not None and txn.state == "aborted":
                # Aborted by the broker already (its timeout): the abort acknowledges it.
                self._check_epoch(txn.txn_id, epoch)
                return
            txn = self._usable(txn, epoch)
            self._open.pop(txn.txn_id, None)
            self._resolve(txn, outcome)
            self._changed.notify_all()

    def _resolve(self, txn: _Transaction, outcome: str) -> None:
        txn.state = outcome
        for topic, partition in sorted(txn.written):
            self._logs[topic][partition].append(_Entry(None, None, None, txn, marker=True))
        if outcome == "committed":
            for group_id, offsets in txn.offsets.items():
                self._groups.setdefault(group_id, _Group()).committed.update(offsets)

    def _expire_transactions(self) -> None:
        now = time.monotonic()
        for txn_id, txn in list(self._open.items()):
            if now - txn.started_at > txn.timeout_s:
                del self._open[txn_id]
                txn.aborted_by_broker = (
                    f"transaction of {txn_id!r} aborted by the broker: open longer than its "
                    f"transaction.timeout.ms ({txn.timeout_s * 1000:.0f})"
                )
                self._resolve(txn, "aborted")
                self._changed.notify_all()

    def open_transactions(self) -> list[str]:
        """The transactional ids with a transaction open now."""
        with self._lock:
            self._expire_transactions()
            return sorted(self._open)

    # -- groups -----------------------------------------------------------------------------

    def committed(self, group_id: str) -> dict[Where, int]:
        with self._lock:
            return dict(self._groups.get(group_id, _Group()).committed)

    def _committed_offset(self, group_id: str | None, where: Where) -> int | None:
        if group_id is None:
            return None
        group = self._groups.get(group_id)
        return None if group is None else group.committed.get(where)

    def _join(self, group_id: str, member: _Member) -> None:
        with self._changed:
            group = self._groups.setdefault(group_id, _Group())
            if member.instance_id is not None:
                for old in list(group.members.values()):
                    if old.instance_id == member.instance_id:
                        # Static membership: the new instance takes the old one's place (and
                        # its partitions, at once); the old one is fenced.
                        self._leave(group_id, old.member_id)
                        old.consumer._fenced = (
                            f"group.instance.id {member.instance_id!r} was taken over"
                        )
            group.members[member.member_id] = member
            self._reassign(group)
            self._changed.notify_all()

    def _leave(self, group_id: str, member_id: str) -> None:
        with self._changed:
            group = self._groups.get(group_id)
            if group is None or group.members.pop(member_id, None) is None:
                return
            for where in [w for w, m in group.owner.items() if m == member_id]:
                del group.owner[where]
            self._reassign(group)
            self._changed.notify_all()

    def _reassign(self, group: _Group) -> None:
        """Spread the subscribed partitions over the members: even counts, and each member
        keeps what it owns as far as its share allows (cooperative-sticky's outcome)."""
        group.generation += 1
        members = sorted(group.members.values(), key=lambda m: m.member_id)
        for member in members:
            member.target = set()
        if not members:
            return
        topics = sorted({t for m in members for t in m.topics})
        partitions = [(t, p) for t in topics if t in self._logs for p in range(len(self._logs[t]))]
        base, extra = divmod(len(partitions), len(members))
        quota = {m.member_id: base + (1 if i < extra else 0) for i, m in enumerate(members)}
        free = []
        for where in partitions:
            owner = group.owner.get(where)
            holder = group.members.get(owner) if owner is not None else None
            if (
                holder is not None
                and where[0] in holder.topics
                and len(holder.target) < quota[holder.member_id]
            ):
                holder.target.add(where)
            else:
                free.append(where)
        for where in free:
            for member in members:
                if where[0] in member.topics and len(member.target) < quota[member.member_id]:
                    member.target.add(where)
                    break

    def _rebalance_step(self, group_id: str, member: _Member) -> tuple[list[Where], list[Where]]:
        """What ``member`` gives up and takes now: it gives up what is no longer its target,
        and takes the partitions of its target that nobody owns any more."""
        with self._lock:
            group = self._groups[group_id]
            owned = {w for w, m in group.owner.items() if m == member.member_id}
            revoke = sorted(owned - member.target)
            for where in revoke:
                del group.owner[where]
            assign = sorted(w for w in member.target - owned if w not in group.owner)
            for where in assign:
                group.owner[where] = member.member_id
            if revoke:
                self._changed.notify_all()
            return revoke, assign

    # -- clients ----------------------------------------------------------------------------

    def consumer(self, config: dict[str, Any]) -> MemoryConsumer:
        return MemoryConsumer(self, config)

    def producer(self, config: dict[str, Any]) -> MemoryProducer:
        return MemoryProducer(self, config)

    def _new_member_id(self) -> str:
        return f"member-{next(self._ids)}"


class MemoryConsumer:
    """confluent-kafka's ``Consumer`` on a :class:`MemoryBroker`: ``subscribe`` (group
    membership, rebalance callbacks) or ``assign``/``incremental_assign`` (by hand)."""

    def __init__(self, broker: MemoryBroker, config: dict[str, Any]) -> None:
        self._broker = broker
        self.group_id: str | None = config.get("group.id")
        self._instance_id: str | None = config.get("group.instance.id")
        self._read_committed = config.get("isolation.level", "read_committed") == "read_committed"
        self._reset = str(config.get("auto.offset.reset", "latest"))
        #: assigned partition -> the next offset to read
        self._positions: dict[Where, int] = {}
        self._member: _Member | None = None
        self._callbacks: dict[str, Rebalance | None] = {}
        self._closed = False
        self._joined = False
        #: Why this consumer may not go on (its static identity was taken over), or None.
        self._fenced: str | None = None

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("Consumer closed")
        if self._fenced is not None:
            raise _error(KafkaError.FENCED_INSTANCE_ID, self._fenced, fatal=True)

    # -- assignment -------------------------------------------------------------------------

    def subscribe(
        self,
        topics: list[str],
        on_assign: Rebalance | None = None,
        on_revoke: Rebalance | None = None,
        on_lost: Rebalance | None = None,
    ) -> None:
        self._check()
        if self.group_id is None:
            raise _error(KafkaError._INVALID_ARG, "subscribe() needs group.id")
        self._callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        self._member = _Member(
            self._broker._new_member_id(), self._instance_id, tuple(topics), self
        )
        self._broker._join(self.group_id, self._member)

    def _start(self, tp: TopicPartition) -> int:
        where = (tp.topic, tp.partition)
        low, high = self._broker.watermarks(*where)
        offset = tp.offset
        if offset in (OFFSET_INVALID, -1000):  # OFFSET_STORED: the group's committed offset
            committed = self._broker._committed_offset(self.group_id, where)
            offset = (
                committed
                if committed is not None
                else (
                    OFFSET_BEGINNING
                    if self._reset in ("earliest", "smallest", "beginning")
                    else OFFSET_END
                )
            )
        if offset == OFFSET_BEGINNING:
            return low
        if offset == OFFSET_END:
            return self._broker.stable_end(*where) if self._read_committed else high
        return max(low, min(offset, high))

    def assign(self, partitions: list[TopicPartition]) -> None:
        self._check()
        self._positions = {(tp.topic, tp.partition): self._start(tp) for tp in partitions}

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self._check()
        for tp in partitions:
            self._positions[(tp.topic, tp.partition)] = self._start(tp)

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        self._check()
        for tp in partitions:
            self._positions.pop((tp.topic, tp.partition), None)

    def assignment(self) -> list[TopicPartition]:
        self._check()
        return [TopicPartition(t, p) for t, p in sorted(self._positions)]

    def _rebalance(self) -> None:
        member = self._member
        if member is None or self.group_id is None:
            return
        revoke, assign = self._broker._rebalance_step(self.group_id, member)
        if revoke:
            on_revoke = self._callbacks.get("revoke")
            if on_revoke is not None:
                on_revoke(self, [TopicPartition(t, p) for t, p in revoke])
            for where in revoke:
                self._positions.pop(where, None)
        if assign or not self._joined:
            # librdkafka tells a member of its first assignment even when it is empty.
            self._joined = True
            on_assign = self._callbacks.get("assign")
            tps = [TopicPartition(t, p) for t, p in assign]
            if on_assign is not None:
                on_assign(self, tps)
            # As confluent-kafka does when the callback assigned nothing itself: start each
            # at the group's committed offset (else auto.offset.reset).
            for tp in tps:
                self._positions.setdefault((tp.topic, tp.partition), self._start(tp))

    # -- reading ----------------------------------------------------------------------------

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[MemoryMessage]:
        if self._fenced is not None and not self._closed:
            # As librdkafka: the fatal error comes as an error event of consume().
            error = KafkaError(KafkaError._FATAL, f"Fatal error: {self._fenced}", fatal=True)
            return [MemoryMessage("", -1, -1, None, None, None, error)]
        self._check()
        deadline = time.monotonic() + (timeout if timeout >= 0 else 1e9)
        while True:
            self._rebalance()
            found = self._gather(num_messages)
            left = deadline - time.monotonic()
            if found or left <= 0:
                return found
            self._broker.wait_for_change(min(left, 0.05))

    def _gather(self, limit: int) -> list[MemoryMessage]:
        broker = self._broker
        found: list[MemoryMessage] = []
        with broker._lock:
            broker._expire_transactions()
            for (topic, partition), start in sorted(self._positions.items()):
                entries = broker._partition_log(topic, partition)
                offset = start
                while offset < len(entries) and len(found) < limit:
                    entry = entries[offset]
                    verdict = entry.visible(self._read_committed)
                    if verdict is None:
                        break
                    if verdict:
                        found.append(
                            MemoryMessage(
                                topic, partition, offset, entry.key, entry.value, entry.headers
                            )
                        )
                    offset += 1
                # Past what was read and any markers or aborted records after it, as
                # librdkafka's position moves past control records it fetched.
                while (
                    offset < len(entries) and entries[offset].visible(self._read_committed) is False
                ):
                    offset += 1
                self._positions[(topic, partition)] = offset
                if len(found) >= limit:
                    break
        return found

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        self._check()
        return [
            TopicPartition(
                tp.topic,
                tp.partition,
                self._positions.get((tp.topic, tp.partition), OFFSET_INVALID),
            )
            for tp in partitions
        ]

    def committed(
        self, partitions: list[TopicPartition], timeout: float = -1
    ) -> list[TopicPartition]:
        self._check()
        found = []
        for tp in partitions:
            offset = self._broker._committed_offset(self.group_id, (tp.topic, tp.partition))
            found.append(
                TopicPartition(tp.topic, tp.partition, OFFSET_INVALID if offset is None else offset)
            )
        return found

    def seek(self, partition: TopicPartition) -> None:
        self._check()
        where = (partition.topic, partition.partition)
        if where not in self._positions:
            raise _error(KafkaError._STATE, f"seek: {where} is not assigned to this consumer")
        self._positions[where] = self._start(partition)

    def consumer_group_metadata(self) -> GroupMetadata:
        self._check()
        if self.group_id is None:
            raise _error(KafkaError._INVALID_ARG, "consumer_group_metadata() needs group.id")
        return GroupMetadata(
            self.group_id, self._member.member_id if self._member is not None else None
        )

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        self._check()
        return self._broker.watermarks(partition.topic, partition.partition)

    def close(self) -> None:
        """Leave the group (after ``on_revoke`` of what it owns, as librdkafka's close)."""
        if self._closed:
            return
        member = self._member
        if member is not None and self.group_id is not None and self._fenced is None:
            owned = [w for w in sorted(self._positions) if w[0] in member.topics]
            on_revoke = self._callbacks.get("revoke")
            if owned and on_revoke is not None:
                on_revoke(self, [TopicPartition(t, p) for t, p in owned])
            self._broker._leave(self.group_id, member.member_id)
        self._closed = True
        self._positions.clear()


class MemoryProducer:
    """confluent-kafka's ``Producer`` on a :class:`MemoryBroker`: transactional with a
    ``transactional.id``, otherwise each record is in the log (and acknowledged) at once."""

    def __init__(self, broker: MemoryBroker, config: dict[str, Any]) -> None:
        self._broker = broker
        self._txn_id: str | None = config.get("transactional.id")
        self._timeout_s = (
            int(config.get("transaction.timeout.ms", DEFAULT_TRANSACTION_TIMEOUT_MS)) / 1000
        )
        self._murmur = config.get("partitioner") in ("murmur2", "murmur2_random")
        self._epoch: int | None = None
        self._txn: _Transaction | None = None
        self._deliveries: list[tuple[Callable[[Any, Any], None], MemoryMessage]] = []
        self._spread = itertools.count()
        self._lock = threading.Lock()

    def _partition_for(self, topic: str, key: bytes | None) -> int:
        count = self._broker.partitions(topic)
        if key is None:
            # Keyless records spread round-robin (librdkafka picks at random).
            return next(self._spread) % count
        if self._murmur:
            return murmur2_partition(key, count)
        return zlib.crc32(key) % count

    def _transactional(self) -> str:
        if self._txn_id is None:
            raise _error(KafkaError._NOT_CONFIGURED, "the producer has no transactional.id")
        return self._txn_id

    def init_transactions(self, timeout: float = -1) -> None:
        self._epoch = self._broker._init_producer(self._transactional())
        self._txn = None

    def begin_transaction(self) -> None:
        txn_id = self._transactional()
        with self._broker._lock:
            if self._txn is not None and self._txn.state == "open":
                self._broker._check_epoch(txn_id, self._epoch)
                raise _error(KafkaError._STATE, "a transaction is in progress already")
            self._txn = self._broker._begin(txn_id, self._epoch, self._timeout_s)

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int = -1,
        *,
        on_delivery: Callable[[Any, Any], None] | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        broker = self._broker
        with broker._lock:
            txn = None
            if self._txn_id is not None:
                txn = broker._usable(self._txn, self._epoch)
            where = partition if partition >= 0 else self._partition_for(topic, key)
            offset = broker.append(topic, value, key, partition=where, headers=headers, txn=txn)
        if on_delivery is not None:
            with self._lock:
                self._deliveries.append(
                    (on_delivery, MemoryMessage(topic, where, offset, key, value, headers))
                )

    def poll(self, timeout: float = 0) -> int:
        with self._lock:
            due, self._deliveries = self._deliveries, []
        for callback, message in due:
            callback(None, message)
        return len(due)

    def flush(self, timeout: float = -1) -> int:
        self.poll(0)
        return 0

    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], group_metadata: Any, timeout: float = -1
    ) -> None:
        self._broker._add_offsets(self._txn, self._epoch, group_metadata, positions)

    def commit_transaction(self, timeout: float = -1) -> None:
        self.flush()
        self._broker._end(self._txn, self._epoch, "committed")
        self._txn = None

    def abort_transaction(self, timeout: float = -1) -> None:
        self._broker._end(self._txn, self._epoch, "aborted")
        self._txn = None


if TYPE_CHECKING:

    def _conforms(broker: MemoryBroker) -> tuple[BatchConsumer, TransactionalProducer]:
        """mypy checks here that the fakes satisfy the data plane's protocols."""
        return broker.consumer({}), broker.producer({})
