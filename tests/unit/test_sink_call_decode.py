"""The calls stream's check + JSONEachRow insert against the reference (pydantic CallEvent +
call_to_row, the values the sink stored before ClickHouse parsed the records itself).

The contract: for every input, `decode_call_json` followed by the insert stores the same values
as the reference row, or rejects with the same dlq reason. Checked on real chDB, on hand-picked
edge cases and on generated records (valid events, and JSON mutations of them: fields dropped,
retyped, out of range, extra).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.sinks.call_decode import decode_call_json, decode_call_lines
from agentledger.sinks.database import ClickHouse
from agentledger.sinks.decoding import DecodeError, decode_call
from agentledger.sinks.migrations import apply_migrations
from agentledger.sinks.rows import CALL_COLUMNS, MAX_DATETIME64_MS, SourcePosition
from agentledger.sinks.store import SinkTables
from agentledger.sinks.streams import SinkStream, calls_stream
from tests.unit.test_sink_rows import make_event

NOW = 1_700_000_100_000

# The full event of the row tests, as its JSON object.
BASE: dict[str, Any] = make_event().model_dump(mode="json")


@dataclasses.dataclass
class Rig:
    db: ClickHouse
    stream: SinkStream
    offsets: Iterator[int]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One chDB for the module (hypothesis runs hundreds of examples), inserting into a copy of
    `calls` without the materialized views: the columns are what is compared here."""
    path: Path = tmp_path_factory.mktemp("decode") / "ch"
    database = ClickHouse.open(f"chdb://{path}")
    try:
        apply_migrations(database)
        database.command("CREATE TABLE calls_plain AS calls")
        stream = dataclasses.replace(
            calls_stream(Settings(topic_prefix="p.", control_key=SecretStr("k" * 32))),
            table="calls_plain",
        )
        yield Rig(database, stream, itertools.count())
    finally:
        database.close()


def naive_utc(value: object) -> object:
    """clickhouse-connect returns DateTime64(3, 'UTC') values as naive UTC datetimes."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def stored(rig: Rig, raw: bytes) -> tuple[str, object]:
    """("row", the stored columns) or ("dlq", reason) through the sink's path."""
    source = SourcePosition("p.calls", 3, next(rig.offsets))
    try:
        decoded = decode_call_json(raw, source, NOW)
    except DecodeError as exc:
        return ("dlq", str(exc))
    assert isinstance(decoded.row, bytes)
    SinkTables(rig.db).insert(rig.stream, [decoded.row], f"t:{source.offset}")
    rows = rig.db._writer.query(  # the typed values, as call_to_row builds them
        f"SELECT {', '.join(CALL_COLUMNS)} FROM calls_plain WHERE _offset = {{o:UInt64}}",
        parameters={"o": source.offset},
    ).result_rows
    assert len(rows) == 1
    row = [naive_utc(v) for v in rows[0]]
    row[1] = str(row[1])
    assert decoded.record_id == row[1]
    return ("row", (row, decoded.time_ms, source))


def reference(raw: bytes, source: SourcePosition) -> tuple[str, object]:
    try:
        decoded = decode_call(raw, source, NOW)
    except DecodeError as exc:
        return ("dlq", str(exc))
    assert isinstance(decoded.row, list)
    row = [naive_utc(v) for v in decoded.row]
    row[1] = str(row[1])
    return ("row", (row, decoded.time_ms))


def assert_same(rig: Rig, raw: bytes) -> tuple[str, object]:
    got = stored(rig, raw)
    if got[0] == "dlq":
        # The same source for the reference: the reason never names it, but be exact.
        assert got == reference(raw, SourcePosition("p.calls", 3, 0))
        return got
    row, time_ms, source = cast(tuple[list[object], int, SourcePosition], got[1])
    expected = reference(raw, source)
    assert expected[0] == "row"
    expected_row, expected_ms = cast(tuple[list[object], int], expected[1])
    if "event_id" not in raw.decode("utf-8", "replace"):
        # Both assign a fresh uuid7 (CallEvent's default), in different calls.
        row, expected_row = row[2:], expected_row[2:]
    else:
        assert time_ms == expected_ms
    assert row == expected_row
    return got


