"""Fuzzing the parse steps with hypothesis: garbage bytes, broken JSON and field-level
mutations of a valid CallEvent. The processor's parse step and the sink's row decoder never
raise on them: each returns the event or a dlq reason that names the mutated field, and both
agree on what is a valid event."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentledger.schemas import CallEvent
from agentledger.schemas.call_decode import CallRecord
from agentledger.sinks.rows import SourcePosition
from agentledger.sinks.streams import Decoded, DecodeError, decode_call
from agentledger.stream_processors.counting import FUTURE_TOLERANCE_MS
from agentledger.stream_processors.data_plane import parse_call, parse_calls

NOW_MS = 1_795_478_400_000  # 2026-11-24T00:00:00Z
SOURCE = SourcePosition("unit.calls", 3, 42)

VALID: dict[str, Any] = json.loads(
    CallEvent(
        event_time_ms=NOW_MS - 1_000,
        agent_id="agent-1",
        pool="pool-a",
        workflow_id="wf-1",
        task_type="chat",
        task_id="task-9",
        provider="openai",
        requested_model="gpt-4o",
        used_model="gpt-4o-mini",
        input_tokens=1_200,
        output_tokens=300,
        cost_nano_usd=4_500_000,
        latency_ms=850,
        attempt=2,
        error_type="ToolCallFailed",
    ).model_dump_json()
)


def processor_parse(value: bytes) -> CallRecord | str:
    """The processor's verdict, which its batch path (`parse_calls`, with neighbours a batch
    check accepts and an empty value) must give too."""
    one = parse_call(value, NOW_MS, FUTURE_TOLERANCE_MS)
    good = json.dumps(VALID).encode()
    batch = parse_calls([good, value, None], NOW_MS, FUTURE_TOLERANCE_MS)
    assert batch[0] == parse_call(good, NOW_MS, FUTURE_TOLERANCE_MS)
    assert batch[2] == parse_call(None, NOW_MS, FUTURE_TOLERANCE_MS)
    if isinstance(one, str) or isinstance(batch[1], str):
        assert batch[1] == one
    else:
        # Without an event_id in the record each decode draws a fresh one; the rest is equal.
        assert msgspec.structs.replace(batch[1], event_id=one.event_id) == one
    return one


def sink_parse(value: bytes) -> Decoded | str:
    try:
        return decode_call(value, SOURCE, NOW_MS)
    except DecodeError as exc:
        return str(exc)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def check_outcome(value: bytes) -> tuple[CallRecord | str, Decoded | str]:
    """Both parse steps return (never raise); a rejection carries a non-empty reason."""
    processed = processor_parse(value)
    decoded = sink_parse(value)
    for outcome in (processed, decoded):
        assert not isinstance(outcome, str) or outcome.strip(), "an empty dlq reason"
    return processed, decoded


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_rejected_with_a_reason(value: bytes) -> None:
    processed, decoded = check_outcome(value)
    # Random bytes are almost never a valid event; when they are, both sides agree.
    assert isinstance(processed, str) == isinstance(decoded, str)


@settings(max_examples=300)
@given(st.data())
def test_byte_mutations_of_a_valid_event_never_crash(data: st.DataObject) -> None:
    raw = bytearray(json.dumps(VALID).encode())
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        at = data.draw(st.integers(0, len(raw) - 1), label="position")
        kind = data.draw(st.sampled_from(["flip", "drop", "insert", "truncate"]), label="kind")
        if kind == "flip":
            raw[at] ^= data.draw(st.integers(1, 255), label="xor")
        elif kind == "drop":
            del raw[at]
        elif kind == "insert":
            raw.insert(at, data.draw(st.integers(0, 255), label="byte"))
        else:
            del raw[at:]
        if not raw:
            break
    processed, decoded = check_outcome(bytes(raw))
    if isinstance(processed, str) and "in the future" not in processed:
        assert isinstance(decoded, str), f"sink stored what the processor refused: {processed}"


@settings(max_examples=400)
@given(field=st.sampled_from(sorted(VALID)), replacement=json_values)
def test_a_mutated_field_is_named_in_the_dlq_reason(field: str, replacement: object) -> None:
    mutated = dict(VALID, **{field: replacement})
    processed, decoded = check_outcome(json.dumps(mutated).encode())
    if isinstance(processed, str):
        assert field in processed, processed
        assert isinstance(decoded, str), "the sink accepted what the processor refused"
        assert field in decoded, decoded
    elif isinstance(decoded, str):
        # Valid for the schema but not storable (e.g. beyond DateTime64's range): still named.
        assert field in decoded, decoded


@settings(max_examples=200)
@given(
    dropped=st.sets(st.sampled_from(sorted(VALID)), min_size=1, max_size=4),
    extra=st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=2),
)
def test_missing_and_unknown_fields(dropped: set[str], extra: dict[str, object]) -> None:
    mutated = {k: v for k, v in VALID.items() if k not in dropped}
    unknown = {k: v for k, v in extra.items() if k not in VALID}
    mutated.update(unknown)
    processed, decoded = check_outcome(json.dumps(mutated).encode())
    required = {"event_time_ms", "agent_id", "provider", "requested_model", "used_model"}
    required |= {"cost_nano_usd", "latency_ms"}
    missing = dropped & required
    if missing or unknown:
        assert isinstance(processed, str) and isinstance(decoded, str)
        for name in sorted(missing) + sorted(unknown):
            assert name in processed and name in decoded, (name, processed)
    else:
        assert isinstance(processed, CallRecord) and isinstance(decoded, Decoded)


def test_empty_and_non_object_json() -> None:
    for value in (b"", b"null", b"[]", b"42", b'"event"', b"{}"):
        processed, decoded = check_outcome(value)
        assert isinstance(processed, str) and isinstance(decoded, str), value
