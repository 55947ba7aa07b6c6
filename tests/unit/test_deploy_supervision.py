"""The supervisor's decisions (deploy/supervision.py): who is restarted when, and the backoff."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from agentledger.config import Settings
from agentledger.deploy.supervision import Observation, Policy, Step, Stop, Track, decide

POLICY = Policy(
    grace_s=30, start_grace_s=120, backoff_first_s=2, backoff_max_s=16, recovered_after_s=60
)


def gone(name: str = "processor") -> Observation:
    return Observation(name, running=False, healthy=False, answered=False, detail="not running")


def healthy(name: str = "processor") -> Observation:
    return Observation(name, running=True, healthy=True, detail='{"status": "ok"}')


def stalled(name: str = "processor", *, answered: bool = True) -> Observation:
    detail = "HTTP 503 stalled" if answered else "timed out"
    return Observation(name, running=True, healthy=False, answered=answered, detail=detail)


def at(tracks: Mapping[str, Track], now: float, *seen: Observation) -> Step:
    return decide(POLICY, tracks, list(seen), now)


def test_a_component_whose_process_is_gone_is_restarted_at_once() -> None:
    step = at({}, 100.0, gone())
    assert [(r.name, r.attempt, r.stop, r.next_wait_s) for r in step.restarts] == [
        ("processor", 1, Stop.NONE, 2.0)
    ]
    assert "process is gone" in step.restarts[0].reason
    assert step.tracks["processor"] == Track(since=100.0, restarts=1, last_restart_at=100.0)


def test_one_that_keeps_dying_backs_off_doubling_up_to_the_cap() -> None:
    tracks: Mapping[str, Track] = {}
    restarted_at = []
    now = 0.0
    while now <= 80:
        step = at(tracks, now, gone())
        tracks = step.tracks
        restarted_at += [now for _ in step.restarts]
        now += 0.5
    # waits 2, 4, 8, then the cap of 16 s
    assert restarted_at == [0.0, 2.0, 6.0, 14.0, 30.0, 46.0, 62.0, 78.0]
    assert [POLICY.backoff_s(n) for n in range(7)] == [0, 2, 4, 8, 16, 16, 16]


def test_an_unhealthy_running_component_gets_the_grace_period_then_sigterm() -> None:
    tracks = at({}, 0.0, healthy()).tracks
    step = at(tracks, 10.0, stalled())
    assert not step.restarts
    assert [o.name for o in step.turned_unhealthy] == ["processor"]
    step = at(step.tracks, 39.9, stalled())
    assert not step.restarts and not step.turned_unhealthy
    step = at(step.tracks, 40.0, stalled())
    (restart,) = step.restarts
    assert restart.stop is Stop.TERM and restart.attempt == 1
    assert "/health failed for 30s" in restart.reason and "HTTP 503 stalled" in restart.reason


def test_a_component_that_does_not_answer_at_all_is_killed() -> None:
    tracks = at({}, 0.0, healthy()).tracks
    tracks = at(tracks, 1.0, stalled(answered=False)).tracks
    (restart,) = at(tracks, 31.0, stalled(answered=False)).restarts
    assert restart.stop is Stop.KILL
    assert "does not answer (timed out)" in restart.reason


def test_recovering_within_the_grace_period_is_not_restarted_and_resets_the_clock() -> None:
    tracks = at({}, 0.0, healthy()).tracks
    tracks = at(tracks, 1.0, stalled()).tracks
    step = at(tracks, 25.0, healthy())
    assert step.turned_healthy == ["processor"]
    tracks = at(step.tracks, 26.0, stalled()).tracks
    # 25 s unhealthy in the first spell plus 29 s in the second: neither reached 30 s.
    assert not at(tracks, 55.0, stalled()).restarts
    assert at(tracks, 56.0, stalled()).restarts


def test_a_new_component_gets_the_start_grace_not_the_grace() -> None:
    step = at({}, 0.0, stalled())
    assert not step.turned_unhealthy  # starting is not news
    assert not at(step.tracks, 119.0, stalled()).restarts
    (restart,) = at(step.tracks, 120.0, stalled()).restarts
    assert "not turned healthy since its start for 120s" in restart.reason
    # After the restart, the new process gets the start grace again.
    tracks = at(step.tracks, 120.0, stalled()).tracks
    assert not at(tracks, 200.0, stalled()).restarts
    assert at(tracks, 240.0, stalled()).restarts[0].attempt == 2


def test_a_component_stopped_on_purpose_is_left_alone_and_forgotten() -> None:
    tracks = at({}, 0.0, gone()).tracks  # restart 1
    stopped = Observation("processor", False, False, stopped_on_purpose=True)
    step = at(tracks, 100.0, stopped)
    assert not step.restarts and "processor" not in step.tracks
    # Started again by the user, it crashes: a first restart, with no backoff from before.
    (restart,) = at(step.tracks, 101.0, gone()).restarts
    assert restart.attempt == 1


def test_the_restart_count_resets_only_after_staying_healthy_long_enough() -> None:
    tracks = at({}, 0.0, gone()).tracks
    tracks = at(tracks, 2.0, gone()).tracks  # restart 2
    tracks = at(tracks, 10.0, healthy()).tracks
    tracks = at(tracks, 50.0, healthy()).tracks
    assert tracks["processor"].restarts == 2  # 40 s healthy: not yet recovered
    # Dies again: the backoff after restart 2 (4 s) has long passed, so at once, as restart 3.
    assert at(tracks, 51.0, gone()).restarts[0].attempt == 3
    tracks = at(tracks, 70.0, healthy()).tracks  # 60 s healthy
    assert tracks["processor"].restarts == 0
    assert at(tracks, 71.0, gone()).restarts[0].attempt == 1


def test_components_are_decided_independently() -> None:
    step = at({}, 0.0, healthy("processor"), gone("sink"), stalled("dashboard"))
    assert [r.name for r in step.restarts] == ["sink"]
    assert set(step.tracks) == {"processor", "sink", "dashboard"}
    assert sorted(step.turned_healthy) == ["processor"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"grace_s": 0}, "Policy.grace_s must be > 0, got 0"),
        (
            {"backoff_first_s": 10, "backoff_max_s": 5},
            "backoff_max_s (5) must be >= backoff_first_s",
        ),
    ],
)
def test_policy_rejects_nonsense(fields: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Policy(**fields)


def test_policy_from_settings() -> None:
    settings = Settings(supervise_grace_s=3, supervise_start_grace_s=40, supervise_backoff_max_s=8)
    policy = Policy.from_settings(settings)
    assert (policy.grace_s, policy.start_grace_s, policy.backoff_max_s) == (3, 40, 8)
    with pytest.raises(ValueError, match="supervise_grace_s"):
        Settings(supervise_grace_s=0)
