"""What the sink consumes: one SinkStream per topic, each decoding records into rows of its table.

Every stream gets the same exactly-once machinery in the worker (offset-range dedup tokens, a
replay check of landed offsets, commit after insert, dlq for garbage) and the same dedup of a
record id delivered twice at different offsets (a spool replay): `id_column` names the UUID that
identifies the fact, `time_column` the event-time column the id lookup is narrowed by.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError

from agentledger.config import Settings
from agentledger.schemas import Alert, CallEvent, ControlCommand

from .audit_rows import ALERT_COLUMNS, CONTROL_COLUMNS, alert_to_row, command_to_row
from .rows import CALL_COLUMNS, RowError, SourcePosition, call_to_row, yyyymm

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


class DecodeError(ValueError):
    """The record cannot become a row; the message is the dlq reason."""


@dataclass(frozen=True)
class Decoded:
    row: list[object]
    record_id: uuid.UUID
    time_ms: int

    @property
    def month(self) -> int:
        return yyyymm(self.time_ms)


Decoder = Callable[[bytes, SourcePosition, int], Decoded]


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


def _reason(kind: str, exc: ValidationError | RowError) -> str:
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<record>'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        )
        return f"not a valid {kind}: {problems}"
    return f"cannot be stored: {exc}"


def decode_call(value: bytes, source: SourcePosition, now_ms: int) -> Decoded:
    try:
        event = CallEvent.model_validate_json(value)
        row = call_to_row(event, source, now_ms)
    except (ValidationError, RowError) as exc:
        raise DecodeError(_reason("CallEvent", exc)) from exc
    return Decoded(row, event.event_id, event.event_time_ms)


def command_decoder(key: bytes) -> Decoder:
    def decode(value: bytes, source: SourcePosition, now_ms: int) -> Decoded:
        try:
            command = ControlCommand.model_validate_json(value)
            row = command_to_row(command, key, source, now_ms)
        except (ValidationError, RowError) as exc:
            raise DecodeError(_reason("ControlCommand", exc)) from exc
        return Decoded(row, command.command_id, command.issued_at_ms)

    return decode


def decode_alert(value: bytes, source: SourcePosition, now_ms: int) -> Decoded:
    try:
        alert = Alert.model_validate_json(value)
        row = alert_to_row(alert, source, now_ms)
    except (ValidationError, RowError) as exc:
        raise DecodeError(_reason("Alert", exc)) from exc
    return Decoded(row, alert.alert_id, alert.issued_at_ms)


def calls_stream(settings: Settings) -> SinkStream:
    return SinkStream(
        settings.topics.calls, "calls", CALL_COLUMNS, decode_call, "event_id", "event_time"
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