def encode(overrides: dict[str, Any], drop: tuple[str, ...] = ()) -> bytes:
    values = {k: v for k, v in {**BASE, **overrides}.items() if k not in drop}
    return json.dumps(values).encode()


def test_a_typical_event_is_sent_as_its_own_bytes_behind_the_source_columns() -> None:
    raw = encode({})
    decoded = decode_call_json(raw, SourcePosition("p.calls", 3, 41), NOW)
    assert decoded.row == (
        b'{"_topic":"p.calls","_partition":3,"ingested_at_ms":1700000100000,"_offset":41,' + raw[1:]
    )
    assert decoded.record_id == BASE["event_id"]
    assert decoded.month == 202311


def test_a_typical_event_is_stored_exactly_as_the_reference_row(rig: Rig) -> None:
    kind, _ = assert_same(rig, encode({}))
    assert kind == "row"


def test_whitespace_around_and_inside_the_record_is_parsed_alike(rig: Rig) -> None:
    pretty = b"\n  " + json.dumps({**BASE, "event_id": str(uuid.uuid4())}, indent=2).encode()
    assert assert_same(rig, pretty + b"\n")[0] == "row"


def test_a_repeated_key_stores_the_value_the_check_read(rig: Rig) -> None:
    """ClickHouse's reader would keep the first copy of a key, which the check never saw (here
    an identifier with a space): the store re-sends the chunk re-encoded, the last copy wins,
    as in msgspec and pydantic."""
    event_id = str(uuid.uuid4())
    raw = encode({"agent_id": "not an identifier", "event_id": event_id})
    raw = raw[:-1] + b', "agent_id": "agent-2"}'
    kind, value = assert_same(rig, raw)
    assert kind == "row"
    assert value[0][3] == "agent-2"  # type: ignore[index]


ACCEPTED: list[tuple[dict[str, Any], tuple[str, ...]]] = [
    ({"event_id": "0190C9A8-0000-7000-8000-000000000001"}, ()),  # upper case: normalised
    ({"event_id": "0190c9a8000070008000000000000001"}, ()),  # no hyphens
    ({}, ("event_id",)),  # CallEvent assigns one
    ({"input_tokens": "10000"}, ()),  # pydantic's lax mode takes a numeric string
    ({"latency_ms": 812.0}, ()),
    ({"priced": "true"}, ()),
    ({"pool": None, "task_type": None, "parent_agent_id": None}, ()),
    ({}, ("pool", "workflow_id", "schema_version", "attempt", "status", "priced")),
    ({"event_time_ms": MAX_DATETIME64_MS}, ()),
    ({"event_time_ms": 0, "latency_ms": (1 << 32) - 1, "cost_nano_usd": (1 << 63) - 1}, ()),
    ({"task_id": "t" * 200, "agent_id": "a" * 200}, ()),  # long but valid identifiers
]


@pytest.mark.parametrize(("overrides", "drop"), ACCEPTED)
def test_records_pydantic_accepts_are_stored_exactly_as_before(
    rig: Rig, overrides: dict[str, Any], drop: tuple[str, ...]
) -> None:
    kind, _ = assert_same(rig, encode(overrides, drop))
    assert kind == "row"


REJECTED: list[tuple[dict[str, Any], tuple[str, ...], str]] = [
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
    ({"priced": None}, (), "priced"),
    ({}, ("agent_id",), "agent_id"),
    ({"task_id": "t" * 201, "agent_id": "a" * 200}, (), "task_id"),
    ({"pool": "p\u00e9"}, (), "pool"),
    # Two canonical ids in one, across a newline: the batch's joined ids must not match.
    (
        {"event_id": "0190c9a8-0000-7000-8000-000000000001\n0190c9a8-0000-7000-8000-000000000002"},
        (),
        "event_id",
    ),
]
GARBAGE = (b"", b"{", b"[]", b"null", b'{"agent_id": "a"', '{"\u00e9": 1}'.encode(), b"{}")


