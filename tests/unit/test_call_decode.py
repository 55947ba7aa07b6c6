"""The msgspec CallRecord decode against the reference, pydantic's CallEvent.model_validate_json.

The contract: for every input, `decode_call` accepts exactly what pydantic accepts, with the
same field values (the id as the UUID's canonical text), and rejects the rest with pydantic's
very ValidationError (so a dead letter's reason is unchanged); `decode_calls` over a batch
gives `decode_call_fast`'s verdict for each record. Checked on hand-picked edge cases and on
generated documents: valid events, mutations of them (fields dropped, retyped, out of range,
extra, repeated), unicode, and raw bytes.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agentledger.schemas import CallEvent, CallFields, CallStatus
from agentledger.schemas.call_decode import (
    CallRecord,
    decode_call,
    decode_call_fast,
    decode_calls,
    record_of,
)

BASE: dict[str, Any] = {
    "schema_version": 1,
    "event_id": "0190c9a8-0000-7000-8000-000000000001",
    "event_time_ms": 1_700_000_000_123,
    "agent_id": "agent-1",
    "pool": "pool-a",
    "workflow_id": "wf-9",
    "parent_agent_id": "root",
    "spawn_depth": 2,
    "task_type": "summarize",
    "task_id": "t-1",
    "provider": "openai",
    "requested_model": "gpt-4o",
    "used_model": "gpt-4o-2024-08-06",
    "input_tokens": 10_000,
    "output_tokens": 2_000,
    "cached_input_tokens": 1_000,
    "reasoning_tokens": 500,
    "cost_nano_usd": 45_000_000,
    "priced": True,
    "pricing_version": "genai-prices 0.2.3",
    "latency_ms": 812,
    "status": "rate_limited",
    "attempt": 3,
    "error_type": "RateLimitError",
}
REQUIRED = (
    "event_time_ms",
    "agent_id",
    "provider",
    "requested_model",
    "used_model",
    "cost_nano_usd",
    "latency_ms",
)


def verdict(decode: Any, raw: bytes) -> tuple[str, object]:
    try:
        value = decode(raw)
    except ValidationError as exc:
        return ("error", (str(exc), repr(exc.errors(include_url=False, include_context=False))))
    return ("ok", value)


def assert_same(raw: bytes) -> str:
    """Decode ``raw`` both ways and compare; return the verdict."""
    expected = verdict(CallEvent.model_validate_json, raw)
    got = verdict(decode_call, raw)
    assert got[0] == expected[0], (raw, got, expected)
    if got[0] == "error":
        assert got[1] == expected[1]
        assert decode_calls([raw]) == [None]
        return "error"
    record, event = got[1], expected[1]
    assert isinstance(record, CallRecord)
    assert isinstance(event, CallEvent)
    mine, theirs = _fields(record), {**dict(event), "event_id": str(event.event_id)}
    if mine["event_id"] != theirs["event_id"]:
        # Only when the document has no event_id: each decode assigns a fresh uuid7.
        assert uuid.UUID(record.event_id).version == 7
        assert "event_id" not in event.model_fields_set
        del mine["event_id"], theirs["event_id"]
    assert mine == theirs
    assert [type(v) for v in mine.values()] == [type(v) for v in theirs.values()]
    assert record.scopes() == event.scopes()
    fast = decode_call_fast(raw)
    if fast is not None:
        assert _fields(fast) == _fields(record)
    assert decode_calls([raw]) == [fast]
    return "ok"


def _fields(record: CallRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__struct_fields__}


def encode(overrides: dict[str, Any], drop: tuple[str, ...] = ()) -> bytes:
    values = {k: v for k, v in {**BASE, **overrides}.items() if k not in drop}
    return json.dumps(values).encode()


def test_a_typical_event_takes_the_fast_path_with_the_same_values() -> None:
    raw = encode({})
    record = decode_call_fast(raw)
    assert record is not None
    assert record.status is CallStatus.RATE_LIMITED
    assert record.event_id == BASE["event_id"]
    assert assert_same(raw) == "ok"


def test_the_shims_own_json_takes_the_fast_path() -> None:
    event = CallEvent.model_validate({k: v for k, v in BASE.items() if k != "event_id"})
    record = decode_call_fast(event.model_dump_json().encode())
    assert record == record_of(event)


def test_a_minimal_event_takes_the_fast_path_with_the_defaults() -> None:
    raw = encode({}, tuple(k for k in BASE if k not in (*REQUIRED, "event_id")))
    assert decode_call_fast(raw) is not None
    assert assert_same(raw) == "ok"


@pytest.mark.parametrize(
    ("overrides", "drop"),
    [
        ({"event_id": "0190C9A8-0000-7000-8000-000000000001"}, ()),
        ({"event_id": "0190c9a8000070008000000000000001"}, ()),
        ({"event_id": "urn:uuid:0190c9a8-0000-7000-8000-000000000001"}, ()),
        ({}, ("event_id",)),
        ({"input_tokens": "10000"}, ()),
        ({"latency_ms": 812.0}, ()),
        ({"input_tokens": 1e4}, ()),
        ({"priced": "true"}, ()),
        ({"priced": 0}, ()),
        ({"pool": None, "task_type": None, "parent_agent_id": None}, ()),
        ({}, ("pool", "workflow_id", "schema_version", "attempt", "status", "priced")),
        ({"event_time_ms": (1 << 48) - 1, "cost_nano_usd": 1 << 70, "latency_ms": 1 << 65}, ()),
        ({"error_type": "\U0001f600" * 200, "pricing_version": "é" * 100}, ()),
        ({"error_type": "\x00\n\t"}, ()),
        ({"cached_input_tokens": 10_000, "reasoning_tokens": 2_000}, ()),
        ({"pool": "None", "task_id": "x" * 200, "agent_id": "A.b:c/d@e+f-9_"}, ()),
    ],
)
def test_records_pydantic_accepts_decode_to_the_same_values(
    overrides: dict[str, Any], drop: tuple[str, ...]
) -> None:
    assert assert_same(encode(overrides, drop)) == "ok"


@pytest.mark.parametrize(
    ("overrides", "drop"),
    [
        ({"agent_id": "agent 1"}, ()),
        ({"agent_id": "a\n"}, ()),
        ({"pool": "a\nb", "task_id": None}, ()),
        ({"task_id": "\n"}, ()),
        ({"agent_id": "agent-é"}, ()),
        ({"pool": ""}, ()),
        ({"task_id": "x" * 201}, ()),
        ({"cached_input_tokens": 10_001}, ()),
        ({"reasoning_tokens": 2_001}, ()),
        ({"input_tokens": -1, "cached_input_tokens": 5}, ()),
        ({"extra": 1}, ()),
        ({"status": "OK"}, ()),
        ({"schema_version": 2}, ()),
        ({"cost_nano_usd": -1}, ()),
        ({"event_time_ms": 1 << 48}, ()),
        ({"input_tokens": 100_000_001}, ()),
        ({"spawn_depth": 1001}, ()),
        ({"attempt": 0}, ()),
        ({"event_id": "not-a-uuid"}, ()),
        ({"error_type": "e" * 201}, ()),
        ({"error_type": "\U0001f600" * 201}, ()),
        ({"priced": None}, ()),
        ({"latency_ms": 1.5}, ()),
        ({"agent_id": 7}, ()),
        ({}, ("agent_id",)),
        ({}, ("cost_nano_usd", "latency_ms")),
    ],
)
def test_records_pydantic_rejects_raise_its_very_error(
    overrides: dict[str, Any], drop: tuple[str, ...]
) -> None:
    assert assert_same(encode(overrides, drop)) == "error"


def test_call_fields_names_every_call_event_field() -> None:
    properties = [name for name, value in vars(CallFields).items() if isinstance(value, property)]
    assert properties == list(CallEvent.model_fields) == list(CallRecord.__struct_fields__)


def test_a_repeated_key_keeps_the_last_copy_in_both() -> None:
    raw = encode({"agent_id": "not an identifier"})[:-1] + b', "agent_id": "agent-2"}'
    assert assert_same(raw) == "ok"
    assert decode_call(raw).agent_id == "agent-2"
    raw = encode({})[:-1] + b', "agent_id": "not an identifier"}'
    assert assert_same(raw) == "error"


def test_garbage_raises_the_reference_error() -> None:
    for raw in (
        b"",
        b"{",
        b"[]",
        b"null",
        b'{"agent_id": "a"',
        '{"é": 1}'.encode(),
        b"{}",
        encode({}) + b"x",
        b"\xef\xbb\xbf" + encode({}),
        encode({})[:-1] + b',"error_type":"\\ud800"}',
        encode({})[:-1] + b',"error_type":"\xed\xa0\x80"}',
        encode({})[:-1] + b',"error_type":"\xff"}',
        encode({"cost_nano_usd": float("nan")}),
    ):
        assert assert_same(raw) == "error"


_identifiers = st.text(alphabet="abcXYZ019._:/@+-", min_size=1, max_size=12)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.integers(min_value=-2, max_value=1002),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    _identifiers,
    st.sampled_from(
        [
            "ok",
            "error",
            "timeout",
            "x" * 200,
            "x" * 201,
            "\U0001f600" * 200,
            "0190c9a8-0000-7000-8000-000000000001",
            "0190C9A8000070008000000000000001",
            "10",
            "1e3",
            " 5",
        ]
    ),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
_fields_and_extra = st.sampled_from([*BASE, "extra", "Agent_id", "event_id "])


@settings(max_examples=1000, deadline=None)
@given(
    changes=st.dictionaries(_fields_and_extra, _scalars, max_size=4),
    drops=st.sets(st.sampled_from(sorted(BASE)), max_size=3),
    ascii_only=st.booleans(),
)
def test_generated_mutations_decode_exactly_like_pydantic(
    changes: dict[str, Any], drops: set[str], ascii_only: bool
) -> None:
    values = {k: v for k, v in {**BASE, **changes}.items() if k not in drops}
    assert_same(json.dumps(values, ensure_ascii=ascii_only).encode())


@settings(max_examples=500, deadline=None)
@given(
    pairs=st.lists(st.tuples(_fields_and_extra, _scalars), max_size=4),
    cut=st.integers(min_value=0, max_value=600),
)
def test_generated_repeated_keys_and_truncations_decode_exactly_like_pydantic(
    pairs: list[tuple[str, Any]], cut: int
) -> None:
    body = [json.dumps(k) + ":" + json.dumps(v) for k, v in [*BASE.items(), *pairs]]
    raw = ("{" + ",".join(body) + "}").encode()
    assert_same(raw)
    assert_same(raw[:cut])


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(max_size=64) | st.text(max_size=32).map(str.encode))
def test_generated_bytes_decode_exactly_like_pydantic(raw: bytes) -> None:
    assert_same(raw)


@settings(max_examples=300, deadline=None)
@given(
    valid=st.fixed_dictionaries(
        {
            "event_time_ms": st.integers(min_value=0, max_value=(1 << 48) - 1),
            "agent_id": _identifiers,
            "pool": st.none() | _identifiers,
            "task_type": st.none() | _identifiers,
            "spawn_depth": st.integers(min_value=0, max_value=1000),
            "input_tokens": st.integers(min_value=0, max_value=100_000_000),
            "cached_input_tokens": st.integers(min_value=0, max_value=100_000_000),
            "cost_nano_usd": st.integers(min_value=0, max_value=1 << 80),
            "status": st.sampled_from([s.value for s in CallStatus]),
            "error_type": st.none() | st.text(max_size=200),
            "event_id": st.uuids().map(str),
        }
    ),
)
def test_generated_valid_events_decode_exactly_like_pydantic(valid: dict[str, Any]) -> None:
    raw = encode(valid)
    if assert_same(raw) == "ok":
        # Every value has its strict JSON type here: nothing for pydantic to decide.
        assert decode_call_fast(raw) is not None


@settings(max_examples=300, deadline=None)
@given(
    batch=st.lists(
        st.one_of(
            st.just(encode({})),
            st.dictionaries(_fields_and_extra, _scalars, max_size=2).map(encode),
            st.sampled_from(
                [
                    encode({"event_id": "0190C9A8-0000-7000-8000-000000000001"}),
                    encode({"agent_id": "agent 1"}),
                    encode({"task_id": "x" * 200, "pool": "y" * 200}),
                    encode({"cached_input_tokens": 10_001}),
                    b"",
                    b"{",
                ]
            ),
        ),
        max_size=12,
    ),
)
def test_a_batch_gets_each_records_own_verdict(batch: list[bytes]) -> None:
    # One record the batch checks refuse must not change its neighbours' verdicts.
    assert decode_calls([*batch, None]) == [*map(decode_call_fast, batch), None]
