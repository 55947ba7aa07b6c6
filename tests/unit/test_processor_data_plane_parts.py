"""Small parts of the data plane: the changelog's key encoding (faust's, so older changelogs
restore) and the failpoint settings the fault tests use."""

from __future__ import annotations

import json

import pytest

from agentledger.stream_processors.failpoints import Failpoints
from agentledger.stream_processors.recovery import decode_key, encode_key


@pytest.mark.parametrize("agent_id", ["a", "researcher-1", 'quote"d', "ünï/cödé", ""])
def test_changelog_keys_are_faust_json_strings_and_read_back(agent_id: str) -> None:
    raw = encode_key(agent_id)
    assert raw == json.dumps(agent_id).encode()  # what faust's json key codec wrote
    assert decode_key(raw) == agent_id


def test_a_raw_key_written_by_hand_still_reads() -> None:
    assert decode_key(b"plain-agent") == "plain-agent"


def test_failpoints_unset_do_nothing() -> None:
    points = Failpoints("")
    assert not points.armed
    points.hit("before_commit")  # no kill: the test process survives


@pytest.mark.parametrize("spec", ["before_commit", "before_commit=kill", "x=kill@0", "x=stop@2"])
def test_a_bad_failpoint_spec_says_what_is_expected(spec: str) -> None:
    with pytest.raises(ValueError, match="NAME=kill@N"):
        Failpoints(spec)


def test_a_failpoint_counts_hits_before_it_fires() -> None:
    points = Failpoints("other=kill@1,before_commit=kill@3")
    assert points.armed
    points.hit("before_commit")
    points.hit("before_commit")  # the 3rd would kill; two are counted
    assert points._hits["before_commit"] == 2
