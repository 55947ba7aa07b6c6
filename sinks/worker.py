"""SinkWorker: the calls, control and alerts topics -> their tables, exactly once in effect.

Per batch (up to `batch_max_rows` records, or `batch_catch_up_rows` while behind, or
`batch_max_ms` of event-loop time):
1. every record is parsed; an invalid one becomes an InvalidMessage for the dlq, never a row;
   a record whose id (event_id, command_id, alert_id) is already stored, or repeats earlier in
   the batch, is skipped: a spool replay re-sends an event at a new offset and it must count
   once, in the base table and so in every rollup fed from it;
2. valid rows are inserted per topic and month (so that each insert writes one ClickHouse part
   and is all-or-nothing) with `insert_deduplication_token` =
   "<topic>:<partition>:<first offset>-<last offset>[,<partition>:<first>-<last>...]" of the
   chunk's rows; a failed insert is retried with the same chunk and token, with backoff, while
   consumption is paused;
3. the dlq records are produced and flushed;
4. only then are the offsets committed, synchronously.

After a crash the batch boundaries of the replay need not match the lost run's, so tokens alone
could not stop a duplicate. So the first time a partition is assigned, the worker reads which
offsets at or after the committed position are already in the table and skips them; a chunk is
one part, so it is either wholly present or wholly absent.

`run` overlaps batches: while batch k's insert runs on a helper thread, batch k+1 is fetched
and decoded; k is completed (its retries, dlq, commit) before k+1's ids are looked up.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from agentledger.config import Settings
from agentledger.schemas import DeadLetter, dead_letter

from .database import ClickHouseError
from .decoding import month_of
from .flood import DlqFlood, FloodGuard
from .lag import LagHistogram
from .rows import SourcePosition, dedup_token, new_tuple
from .store import SinkStore
from .streams import Decoded, DecodeError, SinkStream, default_streams

__all__ = ["Chunk", "SinkStats", "SinkWorker", "consumer_config", "wall_clock_ms"]

log = logging.getLogger(__name__)

Clock = Callable[[], int]
TopicPartitionKey = tuple[str, int]
T = TypeVar("T")


def _insert_histogram() -> Any:
    from .metrics import insert_histogram

    return insert_histogram()


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def consumer_config(settings: Settings) -> dict[str, object]:
    return {
        **settings.kafka_client_config(),
        "bootstrap.servers": settings.kafka,
        "group.id": f"{settings.topic_prefix}sink",
        "enable.auto.commit": False,
        # The worker never stores offsets itself; commit() is always given explicit offsets.
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
        "fetch.wait.max.ms": 100,
        "fetch.min.bytes": 262144,
        # A sink killed with -9 keeps its partitions until the broker gives up on it; 10 s
        # (the default is 45 s) bounds how long a restarted sink waits to get them back.
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 3_000,
    }


def producer_config(settings: Settings) -> dict[str, object]:
    return {
        **settings.kafka_client_config(),
        "bootstrap.servers": settings.kafka,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
    }


class MessageLike(Protocol):
    def error(self) -> Any: ...
    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def timestamp(self) -> tuple[int, int]: ...


class ConsumerLike(Protocol):
    def subscribe(
        self, topics: list[str], on_assign: Any = ..., on_revoke: Any = ..., on_lost: Any = ...
    ) -> None: ...
    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]: ...
    def commit(
        self, message: Any = None, offsets: Any = None, asynchronous: bool = True
    ) -> Any: ...
    def assignment(self) -> list[Any]: ...
    def pause(self, partitions: list[Any]) -> None: ...
    def resume(self, partitions: list[Any]) -> None: ...
    def poll(self, timeout: float = -1) -> Any: ...
    def seek(self, partition: Any) -> None: ...
    def position(self, partitions: list[Any]) -> list[Any]: ...
    def get_watermark_offsets(
        self, partition: Any, timeout: float = ..., cached: bool = ...
    ) -> tuple[int, int] | None: ...
    def close(self) -> None: ...


class ProducerLike(Protocol):
    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        on_delivery: Any = None,
    ) -> None: ...
    def flush(self, timeout: float = -1) -> int: ...
    def poll(self, timeout: float = -1) -> int: ...


@dataclass
class SinkStats:
    """Read by the health endpoint from another thread; plain attribute writes are atomic."""

    rows_inserted: int = 0
    rows_skipped_replayed: int = 0
    duplicates_skipped: int = 0
    invalid: int = 0
    batches: int = 0
    last_commit_ms: int | None = None
    retrying: bool = False
    last_error: str | None = None
    lag: int | None = None
    assigned: list[str] = field(default_factory=list)
    lag_ms: LagHistogram = field(default_factory=LagHistogram)
    lag_by_partition: dict[tuple[str, int], int] = field(default_factory=dict)
    # Built lazily by the field's factory so importing the worker needs no prometheus-client
    # until a SinkStats exists; sinks/metrics.py exposes it on /metrics.
    insert_seconds: Any = field(default_factory=lambda: _insert_histogram())

    def as_json(self) -> dict[str, object]:
        return {
            **self.lag_ms.as_json(),
            "rows_inserted": self.rows_inserted,
            "rows_skipped_replayed": self.rows_skipped_replayed,
            "duplicates_skipped": self.duplicates_skipped,
            "invalid": self.invalid,
            "batches": self.batches,
            "last_commit_ms": self.last_commit_ms,
            "retrying": self.retrying,
            "last_error": self.last_error,
            "lag": self.lag,
            "assigned": list(self.assigned),
        }


@dataclass
class Chunk:
    """Rows of one topic and one month, from any of its partitions: one insert, one ClickHouse
    part (so all-or-nothing), one token. One insert per batch rather than one per partition:
    each insert runs every materialized view and writes a part per table, so with 6 partitions
    per-partition inserts cost several times more per row (measured)."""

    topic: str
    stream: SinkStream
    rows: list[Any] = field(default_factory=list)  # column lists, or JSON lines (bytes)
    sources: list[tuple[int, int]] = field(default_factory=list)  # (partition, offset) per row

    @property
    def token(self) -> str:
        """The offset range of each partition in the chunk, in partition order: the same rows
        give the same token, so a retried insert is dropped by ClickHouse."""
        # Runs of one partition (the usual layout: a batch is decoded partition by partition):
        # each run's (partition, offset) pairs, min and max compared in C.
        ranges: dict[int, tuple[int, int]] = {}
        for partition, run in itertools.groupby(self.sources, key=operator.itemgetter(0)):
            pairs = list(run)
            lo, hi = min(pairs)[1], max(pairs)[1]
            if partition in ranges:
                lo, hi = min(lo, ranges[partition][0]), max(hi, ranges[partition][1])
            ranges[partition] = (lo, hi)
        (first, (lo, hi)), *rest = sorted(ranges.items())
        token = dedup_token(self.topic, first, lo, hi)
        return ",".join([token, *(f"{p}:{a}-{b}" for p, (a, b) in rest)])

    @property
    def partitions(self) -> set[int]:
        return {partition for partition, _ in self.sources}

    def only(self, partitions: set[int]) -> Chunk:
        """The rows of `partitions` only (the others were revoked while this chunk waited)."""
        kept = [i for i, (p, _) in enumerate(self.sources) if p in partitions]
        return Chunk(
            self.topic,
            self.stream,
            [self.rows[i] for i in kept],
            [self.sources[i] for i in kept],
        )


class _Abandon(Exception):
    """Stop was requested mid-batch: leave it uncommitted, the next run replays it."""


@dataclass
class _Batch:
    """One batch between its steps: decoded (prepare), then inserting (launch), then done."""

    candidates: list[tuple[SinkStream, int, int, Decoded]]
    dead: list[DeadLetter]
    commit_to: dict[TopicPartitionKey, int]
    appended: list[int]
    chunks: list[Chunk] = field(default_factory=list)
    # The first insert attempt of every chunk, run off the main thread: the index of the first
    # chunk that failed (len(chunks) if none did) and the clock when the inserts returned (the
    # rows are queryable from then on). Failures are retried on the main thread.
    inserting: Future[tuple[int, int]] | None = None


class SinkWorker:
    def __init__(
        self,
        settings: Settings,
        store: SinkStore,
        *,
        streams: Sequence[SinkStream] | None = None,
        consumer: ConsumerLike | None = None,
        producer: ProducerLike | None = None,
        clock: Clock = wall_clock_ms,
        batch_max_rows: int = 10_000,
        batch_max_ms: int = 1_000,
        batch_catch_up_rows: int | None = None,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 10.0,
        stop: threading.Event | None = None,
        flood: FloodGuard | None = None,
        between_batches: Callable[[], bool] | None = None,
    ) -> None:
        if batch_max_rows < 1 or batch_max_ms < 1:
            raise ValueError(
                f"batch_max_rows and batch_max_ms must be >= 1, got "
                f"{batch_max_rows} and {batch_max_ms}"
            )
        self.settings = settings
        self.store = store
        self.topic = settings.topics.calls
        chosen = list(streams) if streams is not None else default_streams(settings)
        self._streams: dict[str, SinkStream] = {s.topic: s for s in chosen}
        self.dlq_topic = settings.topics.dlq
        self.clock = clock
        self.batch_max_rows = batch_max_rows
        self.batch_max_ms = batch_max_ms
        # While behind (the previous batch filled up before its time ran out), a batch may
        # grow to this many rows, still within batch_max_ms: each insert has a fixed cost (a
        # part per table, seven materialized views), so 50k-row inserts measured half the chDB
        # CPU per row of 10k-row ones, 200k-row ones a third less again. At rates below
        # batch_max_rows per batch_max_ms nothing changes: batches end on time, as the flush
        # rule says.
        self.batch_catch_up_rows = max(batch_max_rows, batch_catch_up_rows or batch_max_rows)
        self._behind = False
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.stop = stop if stop is not None else threading.Event()
        self.stats = SinkStats()
        self.flood = flood if flood is not None else FloodGuard()
        if consumer is None:
            from confluent_kafka import Consumer

            # cast: the stubs' signatures are looser than the Protocol the fakes implement.
            consumer = cast(ConsumerLike, Consumer(consumer_config(settings)))
        if producer is None:
            from confluent_kafka import Producer

            producer = cast(ProducerLike, Producer(producer_config(settings)))
        self.consumer: ConsumerLike = consumer
        self.producer: ProducerLike = producer
        self._assigned: set[TopicPartitionKey] = set()
        # Offsets already in the table at or after the committed position, per partition, read
        # once per assignment (absent = not read yet), emptied as the replay passes them.
        self._present: dict[TopicPartitionKey, set[int]] = {}
        self._paused = False
        self._last_lag_ms: int | None = None
        self._inserter: ThreadPoolExecutor | None = None
        self._inflight: Future[tuple[int, int]] | None = None
        # Called at every batch boundary, with no insert in flight: a migration's fence
        # (sinks/rebuild.py) runs its steps there. False: insert nothing more (schema half
        # swapped and stop requested), the batch is left uncommitted.
        self.between_batches = between_batches

    # -- partition assignment -----------------------------------------------------------

    def subscribe(self) -> None:
        self.consumer.subscribe(
            list(self._streams),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    def _on_assign(self, _consumer: object, partitions: list[Any]) -> None:
        for tp in partitions:
            self._assigned.add((tp.topic, tp.partition))
            self._present.pop((tp.topic, tp.partition), None)
        self.stats.assigned = sorted(f"{t}:{p}" for t, p in self._assigned)
        log.info("assigned %s", self.stats.assigned)

    def _on_revoke(self, _consumer: object, partitions: list[Any]) -> None:
        # An insert still running could land after the new owner read which offsets landed,
        # and it would insert them again: so the partitions go only once it has finished.
        inflight = self._inflight
        if inflight is not None:
            inflight.exception()  # waits; a failure is retried (or dropped) by its batch
        for tp in partitions:
            self._assigned.discard((tp.topic, tp.partition))
            self._present.pop((tp.topic, tp.partition), None)
        self.stats.assigned = sorted(f"{t}:{p}" for t, p in self._assigned)
        log.info("revoked, now assigned %s", self.stats.assigned)

    # -- main loop ----------------------------------------------------------------------

    def run(self) -> None:
        """The service loop, pipelined: batch k+1 is fetched and decoded (Python, holds the
        GIL) while batch k is being inserted (chDB/HTTP, releases it). Batch k is completed
        (dlq, commit) before batch k+1's ids are looked up and inserted, so the replay
        dedup and the commit order are those of `step`."""
        self.subscribe()
        pending: _Batch | None = None
        try:
            while not self.stop.is_set():
                messages = self.collect()
                try:
                    prepared = self._prepare(messages) if messages else None
                except DlqFlood:
                    # The batch before it is good: finish it, then stop.
                    if pending is not None:
                        self._complete(pending)
                    raise
                if pending is not None:
                    self._complete(pending)
                    pending = None
                self._at_batch_boundary()
                if prepared is None:
                    self._update_lag()
                    continue
                pending = self._launch(prepared, background=True)
            if pending is not None:
                self._complete(pending)
        except _Abandon:
            log.info("stop requested: the current batch is left uncommitted for the next run")
        finally:
            if self._inserter is not None:
                self._inserter.shutdown(wait=True)
                self._inserter = None

    def step(self) -> bool:
        """Collect and process one batch; False when nothing arrived."""
        batch = self.collect()
        try:
            self._at_batch_boundary()
            if not batch:
                self._update_lag()
                return False
            self.process(batch)
        except _Abandon:
            log.info("stop requested: %d records left uncommitted for the next run", len(batch))
        return True

    def _at_batch_boundary(self) -> None:
        if self.between_batches is not None and not self.between_batches():
            log.error("a migration left the schema half swapped: inserting nothing more")
            self.stop.set()
            raise _Abandon

    def owns_every_partition(self) -> bool:
        """This worker is assigned every partition of its topics, so no other sink of the
        group can be inserting (a migration's fence needs that against a shared server)."""
        try:
            for topic in self._streams:
                metadata = self.consumer.list_topics(topic, timeout=5.0)  # type: ignore[attr-defined]
                partitions = metadata.topics[topic].partitions
                if not partitions or any((topic, p) not in self._assigned for p in partitions):
                    return False
        except _kafka_errors() as exc:
            log.debug("metadata unavailable: %s", exc)
            return False
        return True

    def collect(self) -> list[Any]:
        """A batch: records until the row limit, or until batch_max_ms after its oldest record
        was appended; once that time is up, records already fetched are still taken (no wait)
        up to the row limit, so a backlog is drained in full batches."""
        limit = self.batch_catch_up_rows if self._behind else self.batch_max_rows
        messages: list[Any] = []
        started: int | None = None
        while len(messages) < limit and not self.stop.is_set():
            if started is None:
                wait_ms = 200
            else:
                wait_ms = max(0, self.batch_max_ms - (self.clock() - started))
            got = self.consumer.consume(
                num_messages=min(1000, limit - len(messages)),
                timeout=min(wait_ms, 200) / 1000,
            )
            taken = len(messages)
            for msg in got:
                if self._usable(msg):
                    messages.append(msg)
            if started is None:
                if not messages:
                    self._behind = False
                    return []
                started = self._batch_start(messages[0])
            elif wait_ms == 0 and len(messages) == taken:
                break
        self._behind = len(messages) >= self.batch_max_rows
        return messages

    def _batch_start(self, first: Any) -> int:
        """When the batch's time started: the first record's broker append time if it is
        earlier than now (it waited in the client while the previous batch was decoded and
        inserted: that wait counts towards the 1 s, else it would be added to the lag), but no
        earlier than one batch time ago (a broker clock behind ours must not shrink batches to
        nothing)."""
        now = self.clock()
        kind, appended_ms = first.timestamp()
        if kind == 0:  # TIMESTAMP_NOT_AVAILABLE
            return now
        return max(now - self.batch_max_ms, min(now, int(appended_ms)))

    def _usable(self, msg: MessageLike) -> bool:
        err = msg.error()
        if err is None:
            return True
        if getattr(err, "fatal", lambda: False)():
            from confluent_kafka import KafkaException

            raise KafkaException(err)
        log.warning("consumer error (librdkafka retries it): %s", err)
        return False

    # -- one batch ----------------------------------------------------------------------

    def process(self, messages: Sequence[MessageLike]) -> None:
        """One batch, start to finish: decode, insert, dlq, commit."""
        self._complete(self._launch(self._prepare(messages), background=False))

    def _prepare(self, messages: Sequence[MessageLike]) -> _Batch:
        now = self.clock()
        by_partition: dict[TopicPartitionKey, list[MessageLike]] = defaultdict(list)
        for msg in messages:
            by_partition[(msg.topic() or "", msg.partition() or 0)].append(msg)

        # Decode first, for every partition, so that ids repeated across partitions or already
        # stored are dropped before anything is inserted.
        candidates: list[tuple[SinkStream, int, int, Decoded]] = []
        dead: list[DeadLetter] = []
        commit_to: dict[TopicPartitionKey, int] = {}
        appended: list[int] = []
        judged: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # per topic: records, dead
        for (topic, partition), records in by_partition.items():
            stream = self._streams.get(topic)
            if stream is None or (topic, partition) not in self._assigned:
                # Revoked between fetch and now: the new owner reads these records.
                continue
            kept_before, dead_before = len(candidates), len(dead)
            offsets = [_offset(m) for m in records]
            present = self._present_offsets(stream, topic, partition, min(offsets))
            commit_to[(topic, partition)] = max(offsets) + 1
            if present:
                self.stats.rows_skipped_replayed += sum(o in present for o in offsets)
            if stream.decode_many is not None:
                self._decode_partition(
                    stream, partition, records, offsets, present, now, candidates, dead, appended
                )
            else:
                for msg, offset in zip(records, offsets, strict=True):
                    if offset in present:
                        continue
                    source = new_tuple(SourcePosition, (topic, partition, offset))
                    value = msg.value()
                    if not value and stream.skip_empty:
                        continue
                    try:
                        decoded = stream.decode(value or b"", source, now)
                    except DecodeError as exc:
                        dead.append(self._invalid(msg, source, str(exc), now))
                        continue
                    candidates.append((stream, partition, offset, decoded))
                    kind, appended_ms = msg.timestamp()
                    if kind != 0:  # 0: TIMESTAMP_NOT_AVAILABLE
                        appended.append(appended_ms)
            judged[topic][0] += len(candidates) - kept_before + len(dead) - dead_before
            judged[topic][1] += len(dead) - dead_before

        for topic, (count, invalid) in judged.items():
            first = next((d.message.reason for d in dead if d.message.topic == topic), None)
            self.flood.check(topic, count, invalid, first)
        return _Batch(candidates, dead, commit_to, appended)

    def _decode_partition(
        self,
        stream: SinkStream,
        partition: int,
        records: list[MessageLike],
        offsets: list[int],
        present: set[int],
        now: int,
        candidates: list[tuple[SinkStream, int, int, Decoded]],
        dead: list[DeadLetter],
        appended: list[int],
    ) -> None:
        """A partition's records through the stream's batch decoder (the calls stream): the same
        results as `decode` record by record, without a Python loop per record on the usual
        path (no replayed offsets, no invalid record, every record timestamped)."""
        assert stream.decode_many is not None
        if present:
            kept = [(m, o) for m, o in zip(records, offsets, strict=True) if o not in present]
            records, offsets = [m for m, _ in kept], [o for _, o in kept]
        values = [m.value() or b"" for m in records]
        if stream.skip_empty and not all(values):
            kept_values = [(m, o, v) for m, o, v in zip(records, offsets, values, strict=True) if v]
            records = [m for m, _, _ in kept_values]
            offsets = [o for _, o, _ in kept_values]
            values = [v for _, _, v in kept_values]
        if not records:
            return
        results = stream.decode_many(values, stream.topic, partition, offsets, now)
        stamps = [m.timestamp() for m in records]
        if not any(isinstance(r, DecodeError) for r in results):
            candidates.extend(
                zip(
                    itertools.repeat(stream),
                    itertools.repeat(partition),
                    offsets,
                    cast(list[Decoded], results),
                )
            )
            appended.extend([ms for kind, ms in stamps if kind != 0])
            return
        for msg, offset, result, (kind, ms) in zip(records, offsets, results, stamps, strict=True):
            if isinstance(result, DecodeError):
                source = new_tuple(SourcePosition, (stream.topic, partition, offset))
                dead.append(self._invalid(msg, source, str(result), now))
                continue
            candidates.append((stream, partition, offset, result))
            if kind != 0:  # 0: TIMESTAMP_NOT_AVAILABLE
                appended.append(ms)

    def _launch(self, batch: _Batch, *, background: bool) -> _Batch:
        """Drop ids already stored (so the previous batch must be complete), cut the chunks and
        start inserting them, on the inserter thread when `background`."""
        batch.chunks = self._chunks(self._drop_duplicate_ids(batch.candidates))
        if background and batch.chunks:
            if self._inserter is None:
                self._inserter = ThreadPoolExecutor(1, thread_name_prefix="sink-insert")
            batch.inserting = self._inserter.submit(self._first_attempts, batch.chunks)
            self._inflight = batch.inserting
        return batch

    def _first_attempts(self, chunks: list[Chunk]) -> tuple[int, int]:
        for index, chunk in enumerate(chunks):
            try:
                started = time.perf_counter()
                self.store.insert(chunk.stream, chunk.rows, chunk.token)
                self.stats.insert_seconds.observe(time.perf_counter() - started)
            except ClickHouseError as exc:
                log.warning("insert of %d rows failed, retrying: %s", len(chunk.rows), exc)
                return index, self.clock()
        return len(chunks), self.clock()

    def _complete(self, batch: _Batch) -> None:
        done, acknowledged = 0, 0
        if batch.inserting is not None:
            done, acknowledged = batch.inserting.result()
            self._inflight = None
        for chunk in batch.chunks[done:]:
            self._insert(chunk)
        if done < len(batch.chunks) or not acknowledged:
            acknowledged = self.clock()
        # Queryable from then on. Rows dropped as duplicates are counted too: their fact was.
        self.stats.lag_ms.add(acknowledged, batch.appended)
        if batch.dead:
            self._send_dlq(batch.dead)
        self._commit(batch.commit_to)
        self.stats.rows_inserted += sum(len(c.rows) for c in batch.chunks)
        self.stats.invalid += len(batch.dead)
        self.stats.batches += 1
        for key in batch.commit_to:
            self._forget_present_below(key, batch.commit_to[key])
        self._update_lag()

    def _drop_duplicate_ids(
        self, candidates: list[tuple[SinkStream, int, int, Decoded]]
    ) -> list[tuple[SinkStream, int, int, Decoded]]:
        """Keep the first record of each id in this batch, and none whose id is stored already
        (a spool replay delivers the same event at a new offset: it must count once)."""
        if not candidates:
            return candidates
        by_stream: dict[str, list[Decoded]] = defaultdict(list)
        first_topic = candidates[0][0].topic
        if all(item[0].topic == first_topic for item in candidates):
            by_stream[first_topic] = [item[3] for item in candidates]  # the usual batch
        else:
            for stream, _partition, _source_offset, decoded in candidates:
                by_stream[stream.topic].append(decoded)
        # Per topic: the ids stored already, then every id kept so far (one set, one lookup).
        taken: dict[str, set[str]] = {}
        repeated = False
        for topic, decoded_list in by_stream.items():
            stream = self._streams[topic]
            unique = {d.record_id for d in decoded_list}
            repeated = repeated or len(unique) < len(decoded_list)
            times = [d.time_ms for d in decoded_list]
            lo, hi = min(times), max(times)
            taken[topic] = set(  # a copy: ids kept are added to it
                self._retry(
                    functools.partial(self.store.present_ids, stream, list(unique), lo, hi),
                    f"looking up {len(unique)} ids in {stream.table}",
                )
            )
        if not repeated and not any(taken.values()):
            return candidates  # nothing stored yet, nothing repeated: the usual batch
        kept = []
        for item in candidates:
            seen, record_id = taken[item[0].topic], item[3].record_id
            if record_id in seen:
                self.stats.duplicates_skipped += 1
                continue
            seen.add(record_id)
            kept.append(item)
        if len(kept) < len(candidates):
            log.info(
                "%d records repeat an id that is stored or earlier in the batch: skipped",
                len(candidates) - len(kept),
            )
        return kept

    @staticmethod
    def _chunks(items: list[tuple[SinkStream, int, int, Decoded]]) -> list[Chunk]:
        times = [item[3].time_ms for item in items]
        # The usual batch is one month of one topic: then one chunk, built without a loop.
        one_month = bool(items) and month_of(min(times)) == month_of(max(times))
        if one_month and len({item[0].topic for item in items}) == 1:
            stream = items[0][0]
            return [
                Chunk(
                    stream.topic,
                    stream,
                    [item[3].row for item in items],
                    [(item[1], item[2]) for item in items],
                )
            ]
        per_key: dict[tuple[str, int], Chunk] = {}
        for stream, partition, offset, decoded in items:
            key = (stream.topic, 0 if one_month else decoded.month)
            chunk = per_key.get(key)
            if chunk is None:
                chunk = per_key[key] = Chunk(stream.topic, stream)
            chunk.rows.append(decoded.row)
            chunk.sources.append((partition, offset))
        return list(per_key.values())

    def _present_offsets(
        self, stream: SinkStream, topic: str, partition: int, from_offset: int
    ) -> set[int]:
        key = (topic, partition)
        present = self._present.get(key)
        if present is None:
            present = self._retry(
                lambda: self.store.present_offsets(stream, topic, partition, from_offset),
                f"reading landed offsets of {topic}:{partition}",
            )
            if present:
                log.info(
                    "%s:%d: %d records from %d on are already stored (uncommitted by a "
                    "previous run); they are skipped",
                    topic,
                    partition,
                    len(present),
                    from_offset,
                )
            self._present[key] = present
        return present

    def _forget_present_below(self, key: TopicPartitionKey, next_offset: int) -> None:
        present = self._present.get(key)
        if present:
            self._present[key] = {o for o in present if o >= next_offset}

    def _invalid(
        self, msg: MessageLike, source: SourcePosition, reason: str, now: int
    ) -> DeadLetter:
        return dead_letter(
            topic=source.topic,
            partition=source.partition,
            offset=source.offset,
            reason=reason,
            component="sink",
            detected_at_ms=now,
            key=msg.key(),
            payload=msg.value(),
        )

    # -- effects, each retried until it succeeds or stop is requested ----------------------

    def _insert(self, chunk: Chunk) -> None:
        def attempt() -> None:
            mine = {p for p in chunk.partitions if (chunk.topic, p) in self._assigned}
            if not mine:
                # Revoked while we retried: the new owner replays these records.
                return
            # A partial revocation changes the rows, and with them the token.
            part = chunk if mine == chunk.partitions else chunk.only(mine)
            started = time.perf_counter()
            self.store.insert(part.stream, part.rows, part.token)
            self.stats.insert_seconds.observe(time.perf_counter() - started)

        self._retry(attempt, f"inserting {len(chunk.rows)} rows ({chunk.token})")

    def _retry(self, action: Callable[[], T], what: str) -> T:
        delay = self.retry_initial_s
        failures = 0
        try:
            while True:
                try:
                    result = action()
                except ClickHouseError as exc:
                    failures += 1
                    self.stats.retrying = True
                    self.stats.last_error = f"{what}: {exc}"[:500]
                    log.warning(
                        "ClickHouse failed %s (attempt %d), retrying in %.1fs: %s",
                        what,
                        failures,
                        delay,
                        exc,
                    )
                    self._pause()
                    if self.stop.wait(delay):
                        raise _Abandon from exc
                    self._keep_membership()
                    delay = min(delay * 2, self.retry_max_s)
                    continue
                if failures:
                    log.info("%s succeeded after %d failed attempts", what, failures)
                    self.stats.last_error = None
                return result
        finally:
            self.stats.retrying = False
            self._resume()

    def _pause(self) -> None:
        if not self._paused:
            self.consumer.pause(self.consumer.assignment())
            self._paused = True

    def _resume(self) -> None:
        if self._paused:
            self.consumer.resume(self.consumer.assignment())
            self._paused = False

    def _keep_membership(self) -> None:
        # A consumer that does not poll for max.poll.interval.ms is expelled from the group;
        # polling while paused keeps it in, and serves rebalance callbacks.
        msg = self.consumer.poll(0)
        if msg is not None and msg.error() is None:
            # Fetched before the pause took effect: rewind so it is delivered again later.
            from confluent_kafka import TopicPartition

            self.consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))

    def _send_dlq(self, dead: list[DeadLetter]) -> None:
        pending = list(dead)
        delay = self.retry_initial_s
        while pending:
            failed: list[DeadLetter] = []
            for item in pending:
                self._produce_dlq(item, failed)
            left = self.producer.flush(10.0)
            if not failed and left == 0:
                return
            log.warning(
                "%d dlq records not delivered (%d still queued), retrying in %.1fs",
                len(failed),
                left,
                delay,
            )
            if left:
                # Still queued ones may yet be delivered; only re-send the failed ones.
                self.producer.flush(30.0)
            pending = failed
            if self.stop.wait(delay):
                raise _Abandon
            delay = min(delay * 2, self.retry_max_s)

    def _produce_dlq(self, item: DeadLetter, failed: list[DeadLetter]) -> None:
        key, value = item.key, item.value

        def report(err: object, _msg: object) -> None:
            if err is not None:
                failed.append(item)

        while True:
            try:
                self.producer.produce(self.dlq_topic, value=value, key=key, on_delivery=report)
                return
            except BufferError:
                self.producer.poll(0.5)

    def _commit(self, commit_to: dict[TopicPartitionKey, int]) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        offsets = [
            TopicPartition(t, p, o) for (t, p), o in commit_to.items() if (t, p) in self._assigned
        ]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # The rows are stored; whoever reads these records next finds them in the table
            # and skips them, so a lost commit costs a re-read, never a duplicate.
            log.warning("offset commit failed (records will be re-read and skipped): %s", exc)
            return
        self.stats.last_commit_ms = self.clock()

    def _update_lag(self) -> None:
        now = self.clock()
        if self._last_lag_ms is not None and now - self._last_lag_ms < 2_000:
            return
        self._last_lag_ms = now
        try:
            positions = self.consumer.position(self.consumer.assignment())
            lag: int | None = None
            by_partition: dict[tuple[str, int], int] = {}
            for tp in positions:
                # cached: the high watermark of the last fetch response, no broker round trip.
                marks = self.consumer.get_watermark_offsets(tp, timeout=1.0, cached=True)
                if marks is None or tp.offset < 0 or marks[1] < 0:
                    continue
                lag = (lag or 0) + max(0, marks[1] - tp.offset)
                by_partition[(tp.topic, tp.partition)] = max(0, marks[1] - tp.offset)
        except _kafka_errors() as exc:
            log.debug("lag unavailable: %s", exc)
            return
        self.stats.lag = lag
        self.stats.lag_by_partition = by_partition

    def close(self) -> None:
        self.consumer.close()
        self.producer.flush(10.0)


def _kafka_errors() -> tuple[type[Exception], ...]:
    from confluent_kafka import KafkaException

    return (KafkaException, RuntimeError)


def _offset(msg: MessageLike) -> int:
    offset = msg.offset()
    if offset is None or offset < 0:
        raise ValueError(f"a consumed record has no offset: {offset!r}")
    return offset
