"""Record -> row decoders of the sink's streams, with the dlq reason when a record cannot be one.

Every decoder returns a `Decoded` (the row, the record's id as canonical lower-case UUID text,
its time) or raises DecodeError whose message is the dlq reason naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from pydantic import ValidationError

from agentledger.schemas import Alert, CallEvent, ControlCommand

from .audit_rows import alert_to_row, command_to_row
from .rows import RowError, SourcePosition, call_to_row, yyyymm

__all__ = [
    "BatchDecoder",
    "DecodeError",
    "Decoded",
    "Decoder",
    "command_decoder",
    "decode_alert",
    "decode_call",
    "month_of",
    "parse_call",
]


class DecodeError(ValueError):
    """The record cannot become a row; the message is the dlq reason."""


_MONTHS: dict[int, int] = {}


def month_of(time_ms: int) -> int:
    """toYYYYMM of a UTC time, cached per day (a batch spans few days, and this runs per row)."""
    day = time_ms // 86_400_000
    month = _MONTHS.get(day)
    if month is None:
        if len(_MONTHS) > 10_000:
            _MONTHS.clear()
        month = yyyymm(time_ms)
        _MONTHS[day] = month
    return month


# One per record: a NamedTuple is built in C, a frozen dataclass calls object.__setattr__ per
# field (seen in the sink's profile).
class Decoded(NamedTuple):
    # Column values, or (the calls stream) the record's JSON line for the insert.
    row: list[object] | bytes
    # Canonical lower-case UUID text: ids from the fast decoder and from pydantic compare equal.
    record_id: str
    time_ms: int

    @property
    def month(self) -> int:
        return month_of(self.time_ms)


Decoder = Callable[[bytes, SourcePosition, int], Decoded]
# (values, topic, partition, offsets, now_ms) -> per value its Decoded, or its DecodeError.
BatchDecoder = Callable[
    [Sequence[bytes], str, int, Sequence[int], int], list["Decoded | DecodeError"]
]


def _reason(kind: str, exc: ValidationError | RowError) -> str:
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<record>'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        )
        return f"not a valid {kind}: {problems}"
    return f"cannot be stored: {exc}"


def decode_call(value: bytes, source: SourcePosition, now_ms: int) -> Decoded:
    """The reference decoder: pydantic CallEvent, then call_to_row."""
    event, row = parse_call(value, source, now_ms)
    return Decoded(row, str(event.event_id), event.event_time_ms)


def parse_call(value: bytes, source: SourcePosition, now_ms: int) -> tuple[CallEvent, list[object]]:
    """The pydantic CallEvent and its `calls` row, or DecodeError with the dlq reason."""
    try:
        event = CallEvent.model_validate_json(value)
        row = call_to_row(event, source, now_ms)
    except (ValidationError, RowError) as exc:
        raise DecodeError(_reason("CallEvent", exc)) from exc
    return event, row


def command_decoder(key: bytes) -> Decoder:
    def decode(value: bytes, source: SourcePosition, now_ms: int) -> Decoded:
        try:
            command = ControlCommand.model_validate_json(value)
            row = command_to_row(command, key, source, now_ms)
        except (ValidationError, RowError) as exc:
            raise DecodeError(_reason("ControlCommand", exc)) from exc
        return Decoded(row, str(command.command_id), command.issued_at_ms)

    return decode


def decode_alert(value: bytes, source: SourcePosition, now_ms: int) -> Decoded:
    try:
        alert = Alert.model_validate_json(value)
        row = alert_to_row(alert, source, now_ms)
    except (ValidationError, RowError) as exc:
        raise DecodeError(_reason("Alert", exc)) from exc
    return Decoded(row, str(alert.alert_id), alert.issued_at_ms)
