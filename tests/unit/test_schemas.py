from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest
from pydantic import ValidationError

from agentledger.schemas import (
    BudgetPolicy,
    CallEvent,
    ControlAction,
    ControlCommand,
    InvalidMessage,
    PolicyFileError,
    SignatureError,
    nano_to_usd,
    parse_policy_file,
    sign_command,
    usd_to_nano,
    uuid7,
    verify_command,
)
from agentledger.schemas.export import PUBLISHED, SCHEMA_DIR, render
from agentledger.schemas.ids import uuid7_time_ms

KEY = b"k" * 32


def make_event(**overrides: object) -> CallEvent:
    values: dict[str, object] = {
        "event_time_ms": 1_700_000_000_000,
        "agent_id": "researcher-1",
        "provider": "openai",
        "requested_model": "gpt-4o-mini",
        "used_model": "gpt-4o-mini",
        "input_tokens": 1200,
        "output_tokens": 300,
        "cost_nano_usd": 360_000,
        "latency_ms": 850,
    }
    values.update(overrides)
    return CallEvent.model_validate(values)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_schema_matches_model(name: str) -> None:
    # A schema change must come with a version bump and a new file; old files stay published.
    model, version = PUBLISHED[name]
    path = SCHEMA_DIR / f"{name}.v{version}.json"
    assert path.exists(), f"{path} missing: run `make schemas` after bumping the version"
    assert path.read_text() == render(model), (
        f"{model.__name__} changed but {path.name} did not: bump its schema version, "
        "then run `make schemas`"
    )


def test_uuid7_is_time_ordered_and_versioned() -> None:
    first, second = uuid7(1_000), uuid7(2_000)
    assert first.version == 7 and first.variant == uuid.RFC_4122
    assert uuid7_time_ms(first) == 1_000
    assert first < second


def test_money_round_trips_exactly() -> None:
    assert usd_to_nano(Decimal("0.000195")) == 195_000
    assert usd_to_nano("5") == 5_000_000_000
    assert nano_to_usd(195_000) == Decimal("0.000195000")
    with pytest.raises(TypeError, match="never float"):
        usd_to_nano(0.1)  # type: ignore[arg-type]


def test_event_round_trips_through_json() -> None:
    event = make_event(cached_input_tokens=200, reasoning_tokens=100, pool="research")
    assert CallEvent.model_validate_json(event.model_dump_json()) == event
    assert event.scopes() == ("agent:researcher-1", "pool:research")


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"input_tokens": -1}, "input_tokens", "greater than or equal to 0"),
        ({"agent_id": "has space"}, "agent_id", "String should match pattern"),
        ({"cached_input_tokens": 5000}, "cached_input_tokens", "cannot exceed"),
        ({"reasoning_tokens": 301}, "reasoning_tokens", "cannot exceed"),
        ({"surprise": 1}, "surprise", "Extra inputs are not permitted"),
        ({"status": "exploded"}, "status", "Input should be"),
    ],
)
def test_invalid_events_name_the_field(
    overrides: dict[str, object], field: str, fragment: str
) -> None:
    with pytest.raises(ValidationError) as info:
        make_event(**overrides)
    errors = info.value.errors()
    assert any(field in map(str, err["loc"]) and fragment in err["msg"] for err in errors), errors


def test_command_signature_verifies_and_detects_tampering() -> None:
    command = ControlCommand(
        scope="agent:researcher-1",
        action=ControlAction.STOP,
        reason="over budget",
        issued_at_ms=1,
        limit_nano_usd=5,
        spend_nano_usd=6,
    )
    signed = sign_command(command, KEY)
    verify_command(signed, KEY)
    with pytest.raises(SignatureError, match="unsigned"):
        verify_command(command, KEY)
    with pytest.raises(SignatureError, match="bad signature"):
        verify_command(signed.model_copy(update={"action": ControlAction.RESUME}), KEY)
    with pytest.raises(SignatureError, match="bad signature"):
        verify_command(signed, b"x" * 32)
    assert ControlCommand.model_validate_json(signed.model_dump_json()) == signed


def test_short_keys_are_refused() -> None:
    command = ControlCommand(scope="agent:a", action=ControlAction.STOP, reason="r", issued_at_ms=1)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        sign_command(command, b"short")


def test_policy_file_parses_minimal_format_exactly() -> None:
    policies = parse_policy_file(
        "budgets:\n  - scope: agent:researcher-1\n    period: day\n    limit_usd: 5.10\n"
    )
    (policy,) = policies.budgets
    assert policy.limit_usd == Decimal("5.10")
    assert policy.limit_nano_usd == 5_100_000_000
    assert policy.key == "agent:researcher-1|day"


def test_policy_file_errors_name_line_and_field() -> None:
    text = "budgets:\n  - scope: agent:a\n    limit_usd: 5\n  - scope: team:x\n    limit_usd: -1\n"
    with pytest.raises(PolicyFileError) as info:
        parse_policy_file(text, source="budgets.yaml")
    message = str(info.value)
    assert "budgets.yaml:4: budgets.1.scope:" in message
    assert "budgets.yaml:5: budgets.1.limit_usd:" in message


def test_policy_file_rejects_bad_yaml_with_line() -> None:
    with pytest.raises(PolicyFileError, match=r"p.yaml:2: not valid YAML"):
        parse_policy_file("budgets:\n  - scope: a: b\n", source="p.yaml")


def test_invalid_message_keeps_payload() -> None:
    message = InvalidMessage.from_raw(
        topic="calls",
        partition=2,
        offset=7,
        reason="not JSON",
        component="sink",
        detected_at_ms=5,
        key=b"k",
        payload=b"\x00garbage",
    )
    assert InvalidMessage.model_validate_json(message.model_dump_json()).payload() == b"\x00garbage"


def test_budget_policy_schema_is_valid_json() -> None:
    schema = json.loads(render(BudgetPolicy))
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(
    ("nano", "text"),
    [
        (0, "$0.00"),
        (1, "$0.000000001"),
        (10_000_000, "$0.01"),
        (100_000_000, "$0.10"),
        (4_900_001, "$0.004900001"),
        (5_000_000_000, "$5.00"),
        (1_234_500_000_000, "$1,234.50"),
        (-2_500_000_000, "-$2.50"),
    ],
)
def test_money_for_people_has_one_format(nano: int, text: str) -> None:
    from agentledger.schemas import format_usd

    assert format_usd(nano) == text
