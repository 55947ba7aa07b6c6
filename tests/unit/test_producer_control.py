"""ControlState: only commands signed with the control key count, and no replay lifts a STOP."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from agentledger.producers import ControlState
from agentledger.producers.control import _settling_error
from agentledger.schemas import ControlAction, ControlCommand, sign_command
from tests.conftest import TEST_CONTROL_KEY

KEY = TEST_CONTROL_KEY.encode()
OTHER_KEY = b"not-the-control-key-0123456789"


def command(
    scope: str = "agent:a1",
    action: ControlAction = ControlAction.STOP,
    issued_at_ms: int = 1_000,
    until_ms: int | None = None,
    key: bytes | None = KEY,
) -> ControlCommand:
    cmd = ControlCommand(
        scope=scope,
        action=action,
        reason="daily budget spent",
        limit_nano_usd=5_000_000_000,
        spend_nano_usd=5_001_200_000,
        issued_at_ms=issued_at_ms,
        until_ms=until_ms,
    )
    return cmd if key is None else sign_command(cmd, key)


def wire(cmd: ControlCommand) -> bytes:
    return cmd.model_dump_json().encode()


@pytest.fixture
def state() -> ControlState:
    return ControlState(KEY)


def counts(state: ControlState) -> dict[str, int]:
    return {k: v for k, v in state.metrics.items() if v}


def test_signed_stop_stands_for_its_scope_only(state: ControlState) -> None:
    stop = command()
    assert state.apply(wire(stop)) is True
    assert state.standing(["agent:a1", "pool:p"]) == [stop]
    assert state.standing(["agent:a2", "pool:p"]) == []
    assert counts(state) == {"accepted": 1}


def test_unsigned_command_is_ignored(state: ControlState) -> None:
    assert state.apply(wire(command(key=None))) is False
    assert state.standing(["agent:a1"]) == []
    assert counts(state) == {"rejected_unsigned": 1}


def test_command_signed_with_another_key_is_ignored(state: ControlState) -> None:
    assert state.apply(wire(command(key=OTHER_KEY))) is False
    assert counts(state) == {"rejected_forged": 1}


def test_tampered_command_is_ignored(state: ControlState) -> None:
    signed = command(action=ControlAction.STOP)
    # Flip the action after signing: a RESUME nobody signed.
    tampered = signed.model_copy(update={"action": ControlAction.RESUME})
    assert state.apply(wire(signed)) is True
    assert state.apply(wire(tampered.model_copy(update={"issued_at_ms": 2_000}))) is False
    assert state.standing(["agent:a1"]) == [signed]
    assert counts(state) == {"accepted": 1, "rejected_forged": 1}


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"{}", b'{"scope": "agent:a1"}', b"\xff\xfe", b"[1, 2]"]
)
def test_malformed_command_is_ignored(state: ControlState, raw: bytes) -> None:
    assert state.apply(raw) is False
    assert counts(state) == {"rejected_invalid": 1}


def test_replays_are_ignored(state: ControlState) -> None:
    stop = command(issued_at_ms=1_000)
    resume = command(action=ControlAction.RESUME, issued_at_ms=2_000)
    assert state.apply(wire(stop)) is True
    assert state.apply(wire(stop)) is False  # same command id again
    assert state.apply(wire(resume)) is True
    assert state.standing(["agent:a1"]) == []
    # Replaying the older, validly signed STOP after the RESUME must not stop the agent again.
    assert state.apply(wire(stop)) is False
    assert state.standing(["agent:a1"]) == []
    assert counts(state) == {"accepted": 2, "rejected_replayed": 2}


def test_newer_stop_replaces_older_and_same_time_other_id_is_accepted(state: ControlState) -> None:
    first = command(issued_at_ms=1_000)
    same_time = command(issued_at_ms=1_000)
    later = command(issued_at_ms=5_000, until_ms=9_000)
    for cmd in (first, same_time, later):
        assert state.apply(wire(cmd)) is True
    assert state.standing(["agent:a1"]) == [later]
    older = command(issued_at_ms=4_999)
    assert state.apply(wire(older)) is False
    assert state.standing(["agent:a1"]) == [later]


def test_replay_bookkeeping_is_per_scope(state: ControlState) -> None:
    assert state.apply(wire(command(scope="pool:p", issued_at_ms=9_000))) is True
    assert state.apply(wire(command(scope="agent:a1", issued_at_ms=1_000))) is True
    assert len(state.standing(["agent:a1", "pool:p"])) == 2


def test_lapsed_commands_are_left_out_given_a_time(state: ControlState) -> None:
    lapsing = command(until_ms=10_000)
    state.apply(wire(lapsing))
    assert state.standing(["agent:a1"], now_ms=9_999) == [lapsing]
    assert state.standing(["agent:a1"], now_ms=10_000) == []
    assert state.standing(["agent:a1"]) == [lapsing]


def test_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="control_key must be at least 16 bytes"):
        ControlState(b"short")


@pytest.mark.parametrize(
    ("code", "settling"),
    [
        (KafkaError.NOT_LEADER_FOR_PARTITION, True),
        (KafkaError.LEADER_NOT_AVAILABLE, True),
        (KafkaError.UNKNOWN_TOPIC_OR_PART, True),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, False),
        (KafkaError._SSL, False),
    ],
)
def test_errors_of_a_topic_still_settling_are_told_apart_from_faults(
    code: int, settling: bool
) -> None:
    # librdkafka leaves NOT_LEADER_FOR_PARTITION unflagged on watermark queries.
    assert _settling_error(KafkaError(code)) is settling
    assert _settling_error(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, retriable=True))
