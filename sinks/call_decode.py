"""The sink's fast CallEvent decoder: one msgspec pass per record instead of a pydantic model.

At the sink's rates pydantic (model instance, validators, then `call_to_row` building UUID and
datetime objects) cost about 4x what the insert itself costs per row. This decoder checks the
same rules with msgspec constraints plus a few plain comparisons and emits the row already in
the form the JSON insert sends (UUID and time as strings).

The pydantic schema stays the authority: a record the fast path does not accept *for certain*
(anything unusual: a missing event_id, an upper-case or unhyphenated UUID, a number sent as a
string, a value out of a column's range, any constraint failure) is decoded again by
`decode_call` (CallEvent + call_to_row), which either stores it exactly as before or sends it
to the dlq with the field-level reason. So the fast path may only ever be stricter than
pydantic, never looser; tests/unit/test_sink_call_decode.py checks that on generated records.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from .decoding import Decoded, decode_call
from .rows import CALL_COLUMNS, MAX_DATETIME64_MS, SourcePosition, new_tuple

__all__ = ["FAST_COLUMNS", "decode_call_fast", "format_ms"]

_UINT32_MAX = (1 << 32) - 1
_INT64_MAX = (1 << 63) - 1

_TokenCount = Annotated[int, msgspec.Meta(ge=0, le=100_000_000)]
_Text100 = Annotated[str, msgspec.Meta(max_length=100)]
_Text200 = Annotated[str, msgspec.Meta(max_length=200)]


class _Call(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """CallEvent's fields in CALL_COLUMNS order. Identifiers are plain str here: their pattern
    is checked for all of a record's identifiers with one regex (see _IDENTIFIERS)."""

    schema_version: Literal[1] = 1
    event_id: str
    event_time_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_DATETIME64_MS)]
    agent_id: str
    pool: str | None = None
    workflow_id: str | None = None
    parent_agent_id: str | None = None
    spawn_depth: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    task_type: str | None = None
    task_id: str | None = None
    provider: str
    requested_model: str
    used_model: str
    input_tokens: _TokenCount = 0
    output_tokens: _TokenCount = 0
    cached_input_tokens: _TokenCount = 0
    reasoning_tokens: _TokenCount = 0
    cost_nano_usd: Annotated[int, msgspec.Meta(ge=0, le=_INT64_MAX)]
    priced: bool = True
    pricing_version: _Text100 | None = None
    latency_ms: Annotated[int, msgspec.Meta(ge=0, le=_UINT32_MAX)]
    status: Literal["ok", "error", "timeout", "rate_limited", "refused"] = "ok"
    attempt: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1
    error_type: _Text200 | None = None


# The struct's fields are CALL_COLUMNS minus the four source columns, with event_time_ms where
# the table has event_time; checked at import so the two can never drift apart.
FAST_COLUMNS = tuple(
    "event_time" if name == "event_time_ms" else name for name in _Call.__struct_fields__
)
if (*FAST_COLUMNS, "_topic", "_partition", "_offset", "ingested_at") != CALL_COLUMNS:
    raise RuntimeError(f"_Call fields {FAST_COLUMNS} do not match CALL_COLUMNS {CALL_COLUMNS}")

_DECODER = msgspec.json.Decoder(_Call)
_ASTUPLE = msgspec.structs.astuple
# Canonical lower-case hyphenated UUID, then every identifier present, newline-separated: one
# regex per record. CallEvent's Identifier is 1-200 of these characters; "\n" is not one of
# them, so it cannot be smuggled into a value.
_IDENT = r"[A-Za-z0-9._:/@+\-]{1,200}"
_IDENTIFIERS = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}" rf"(?:\n{_IDENT})+"
)
# Indexes into the struct tuple.
_EVENT_ID, _TIME, _AGENT, _POOL, _WORKFLOW, _PARENT = 1, 2, 3, 4, 5, 6
_TASK_TYPE, _TASK_ID, _PROVIDER, _REQUESTED, _USED = 8, 9, 10, 11, 12
_INPUT, _OUTPUT, _CACHED, _REASONING = 13, 14, 15, 16

_SECONDS_CACHE: dict[int, str] = {}
# ".000" to ".999": a concatenation costs half of formatting the f-string per row (measured).
_MILLIS = tuple(f".{millis:03d}" for millis in range(1000))
# The worker passes one ingestion time for a whole batch: its text is formatted once.
_last_ingested: tuple[int, str] = (-1, "")


def format_ms(ms: int) -> str:
    """UTC milliseconds as 'YYYY-MM-DD hh:mm:ss.fff', the text DateTime64(3) reads exactly.
    Events of a batch share a few seconds, so the second's text is cached."""
    seconds, millis = divmod(ms, 1000)
    text = _SECONDS_CACHE.get(seconds)
    if text is None:
        if len(_SECONDS_CACHE) > 100_000:
            _SECONDS_CACHE.clear()
        # Integer arithmetic from the epoch: no float, no timezone database.
        days, rest = divmod(seconds, 86_400)
        year, month, day = _civil_from_days(days)
        text = (
            f"{year:04d}-{month:02d}-{day:02d} "
            f"{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}"
        )
        _SECONDS_CACHE[seconds] = text
    return text + _MILLIS[millis]


def _civil_from_days(days: int) -> tuple[int, int, int]:
    # Howard Hinnant's days-to-civil algorithm (proleptic Gregorian, days since 1970-01-01).
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return year, month, day


def _fast_row(value: bytes, source: SourcePosition, ingested_at: str) -> Decoded | None:
    try:
        fields = _ASTUPLE(_DECODER.decode(value))
    except msgspec.DecodeError:
        # ValidationError is a DecodeError: both mean "let pydantic decide and explain".
        return None
    if fields[_CACHED] > fields[_INPUT] or fields[_REASONING] > fields[_OUTPUT]:
        return None
    ids = [fields[_EVENT_ID], fields[_AGENT], fields[_PROVIDER], fields[_REQUESTED]]
    ids.append(fields[_USED])
    for index in (_POOL, _WORKFLOW, _PARENT, _TASK_TYPE, _TASK_ID):
        if fields[index] is not None:
            ids.append(fields[index])
    if _IDENTIFIERS.fullmatch("\n".join(ids)) is None:
        return None
    time_ms: int = fields[_TIME]
    row = list(fields)
    row[_TIME] = format_ms(time_ms)
    row += (source.topic, source.partition, source.offset, ingested_at)
    return new_tuple(Decoded, (row, fields[_EVENT_ID], time_ms))


def decode_call_fast(value: bytes, source: SourcePosition, now_ms: int) -> Decoded:
    """Like `decode_call` (same rows stored, same DecodeError reasons), mostly without pydantic.
    The row holds the UUID and times as text, which the JSON insert sends as they are."""
    global _last_ingested
    if _last_ingested[0] != now_ms:
        _last_ingested = (now_ms, format_ms(now_ms))
    decoded = _fast_row(value, source, _last_ingested[1])
    if decoded is None:
        return decode_call(value, source, now_ms)
    return decoded
