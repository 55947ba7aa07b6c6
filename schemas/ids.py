"""UUIDv7 event ids: time-ordered, so ClickHouse and Kafka tooling sort them by creation."""

from __future__ import annotations

import os
import time
import uuid

__all__ = ["uuid7", "uuid7_time_ms"]


def uuid7(unix_ms: int | None = None) -> uuid.UUID:
    """Return a RFC 9562 version 7 UUID for ``unix_ms`` (default: now)."""
    ms = time.time_ns() // 1_000_000 if unix_ms is None else unix_ms
    if not 0 <= ms < 1 << 48:
        raise ValueError(f"uuid7 timestamp must fit 48 bits of unix milliseconds, got {ms}")
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        (ms << 80)
        | (0x7 << 76)
        | ((rand >> 62) & 0xFFF) << 64
        | (0b10 << 62)
        | (rand & ((1 << 62) - 1))
    )
    return uuid.UUID(int=value)


def uuid7_time_ms(value: uuid.UUID) -> int:
    """The unix milliseconds embedded in a version 7 UUID."""
    if value.version != 7:
        raise ValueError(f"expected a version 7 UUID, got version {value.version}")
    return value.int >> 80
