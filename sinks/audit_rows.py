"""ControlCommand and Alert -> rows of the `control_commands` and `alerts` tables.

Kept free of clickhouse-connect, like rows.py. The nested params/details are stored as canonical
JSON strings: they are free-form maps the operators read, never aggregated.
"""

from __future__ import annotations

import json

from agentledger.schemas import Alert, ControlCommand, SignatureError, verify_command

from .rows import MAX_DATETIME64_MS, RowError, SourcePosition, ms_to_datetime

__all__ = [
    "ALERT_COLUMNS",
    "CONTROL_COLUMNS",
    "alert_to_row",
    "command_to_row",
]

_INT64_MAX = (1 << 63) - 1

CONTROL_COLUMNS: tuple[str, ...] = (
    "schema_version",
    "command_id",
    "issued_at",
    "scope",
    "action",
    "params",
    "reason",
    "limit_nano_usd",
    "spend_nano_usd",
    "period_start",
    "until",
    "issuer",
    "signature",
    "verified",
    "_topic",
    "_partition",
    "_offset",
    "ingested_at",
)

ALERT_COLUMNS: tuple[str, ...] = (
    "schema_version",
    "alert_id",
    "issued_at",
    "kind",
    "severity",
    "scope",
    "message",
    "period_start",
    "spend_nano_usd",
    "limit_nano_usd",
    "action",
    "details",
    "_topic",
    "_partition",
    "_offset",
    "ingested_at",
)


def _time(field: str, ms: int | None) -> object:
    if ms is None:
        return None
    if ms > MAX_DATETIME64_MS:
        raise RowError(f"{field}={ms} is after 2299-12-31, the last instant DateTime64(3) stores")
    return ms_to_datetime(ms)


def _money(field: str, nano: int | None) -> int | None:
    if nano is not None and nano > _INT64_MAX:
        raise RowError(f"{field}={nano} does not fit Int64 nano-USD (at most {_INT64_MAX})")
    return nano


def _json(value: dict[str, str | int]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def command_to_row(
    command: ControlCommand, key: bytes, source: SourcePosition, ingested_at_ms: int
) -> list[object]:
    """The row in CONTROL_COLUMNS order; `verified` records whether the signature matches the
    key (an unverified command is kept: it is exactly what an audit must show)."""
    try:
        verify_command(command, key)
        verified = True
    except SignatureError:
        verified = False
    return [
        command.schema_version,
        command.command_id,
        _time("issued_at_ms", command.issued_at_ms),
        command.scope,
        command.action.value,
        _json(command.params),
        command.reason,
        _money("limit_nano_usd", command.limit_nano_usd),
        _money("spend_nano_usd", command.spend_nano_usd),
        _time("period_start_ms", command.period_start_ms),
        _time("until_ms", command.until_ms),
        command.issuer,
        command.signature,
        verified,
        source.topic,
        source.partition,
        source.offset,
        ms_to_datetime(ingested_at_ms),
    ]


def alert_to_row(alert: Alert, source: SourcePosition, ingested_at_ms: int) -> list[object]:
    return [
        alert.schema_version,
        alert.alert_id,
        _time("issued_at_ms", alert.issued_at_ms),
        alert.kind.value,
        alert.severity.value,
        alert.scope,
        alert.message,
        _time("period_start_ms", alert.period_start_ms),
        _money("spend_nano_usd", alert.spend_nano_usd),
        _money("limit_nano_usd", alert.limit_nano_usd),
        alert.action,
        _json(alert.details),
        source.topic,
        source.partition,
        source.offset,
        ms_to_datetime(ingested_at_ms),
    ]
