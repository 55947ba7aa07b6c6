"""The fast CallEvent decoder against the reference (pydantic CallEvent + call_to_row).

The contract: for every input, `decode_call_fast` stores the same values as `decode_call`, or
rejects with the same dlq reason. Checked on hand-picked edge cases and on generated records
(valid events, and JSON mutations of them: fields dropped, retyped, out of range, extra).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentledger.sinks.call_decode import decode_call_fast, format_ms
from agentledger.sinks.decoding import Decoded, DecodeError, decode_call
from agentledger.sinks.rows import MAX_DATETIME64_MS, SourcePosition, ms_to_datetime
from tests.unit.test_sink_rows import make_event

SOURCE = SourcePosition("p.calls", 3, 41)
NOW = 1_700_000_100_000

# The full event of the row tests, as its JSON object.
BASE: dict[str, Any] = make_event().model_dump(mode="json")


def canonical(value: object) -> object:
    """The text the JSON insert sends for a value of a reference row."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.") + f"{value.microsecond // 1000:03d}"
    return value


def outcome(decode: Any, raw: bytes) -> tuple[str, object]:
    try:
        decoded: Decoded = decode(raw, SOURCE, NOW)
    except DecodeError as exc:
        return ("dlq", str(exc))
    return ("row", ([canonical(v) for v in decoded.row], decoded.record_id, decoded.time_ms))


def assert_same(raw: bytes) -> tuple[str, object]:
    fast, reference = outcome(decode_call_fast, raw), outcome(decode_call, raw)
    if "event_id" not in raw.decode("utf-8", "replace") and reference[0] == "row":
        # Both assign a fresh uuid7 (CallEvent's default): compare everything else.
        assert fast[0] == "row"
        assert fast[1][0][2:] == reference[1][0][2:]  # type: ignore[index]
        return fast
    assert fast == reference
    return fast


def encode(overrides: dict[str, Any], drop: tuple[str, ...] = ()) -> bytes:
    values = {k: v for k, v in {**BASE, **overrides}.items() if k not in drop}
    return json.dumps(values).encode()


def test_format_ms_matches_datetime_across_the_storable_range() -> None:
    for ms in (0, 1, 999, 951_782_400_000, 1_709_164_800_000, 4_107_542_399_999):
        assert format_ms(ms) == canonical(ms_to_datetime(ms))
    assert format_ms(MAX_DATETIME64_MS) == "2299-12-31 23:59:59.999"


@given(st.integers(min_value=0, max_value=MAX_DATETIME64_MS))
def test_format_ms_matches_datetime_for_any_time(ms: int) -> None:
    assert format_ms(ms) == canonical(ms_to_datetime(ms))


def test_a_typical_event_takes_the_fast_path_with_insert_ready_text() -> None:
    decoded = decode_call_fast(encode({}), SOURCE, NOW)
    assert decoded.row[1] == BASE["event_id"]
    assert decoded.row[2] == "2023-11-14 22:13:20.123"
    assert decoded.row[-4:] == ["p.calls", 3, 41, "2023-11-14 22:15:00.000"]
    assert decoded.record_id == BASE["event_id"]
    assert decoded.month == 202311
    assert_same(encode({}))


@pytest.mark.parametrize(
    ("overrides", "drop"),
    [
        ({"event_id": "0190C9A8-0000-7000-8000-000000000001"}, ()),  # upper case: normalised
        ({"event_id": "0190c9a8000070008000000000000001"}, ()),  # no hyphens
        ({}, ("event_id",)),  # CallEvent assigns one
        ({"input_tokens": "10000"}, ()),  # pydantic's lax mode takes a numeric string
        ({"latency_ms": 812.0}, ()),
        ({"priced": "true"}, ()),
        ({"pool": None, "task_type": None, "parent_agent_id": None}, ()),
        ({}, ("pool", "workflow_id", "schema_version", "attempt", "status")),
    ],
)
def test_records_pydantic_accepts_are_stored_exactly_as_before(
    overrides: dict[str, Any], drop: tuple[str, ...]
) -> None:
    kind, _ = assert_same(encode(overrides, drop))
    assert kind == "row"


@pytest.mark.parametrize(
    ("overrides", "drop", "field"),
    [
        ({"agent_id": "agent 1"}, (), "agent_id"),
        ({"agent_id": "a\n"}, (), "agent_id"),
        ({"pool": ""}, (), "pool"),
        ({"task_id": "x" * 201}, (), "task_id"),
        ({"cached_input_tokens": 10_001}, (), "cached_input_tokens"),
        ({"reasoning_tokens": 2_001}, (), "reasoning_tokens"),
        ({"extra": 1}, (), "extra"),
        ({"status": "OK"}, (), "status"),
        ({"schema_version": 2}, (), "schema_version"),
        ({"cost_nano_usd": -1}, (), "cost_nano_usd"),
        ({"cost_nano_usd": 1 << 63}, (), "cost_nano_usd"),
        ({"latency_ms": 1 << 32}, (), "latency_ms"),
        ({"event_time_ms": MAX_DATETIME64_MS + 1}, (), "event_time_ms"),
        ({"event_id": "not-a-uuid"}, (), "event_id"),
        ({"error_type": "e" * 201}, (), "error_type"),
        ({}, ("agent_id",), "agent_id"),
    ],
)
def test_records_pydantic_rejects_go_to_the_dlq_with_its_reason(
    overrides: dict[str, Any], drop: tuple[str, ...], field: str
) -> None:
    kind, reason = assert_same(encode(overrides, drop))
    assert kind == "dlq"
    assert field in str(reason)


def test_garbage_goes_to_the_dlq_with_the_reference_reason() -> None:
    for raw in (b"", b"{", b"[]", b"null", b'{"agent_id": "a"', '{"é": 1}'.encode()):
        kind, _ = assert_same(raw)
        assert kind == "dlq"


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 65), max_value=1 << 65),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.sampled_from(["ok", "error", "a.b", "x" * 201, "0190c9a8-0000-7000-8000-000000000001"]),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    changes=st.dictionaries(st.sampled_from([*sorted(BASE), "extra"]), _scalars, max_size=3),
    drops=st.sets(st.sampled_from(sorted(BASE)), max_size=2),
)
def test_generated_mutations_decode_exactly_like_the_reference(
    changes: dict[str, Any], drops: set[str]
) -> None:
    assert_same(encode(changes, tuple(drops)))
