"""What the sink consumes: one SinkStream per topic, each decoding records into rows of its table.

Every stream gets the same exactly-once machinery in the worker (offset-range dedup tokens, a
replay check of landed offsets, commit after insert, dlq for garbage) and the same dedup of a
record id delivered twice at different offsets (a spool replay): `id_column` names the UUID that
identifies the fact, `time_column` the event-time column the id lookup is narrowed by.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentledger.config import Settings

from .audit_rows import ALERT_COLUMNS, CONTROL_COLUMNS
from .call_decode import decode_call_json, decode_call_lines
from .decoding import (
    BatchDecoder,
    Decoded,
    DecodeError,
    Decoder,
    command_decoder,
    decode_alert,
    decode_call,
)
from .rows import CALL_COLUMNS

__all__ = [
    "DecodeError",
    "Decoded",
    "SinkStream",
    "calls_stream",
    "command_decoder",
    "decode_alert",
    "decode_call",
    "default_streams",
]


@dataclass(frozen=True)
class SinkStream:
    topic: str
    table: str
    columns: tuple[str, ...]
    decode: Decoder
    id_column: str
    time_column: str
    # Compacted topics carry tombstones (no value) that delete a key: not garbage, nothing to
    # store. On the calls topic an empty value is garbage and goes to the dlq.
    skip_empty: bool = False
    # Rows given as lists go to ClickHouse as one JSONCompactColumns document parsed by
    # ClickHouse itself (rows built by call_to_row, e.g. in tests); otherwise through
    # clickhouse-connect's typed Native insert. The calls stream's decoder emits JSON lines,
    # which always go as JSONEachRow through an INSERT ... SELECT (see call_decode).
    json_insert: bool = False
    # `decode` of a partition's records at once (same results, DecodeError in place of the
    # raise), when the stream has one: the calls stream's per-record cost is mostly Python.
    decode_many: BatchDecoder | None = None


def calls_stream(settings: Settings) -> SinkStream:
    return SinkStream(
        settings.topics.calls,
        "calls",
        CALL_COLUMNS,
        decode_call_json,
        "event_id",
        "event_time",
        json_insert=True,
        decode_many=decode_call_lines,
    )


def default_streams(settings: Settings, control_key: bytes | None = None) -> list[SinkStream]:
    """calls, control commands and alerts. `control_key` defaults to the settings' key (read
    once here, so a missing key fails at start, not on the first command)."""
    key = control_key if control_key is not None else settings.control_key_bytes()
    return [
        calls_stream(settings),
        SinkStream(
            settings.topics.control,
            "control_commands",
            CONTROL_COLUMNS,
            command_decoder(key),
            "command_id",
            "issued_at",
            skip_empty=True,
        ),
        SinkStream(
            settings.topics.alerts,
            "alerts",
            ALERT_COLUMNS,
            decode_alert,
            "alert_id",
            "issued_at",
        ),
    ]
