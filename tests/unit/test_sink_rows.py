"""Row mapping and dedup tokens: pure functions, no ClickHouse."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from agentledger.schemas import CallEvent, CallStatus
from agentledger.sinks.results import to_json_value
from agentledger.sinks.rows import (
    CALL_COLUMNS,
    MAX_DATETIME64_MS,
    RowError,
    SourcePosition,
    call_to_row,
    dedup_token,
    ms_to_datetime,
    yyyymm,
)

SOURCE = SourcePosition("p.calls", 3, 41)


def make_event(**overrides: object) -> CallEvent:
    values: dict[str, object] = {
        "event_id": uuid.UUID("0190c9a8-0000-7000-8000-000000000001"),
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
        "status": CallStatus.RATE_LIMITED,
        "attempt": 3,
        "error_type": "RateLimitError",
    }
    values.update(overrides)
    return CallEvent.model_validate(values)


def test_row_has_one_value_per_column_in_order() -> None:
    event = make_event()
    row = dict(zip(CALL_COLUMNS, call_to_row(event, SOURCE, 1_700_000_100_000), strict=True))
    assert row == {
        "schema_version": 1,
        "event_id": event.event_id,
        "event_time": datetime(2023, 11, 14, 22, 13, 20, 123_000, tzinfo=UTC),
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
        "_topic": "p.calls",
        "_partition": 3,
        "_offset": 41,
        "ingested_at": datetime(2023, 11, 14, 22, 15, 0, tzinfo=UTC),
    }


def test_every_callevent_field_has_a_column() -> None:
    mapped = {"event_time_ms": "event_time"}
    expected = {mapped.get(name, name) for name in CallEvent.model_fields}
    assert expected <= set(CALL_COLUMNS)
    assert {"_topic", "_partition", "_offset", "ingested_at"} <= set(CALL_COLUMNS)


def test_optional_fields_map_to_null() -> None:
    event = CallEvent(
        event_time_ms=0,
        agent_id="a",
        provider="p",
        requested_model="m",
        used_model="m",
        cost_nano_usd=0,
        latency_ms=0,
    )
    row = dict(zip(CALL_COLUMNS, call_to_row(event, SOURCE, 0), strict=True))
    for name in (
        "pool",
        "workflow_id",
        "parent_agent_id",
        "task_type",
        "task_id",
        "pricing_version",
        "error_type",
    ):
        assert row[name] is None, name
    assert row["event_time"] == datetime(1970, 1, 1, tzinfo=UTC)
    assert row["status"] == "ok"


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("latency_ms", 1 << 32, "latency_ms=4294967296 does not fit the calls column type UInt32"),
        ("cost_nano_usd", 1 << 63, "cost_nano_usd=9223372036854775808 does not fit"),
        ("event_time_ms", MAX_DATETIME64_MS + 1, "after 2299-12-31"),
    ],
)
def test_values_that_do_not_fit_a_column_are_refused_by_name(
    field: str, value: int, needle: str
) -> None:
    with pytest.raises(RowError, match=needle):
        call_to_row(make_event(**{field: value}), SOURCE, 0)


def test_largest_storable_values_pass() -> None:
    row = dict(
        zip(
            CALL_COLUMNS,
            call_to_row(
                make_event(
                    latency_ms=(1 << 32) - 1,
                    cost_nano_usd=(1 << 63) - 1,
                    event_time_ms=MAX_DATETIME64_MS,
                ),
                SOURCE,
                0,
            ),
            strict=True,
        )
    )
    assert row["event_time"] == datetime(2299, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)
    assert row["cost_nano_usd"] == (1 << 63) - 1


def test_ms_to_datetime_is_exact_for_large_values() -> None:
    # A float division would round 9_999_999_999_999 ms to the wrong millisecond.
    assert ms_to_datetime(9_999_999_999_999).microsecond == 999_000
    assert ms_to_datetime(1_700_000_000_001).microsecond == 1_000


def test_yyyymm_is_utc() -> None:
    # 2024-01-31 23:30 UTC is still January in UTC even where it is February locally.
    assert yyyymm(1_706_743_800_000) == 202401
    assert yyyymm(1_706_745_600_000) == 202402


def test_dedup_token_format() -> None:
    assert dedup_token("t1.calls", 4, 100, 199) == "t1.calls:4:100-199"
    assert dedup_token("t1.calls", 0, 7, 7) == "t1.calls:0:7-7"


@pytest.mark.parametrize(("first", "last"), [(-1, 3), (5, 4)])
def test_dedup_token_refuses_bad_ranges(first: int, last: int) -> None:
    with pytest.raises(ValueError, match="offset range"):
        dedup_token("t", 0, first, last)


def test_json_values_keep_money_exact() -> None:
    assert to_json_value(Decimal("0.045000000")) == "0.045000000"
    assert to_json_value(uuid.UUID(int=1)) == "00000000-0000-0000-0000-000000000001"
    assert to_json_value(datetime(2024, 1, 2, 3, 4, 5, 6000)) == "2024-01-02T03:04:05.006000"
    assert to_json_value(2**100) == 2**100
    assert to_json_value(float("nan")) == "nan"
    assert to_json_value([Decimal(1), None, {"k": (1, 2)}]) == ["1", None, {"k": [1, 2]}]
