"""Where a scope's spend state lives, so an allowance request reaches the worker that owns it.

Agent states follow the calls topic, which the shim produces keyed by agent id with
librdkafka's default partitioner (``consistent_random``: CRC-32 of the key). Pool, workflow and
task-type states follow the processor's second hop, produced by faust through aiokafka, whose
default partitioner is Java's (murmur2 of the key). An allowance request names its partition
explicitly with the same function, on a topic with as many partitions as calls.
"""

from __future__ import annotations

import zlib

__all__ = ["crc32_partition", "murmur2", "murmur2_partition", "state_key", "state_partition"]

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (seed 0x9747b28c), as a signed 32-bit int like Java's."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    left = length % 4
    if left == 3:
        h ^= data[whole + 2] << 16
    if left >= 2:
        h ^= data[whole + 1] << 8
    if left >= 1:
        h ^= data[whole]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The partition Java's and aiokafka's default partitioners choose for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def crc32_partition(key: bytes, partitions: int) -> int:
    """The partition librdkafka's ``consistent_random`` partitioner chooses for ``key``."""
    return zlib.crc32(key) % partitions


def state_key(scope: str) -> bytes:
    """The key of a scope's spend state: the agent id for agents, the scope otherwise."""
    kind, _, name = scope.partition(":")
    return (name if kind == "agent" else scope).encode()


def state_partition(scope: str, partitions: int) -> int:
    """The partition of ``scope``'s spend state among ``partitions`` (as many as calls)."""
    key = state_key(scope)
    if scope.startswith("agent:"):
        return crc32_partition(key, partitions)
    return murmur2_partition(key, partitions)
