"""CallEvent -> one `calls` row, and the insert dedup token of a chunk of rows.

Kept free of clickhouse-connect so it is cheap to import and to unit test.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NamedTuple

from agentledger.schemas import CallEvent

__all__ = [
    "CALL_COLUMNS",
    "MAX_DATETIME64_MS",
    "RowError",
    "SourcePosition",
    "call_to_row",
    "dedup_token",
    "ms_to_datetime",
    "new_tuple",
    "yyyymm",
]

# DateTime64(3) stores 1900-01-01 .. 2299-12-31 23:59:59.999; beyond that ClickHouse would
# silently clamp or wrap, so such events go to the dlq instead of being stored wrong.
MAX_DATETIME64_MS = 10_413_791_999_999
_UINT32_MAX = (1 << 32) - 1
_INT64_MAX = (1 << 63) - 1
_UINT16_MAX = (1 << 16) - 1

CALL_COLUMNS: tuple[str, ...] = (
    "schema_version",
    "event_id",
    "event_time",
    "agent_id",
    "pool",
    "workflow_id",
    "parent_agent_id",
    "spawn_depth",
    "task_type",
    "task_id",
    "provider",
    "requested_model",
    "used_model",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "cost_nano_usd",
    "priced",
    "pricing_version",
    "latency_ms",
    "status",
    "attempt",
    "error_type",
    "_topic",
    "_partition",
    "_offset",
    "ingested_at",
)


class RowError(ValueError):
    """A valid CallEvent whose value does not fit its ClickHouse column (it goes to the dlq:
    inserting it would fail forever and block the partition)."""


# NamedTuple(...) runs a Python-level __new__; tuple.__new__ builds the same tuple in C. The
# sink builds one SourcePosition and one Decoded per record (both showed up in its profile).
new_tuple = tuple.__new__


# A NamedTuple, not a frozen dataclass: one is built per record, and a frozen dataclass's
# __init__ (object.__setattr__ per field) showed up in the sink's profile.
class SourcePosition(NamedTuple):
    topic: str
    partition: int
    offset: int


def ms_to_datetime(ms: int) -> datetime:
    # Integer arithmetic: a float timestamp would lose the millisecond for large values.
    seconds, millis = divmod(ms, 1000)
    return datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=millis * 1000)


def yyyymm(ms: int) -> int:
    """The table's partition key, toYYYYMM(event_time) in UTC."""
    moment = ms_to_datetime(ms)
    return moment.year * 100 + moment.month


def _check_max(field: str, value: int, limit: int, column_type: str) -> None:
    if value > limit:
        raise RowError(
            f"{field}={value} does not fit the calls column type {column_type} (at most {limit})"
        )


def call_to_row(event: CallEvent, source: SourcePosition, ingested_at_ms: int) -> list[object]:
    """The row in CALL_COLUMNS order. Raises RowError naming the field that cannot be stored."""
    if event.event_time_ms > MAX_DATETIME64_MS:
        raise RowError(
            f"event_time_ms={event.event_time_ms} is after 2299-12-31, the last "
            "instant DateTime64(3) can store"
        )
    _check_max("latency_ms", event.latency_ms, _UINT32_MAX, "UInt32")
    _check_max("cost_nano_usd", event.cost_nano_usd, _INT64_MAX, "Int64")
    _check_max("spawn_depth", event.spawn_depth, _UINT16_MAX, "UInt16")
    return [
        event.schema_version,
        event.event_id,
        ms_to_datetime(event.event_time_ms),
        event.agent_id,
        event.pool,
        event.workflow_id,
        event.parent_agent_id,
        event.spawn_depth,
        event.task_type,
        event.task_id,
        event.provider,
        event.requested_model,
        event.used_model,
        event.input_tokens,
        event.output_tokens,
        event.cached_input_tokens,
        event.reasoning_tokens,
        event.cost_nano_usd,
        event.priced,
        event.pricing_version,
        event.latency_ms,
        event.status.value,
        event.attempt,
        event.error_type,
        source.topic,
        source.partition,
        source.offset,
        ms_to_datetime(ingested_at_ms),
    ]


def dedup_token(topic: str, partition: int, first_offset: int, last_offset: int) -> str:
    """`insert_deduplication_token` of a chunk: its source offset range, so a retried chunk is
    dropped by ClickHouse (needs non_replicated_deduplication_window on the table)."""
    if first_offset < 0 or last_offset < first_offset:
        raise ValueError(
            f"offset range must satisfy 0 <= first <= last, got {first_offset}-{last_offset}"
        )
    return f"{topic}:{partition}:{first_offset}-{last_offset}"
