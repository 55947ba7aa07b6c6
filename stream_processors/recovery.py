"""Restore the agent states of calls partitions from their changelog, before they are counted.

The changelog (compacted, one partition per calls partition) holds each agent's latest state,
written in the same transaction as the calls offsets that produced it. Reading it with
read_committed to the end offset seen at assignment gives exactly the state those committed
offsets stand for. The end offset may sit behind an open transaction of a worker that died
mid-cycle; the read then waits until that transaction is aborted (its restart fences it, or
the transaction timeout does).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from .state import SpendState
from .state_codec import decode_state

__all__ = ["RestoreStalled", "decode_key", "encode_key", "restore_states"]

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0


class RestoreStalled(RuntimeError):
    """The changelog did not reach its end offset in time."""


def encode_key(agent_id: str) -> bytes:
    # faust wrote the table's keys as JSON strings; the same changelog is read and written.
    return json.dumps(agent_id).encode()


def decode_key(raw: bytes) -> str:
    if raw[:1] == b'"':
        decoded = json.loads(raw)
        if isinstance(decoded, str):
            return decoded
    return raw.decode()


def restore_states(
    new_consumer: Callable[[], Any],
    topic: str,
    partitions: Iterable[int],
    *,
    timeout_s: float = 120.0,
    on_invalid: Callable[[int, int, str], None] | None = None,
) -> dict[int, dict[str, SpendState]]:
    """Each partition's agent states, as of the changelog's end offset now.

    A value that does not decode is reported to ``on_invalid(partition, offset, reason)`` and
    skipped (the state starts from the previous value, or empty)."""
    wanted = sorted(set(partitions))
    found: dict[int, dict[str, SpendState]] = {p: {} for p in wanted}
    if not wanted:
        return found
    consumer = new_consumer()
    try:
        ends: dict[int, int] = {}
        starts = []
        for p in wanted:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10.0)
            if high > low:
                ends[p] = high
                starts.append(TopicPartition(topic, p, OFFSET_BEGINNING))
        if not ends:
            return found
        consumer.assign(starts)
        raw: dict[int, dict[str, bytes | None]] = {p: {} for p in ends}
        began = last_note = time.monotonic()
        read = 0
        while True:
            positions = consumer.position([TopicPartition(topic, p) for p in ends])
            left = {
                tp.partition: ends[tp.partition] - tp.offset
                for tp in positions
                if tp.offset < 0 or tp.offset < ends[tp.partition]
            }
            if not left:
                break
            now = time.monotonic()
            if now - began > timeout_s:
                raise RestoreStalled(
                    f"restoring {topic} partitions {sorted(left)} did not reach the end offsets "
                    f"{ {p: ends[p] for p in left} } within {timeout_s:.0f} s: an open "
                    "transaction of another worker may hold it; it is aborted within the "
                    "transaction timeout, or when that worker restarts"
                )
            if now - last_note >= PROGRESS_EVERY_S:
                log.info("restoring %s: %d records read, %s left", topic, read, left)
                last_note = now
            for message in consumer.consume(num_messages=10_000, timeout=0.2):
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        log.warning("restoring %s: %s", topic, error)
                    continue
                key = message.key()
                if key is None:
                    continue
                raw[message.partition()][decode_key(key)] = message.value()
                read += 1
        for p, values in raw.items():
            for key, value in values.items():
                if value is None:
                    continue
                try:
                    found[p][key] = decode_state(value)
                except ValueError as exc:
                    if on_invalid is not None:
                        on_invalid(p, -1, f"agent state {key!r} does not decode: {exc}")
        log.info(
            "restored %d agent states of %s partitions %s in %.2f s",
            sum(len(v) for v in found.values()),
            topic,
            wanted,
            time.monotonic() - began,
        )
        return found
    finally:
        consumer.close()
