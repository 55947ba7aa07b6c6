"""The sink's CallEvent check: records go to ClickHouse as the bytes they arrived in.

ClickHouse parses JSONEachRow far faster than Python builds rows (measured: see README "Insert
path"), so a valid record is not decoded into a row here: the check shared with the processor
(`agentledger.schemas.call_decode.decode_call_fast`: msgspec with the pydantic schema's rules),
then the columns' ranges, and the record's own bytes become its line of the insert, with the
Kafka source columns and the ingestion time spliced in front of its first field:
`{"_topic":"<topic>","_partition":P,"ingested_at_ms":T,"_offset":O,` + the record after its `{`.
The insert maps the JSON fields to the columns (`CALL_INPUT_STRUCTURE`, `CALL_INPUT_SELECT`).
An event_id in any spelling but the canonical one (upper case, no hyphens) goes through
pydantic and is sent re-encoded, in the canonical spelling: the stored value is the same.

The pydantic schema stays the authority: a record the fast path does not accept *for certain*
(anything unusual: a missing event_id, a number sent as a string, a value out of a column's
range, any constraint failure) is decoded by pydantic, which either gives the dlq reason (the
same as before) or the event, whose canonical JSON (`model_dump_json`) becomes the line
instead of the original bytes. So the fast path may only be stricter than pydantic, never
looser; tests/unit/test_sink_call_decode.py checks that the stored rows equal the reference
rows, on hand-picked and generated records.

Where ClickHouse and msgspec could read the same bytes differently (a key repeated in one
object: msgspec keeps the last, ClickHouse's reader the first) the insert refuses the bytes
(`input_format_json_ignore_unnecessary_fields=0`), and the store re-sends the chunk re-encoded
(see `canonical_lines`): a repeated key can never store a value the check did not see.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import msgspec

from agentledger.schemas.call_decode import CallRecord, decode_call_fast, decode_calls_with

from .decoding import Decoded, DecodeError, parse_call
from .rows import CALL_COLUMNS, MAX_DATETIME64_MS, SourcePosition, new_tuple

__all__ = [
    "CALL_INPUT_SELECT",
    "CALL_INPUT_STRUCTURE",
    "canonical_lines",
    "decode_call_json",
    "decode_call_lines",
]

_UINT32_MAX = (1 << 32) - 1
_INT64_MAX = (1 << 63) - 1

_SOURCE_FIELDS = ("_topic", "_partition", "_offset", "ingested_at_ms")
# The JSON fields of a line and the types ClickHouse reads them as. A field CallEvent may omit
# with a default other than the type's zero is Nullable here and defaulted in the SELECT
# (`input()`/`file()` structures have no DEFAULT); an explicit null for such a field never
# reaches the insert (the check rejects it, and so does pydantic).
_INPUT_TYPES = {
    "schema_version": "Nullable(UInt8)",
    "event_id": "UUID",
    "event_time_ms": "Int64",
    "agent_id": "String",
    "pool": "Nullable(String)",
    "workflow_id": "Nullable(String)",
    "parent_agent_id": "Nullable(String)",
    "spawn_depth": "UInt16",
    "task_type": "Nullable(String)",
    "task_id": "Nullable(String)",
    "provider": "String",
    "requested_model": "String",
    "used_model": "String",
    "input_tokens": "UInt64",
    "output_tokens": "UInt64",
    "cached_input_tokens": "UInt64",
    "reasoning_tokens": "UInt64",
    "cost_nano_usd": "Int64",
    "priced": "Nullable(Bool)",
    "pricing_version": "Nullable(String)",
    "latency_ms": "UInt32",
    "status": "Nullable(String)",
    "attempt": "Nullable(UInt16)",
    "error_type": "Nullable(String)",
    "_topic": "String",
    "_partition": "UInt32",
    "_offset": "UInt64",
    "ingested_at_ms": "Int64",
}
_INPUT_EXPRESSIONS = {
    "schema_version": "coalesce(schema_version, 1)",
    "event_time": "fromUnixTimestamp64Milli(event_time_ms, 'UTC')",
    "priced": "coalesce(priced, true)",
    "status": "coalesce(status, 'ok')",
    "attempt": "coalesce(attempt, 1)",
    "ingested_at": "fromUnixTimestamp64Milli(ingested_at_ms, 'UTC')",
}
CALL_INPUT_STRUCTURE = ", ".join(f"{name} {kind}" for name, kind in _INPUT_TYPES.items())
# One expression per CALL_COLUMNS entry, in that order.
CALL_INPUT_SELECT = ", ".join(_INPUT_EXPRESSIONS.get(name, name) for name in CALL_COLUMNS)

# The struct, the line's fields and the table's columns are checked against each other at
# import, so they can never drift apart.
if (*CallRecord.__struct_fields__, *_SOURCE_FIELDS) != tuple(_INPUT_TYPES):
    raise RuntimeError(
        f"CallRecord fields {CallRecord.__struct_fields__} do not match {_INPUT_TYPES}"
    )
if (
    tuple(
        {"event_time_ms": "event_time", "ingested_at_ms": "ingested_at"}.get(name, name)
        for name in _INPUT_TYPES
    )
    != CALL_COLUMNS
):
    raise RuntimeError(f"the line's fields {tuple(_INPUT_TYPES)} do not match {CALL_COLUMNS}")

_JSON_SPACE = b" \t\r\n"

# The head of a line up to the offset, per (topic, partition, ingestion time): a batch has one
# ingestion time and few partitions, so each head is built once.
_heads: dict[tuple[str, int, int], bytes] = {}


def _head(source: SourcePosition, now_ms: int) -> bytes:
    key = (source.topic, source.partition, now_ms)
    head = _heads.get(key)
    if head is None:
        if len(_heads) > 1_000:
            _heads.clear()
        topic = msgspec.json.encode(source.topic)
        head = b'{"_topic":%b,"_partition":%d,"ingested_at_ms":%d,"_offset":' % (
            topic,
            source.partition,
            now_ms,
        )
        _heads[key] = head
    return head


def _checked(value: bytes) -> tuple[str, int] | None:
    """(event id, event time) if the record is certainly a CallEvent that fits its columns,
    else None."""
    record = decode_call_fast(value)
    if (
        record is None
        or record.event_time_ms > MAX_DATETIME64_MS
        or record.cost_nano_usd > _INT64_MAX
        or record.latency_ms > _UINT32_MAX
    ):
        return None
    return record.event_id, record.event_time_ms


def decode_call_json(value: bytes, source: SourcePosition, now_ms: int) -> Decoded:
    """The record's line of the JSONEachRow insert, its id and time; DecodeError (the reference
    decoder's dlq reason) when it cannot be stored."""
    head = _head(source, now_ms) + b"%d," % source.offset
    checked = _checked(value)
    if checked is not None:
        # A decoded Struct means the value is one JSON object with at least event_id in it.
        body = value if value[:1] == b"{" else value.lstrip(_JSON_SPACE)
        return new_tuple(Decoded, (head + body[1:], checked[0], checked[1]))
    event, _row = parse_call(value, source, now_ms)
    line = head + event.model_dump_json().encode()[1:]
    return new_tuple(Decoded, (line, str(event.event_id), event.event_time_ms))