@pytest.mark.parametrize(("overrides", "drop", "field"), REJECTED)
def test_records_pydantic_rejects_go_to_the_dlq_with_its_reason(
    rig: Rig, overrides: dict[str, Any], drop: tuple[str, ...], field: str
) -> None:
    kind, reason = assert_same(rig, encode(overrides, drop))
    assert kind == "dlq"
    assert field in str(reason)


def test_garbage_goes_to_the_dlq_with_the_reference_reason(rig: Rig) -> None:
    for raw in GARBAGE:
        kind, _ = assert_same(rig, raw)
        assert kind == "dlq"


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 65), max_value=1 << 65),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.sampled_from(["ok", "error", "a.b", "x" * 201, "0190c9a8-0000-7000-8000-000000000001"]),
)


@settings(
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    deadline=None,
)
@given(
    changes=st.dictionaries(st.sampled_from([*sorted(BASE), "extra"]), _scalars, max_size=3),
    drops=st.sets(st.sampled_from(sorted(BASE)), max_size=2),
)
def test_generated_mutations_are_stored_exactly_like_the_reference(
    rig: Rig, changes: dict[str, Any], drops: set[str]
) -> None:
    assert_same(rig, encode(changes, tuple(drops)))


def per_record(raws: list[bytes], offsets: list[int]) -> list[object]:
    """decode_call_json record by record: (line, id, time) or the dlq reason."""
    out: list[object] = []
    for raw, offset in zip(raws, offsets, strict=True):
        try:
            out.append(tuple(decode_call_json(raw, SourcePosition("p.calls", 5, offset), NOW)))
        except DecodeError as exc:
            out.append(str(exc))
    return out


def batched(raws: list[bytes], offsets: list[int]) -> list[object]:
    results = decode_call_lines(raws, "p.calls", 5, offsets, NOW)
    return [str(r) if isinstance(r, DecodeError) else tuple(r) for r in results]


def assert_batch_is_per_record(raws: list[bytes]) -> None:
    offsets = [100 + 3 * i for i in range(len(raws))]
    got, expected = batched(raws, offsets), per_record(raws, offsets)
    for raw, one, other in zip(raws, got, expected, strict=True):
        if isinstance(one, tuple) and b"event_id" not in raw:
            # Both assign a fresh uuid7 (CallEvent's default): compare all but the id.
            assert isinstance(other, tuple)
            assert (one[0].split(b'"event_id"')[0], one[2]) == (
                other[0].split(b'"event_id"')[0],
                other[2],
            )
        else:
            assert one == other, raw


def test_a_batch_decodes_exactly_as_its_records_one_by_one() -> None:
    """decode_call_lines (the worker's path) gives each record what decode_call_json gives it
    (compared with the reference above): the same line, id and time, or the same reason; in
    batches of every case at once, where one bad record must not change the others."""
    typical = encode({})
    cases = [encode(o, d) for o, d in ACCEPTED] + [encode(o, d) for o, d, _ in REJECTED]
    cases += list(GARBAGE)
    assert_batch_is_per_record([typical] * 3)
    assert_batch_is_per_record(cases)
    for case in cases:
        assert_batch_is_per_record([typical, case, typical])
    assert_batch_is_per_record([encode({"event_id": str(uuid.uuid4())}) for _ in range(50)])


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    batch=st.lists(
        st.tuples(
            st.dictionaries(st.sampled_from([*sorted(BASE), "extra"]), _scalars, max_size=3),
            st.sets(st.sampled_from(sorted(BASE)), max_size=2),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_generated_batches_decode_exactly_as_their_records_one_by_one(
    batch: list[tuple[dict[str, Any], set[str]]],
) -> None:
    assert_batch_is_per_record([encode(changes, tuple(drops)) for changes, drops in batch])
