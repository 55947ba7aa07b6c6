"""Spend states as table bytes: the same JSON as state_to_json, so changelogs written
through faust's json codec (before the tables held bytes) read back unchanged."""

from __future__ import annotations

import json

import pytest

from agentledger.schemas import ControlAction, ControlCommand
from agentledger.stream_processors.state import SpendState
from agentledger.stream_processors.state_codec import decode_state, encode_state, state_to_json

FULL = SpendState(
    applied={2: 40, 0: 7},
    periods={"week:1767571200000": 9, "day:1767830400000": 5},
    last_command=ControlCommand(
        scope="agent:a", action=ControlAction.STOP, reason="spent", issued_at_ms=1767830400000
    ),
    partition=2,
    recent={"b" * 32: 40, "a" * 32: 7},
    alerted=("agent:a|day|1767830400000|100",),
    failures={"t2": (3, 4), "t1": (1,)},
    slots={"60000:1767830400000": 5},
    runs={1_800_000: (1, 2, 3)},
    intervals=((1, 5), (2, 9)),
    agents={"a": (None, 0, 1), "b": ("a", 1, 2)},
    retry_spend={"day:1767830400000": 2},
    # subtrees were once dropped by encode_state: a standing subtree STOP then never got its
    # RESUME after a restart.
    subtrees=("subtree:wf|a",),
    leases={
        "day:1767830400000": (1767830400000, 1767916800000, {"h1": (500, 200, 99)}),
        "rolling:3600000": (5, None, {"h2": (7, 0, 12)}),
    },
    holders={"h1": (3, 98, 1), "h2": (1, 11, 0)},
)


@pytest.mark.parametrize("state", [SpendState(), FULL])
def test_bytes_are_the_to_json_document_and_read_back_equal(state: SpendState) -> None:
    raw = encode_state(state)
    assert json.loads(raw) == json.loads(json.dumps(state_to_json(state)))
    back = decode_state(raw)
    assert back == state
    assert list(back.recent) == list(state.recent)  # oldest first, as stored
    assert list(back.failures) == list(state.failures)


def test_values_written_by_faust_json_codec_still_read() -> None:
    assert decode_state(json.dumps(state_to_json(FULL)).encode()) == FULL
    assert decode_state(state_to_json(FULL)) == FULL


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"{not json", "spend state is not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"recent": {"a": 1}}', "'recent' must be a list"),
    ],
)
def test_malformed_bytes_are_named(raw: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        decode_state(raw)