# -- the same check, a partition's records at a time ----------------------------------------
# The shared batch check (agentledger.schemas.call_decode.decode_calls_with) with the columns'
# ranges as bounds of the struct, so msgspec checks them in C. A record it does not accept for
# certain gets decode_call_json, so the results are those of decode_call_json record by record
# (tests/unit/test_sink_call_decode.py compares).
class _LineRecord(CallRecord, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    event_time_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_DATETIME64_MS)]
    cost_nano_usd: Annotated[int, msgspec.Meta(ge=0, le=_INT64_MAX)]
    latency_ms: Annotated[int, msgspec.Meta(ge=0, le=_UINT32_MAX)]


if _LineRecord.__struct_fields__ != CallRecord.__struct_fields__:
    raise RuntimeError("_LineRecord must keep CallRecord's fields, in CallRecord's order")

_LINE_DECODE = msgspec.json.Decoder(_LineRecord).decode


def decode_call_lines(
    values: Sequence[bytes], topic: str, partition: int, offsets: Sequence[int], now_ms: int
) -> list[Decoded | DecodeError]:
    """`decode_call_json` of each value (at its offset of `topic`/`partition`), with its
    DecodeError in place of the raise: the same lines, ids, times and reasons, checked a batch
    at a time."""
    records = decode_calls_with(_LINE_DECODE, values)
    head = _head(SourcePosition(topic, partition, 0), now_ms)
    out: list[Decoded | DecodeError] = [
        new_tuple(
            Decoded,
            (
                head
                + b"%d," % offset
                + (value if value[:1] == b"{" else value.lstrip(_JSON_SPACE))[1:],
                r.event_id,
                r.event_time_ms,
            ),
        )
        if r is not None
        else None  # type: ignore[misc]
        for value, offset, r in zip(values, offsets, records, strict=True)
    ]
    for i in (i for i, r in enumerate(records) if r is None):
        try:
            out[i] = decode_call_json(
                values[i], SourcePosition(topic, partition, offsets[i]), now_ms
            )
        except DecodeError as exc:
            out[i] = exc
    return out


def canonical_lines(lines: list[bytes]) -> list[bytes]:
    """The same lines re-encoded by msgspec (one key each, the last of a repeated key, as the
    check read it): for the rare chunk ClickHouse refuses as sent."""
    return [msgspec.json.encode(msgspec.json.decode(line)) for line in lines]
