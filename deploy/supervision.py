"""The supervisor's decisions: which component to restart now, and how long to wait before the
next restart of one that keeps failing. Pure (the caller passes what it observed and the time),
so every rule is unit-tested without processes or clocks; deploy/supervisor.py acts on them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum

from agentledger.config import Settings

__all__ = [
    "Observation",
    "Policy",
    "Restart",
    "Step",
    "Stop",
    "Track",
    "decide",
]


@dataclass(frozen=True)
class Policy:
    """How patient the supervisor is. Times in seconds of the injected (monotonic) clock."""

    # A component that was healthy and whose /health fails this long is restarted.
    grace_s: float = 30.0
    # A (re)started component may take this long to turn healthy the first time (the processor
    # joins its group and recovers its tables first).
    start_grace_s: float = 180.0
    backoff_first_s: float = 2.0
    backoff_max_s: float = 60.0
    # Healthy this long after a restart: the component counts as recovered, and its next
    # failure is restarted at once again.
    recovered_after_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("grace_s", "start_grace_s", "backoff_first_s", "backoff_max_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Policy.{name} must be > 0, got {getattr(self, name)}")
        if self.backoff_max_s < self.backoff_first_s:
            raise ValueError(
                f"Policy.backoff_max_s ({self.backoff_max_s}) must be >= backoff_first_s "
                f"({self.backoff_first_s})"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            grace_s=settings.supervise_grace_s,
            start_grace_s=settings.supervise_start_grace_s,
            backoff_max_s=max(settings.supervise_backoff_max_s, cls.backoff_first_s),
        )

    def backoff_s(self, restarts: int) -> float:
        """The wait after the ``restarts``-th restart in a row before the next one may follow:
        0 before the first, then 2, 4, 8 ... seconds up to the cap."""
        if restarts <= 0:
            return 0.0
        return float(min(self.backoff_first_s * 2 ** (restarts - 1), self.backoff_max_s))


@dataclass(frozen=True)
class Observation:
    """One component as one check saw it."""

    name: str
    running: bool  # its process exists
    healthy: bool
    # /health answered at all (a 503 is an answer; a hung or frozen process gives none).
    answered: bool = True
    stopped_on_purpose: bool = False  # `agentledger down` or Stack.stop_service
    detail: str = ""


@dataclass(frozen=True)
class Track:
    """What the supervisor remembers of one component between checks."""

    since: float  # its last (re)start, or when supervision first saw it
    seen_healthy: bool = False  # healthy at least once since ``since``
    unhealthy_since: float | None = None
    healthy_since: float | None = None
    restarts: int = 0  # restarts in a row, not yet followed by recovered_after_s of health
    last_restart_at: float | None = None


class Stop(Enum):
    """How a restart ends the old process."""

    NONE = "none"  # it is gone already
    TERM = "term"  # it answers: SIGTERM lets it stop cleanly (faust commits, the sink flushes)
    KILL = "kill"  # it does not answer, so it would not handle SIGTERM either


@dataclass(frozen=True)
class Restart:
    name: str
    reason: str
    attempt: int  # 1 for the first restart in a row
    stop: Stop
    next_wait_s: float  # if this one fails too, the next restart waits this long


@dataclass(frozen=True)
class Step:
    tracks: dict[str, Track]
    restarts: list[Restart]
    turned_unhealthy: list[Observation]
    turned_healthy: list[str]


def decide(
    policy: Policy,
    tracks: Mapping[str, Track],
    observations: Sequence[Observation],
    now: float,
) -> Step:
    """One check: the new memory, the restarts to do now, and the changes worth a log line.
    A component stopped on purpose is forgotten (never restarted, and a later start begins
    afresh)."""
    new_tracks: dict[str, Track] = {}
    restarts: list[Restart] = []
    turned_unhealthy: list[Observation] = []
    turned_healthy: list[str] = []
    for seen in observations:
        if seen.stopped_on_purpose:
            continue
        track = tracks.get(seen.name) or Track(since=now)
        if seen.running and seen.healthy:
            if track.unhealthy_since is not None or not track.seen_healthy:
                turned_healthy.append(seen.name)
            healthy_since = track.healthy_since if track.healthy_since is not None else now
            restarts_in_row = track.restarts
            if now - healthy_since >= policy.recovered_after_s:
                restarts_in_row = 0
            new_tracks[seen.name] = replace(
                track,
                seen_healthy=True,
                unhealthy_since=None,
                healthy_since=healthy_since,
                restarts=restarts_in_row,
            )
            continue
        if track.unhealthy_since is None and track.seen_healthy:
            turned_unhealthy.append(seen)
        track = replace(
            track,
            unhealthy_since=track.unhealthy_since if track.unhealthy_since is not None else now,
            healthy_since=None,
        )
        restart = _restart_due(policy, track, seen, now)
        if restart is None:
            new_tracks[seen.name] = track
            continue
        restarts.append(restart)
        new_tracks[seen.name] = Track(since=now, restarts=track.restarts + 1, last_restart_at=now)
    return Step(new_tracks, restarts, turned_unhealthy, turned_healthy)


def _restart_due(policy: Policy, track: Track, seen: Observation, now: float) -> Restart | None:
    last = track.last_restart_at
    if last is not None and now < last + policy.backoff_s(track.restarts):
        return None
    assert track.unhealthy_since is not None
    if not seen.running:
        reason, stop = "its process is gone", Stop.NONE
    else:
        if track.seen_healthy:
            waited, patience = now - track.unhealthy_since, policy.grace_s
            what = "failed"
        else:
            waited, patience = now - track.since, policy.start_grace_s
            what = "not turned healthy since its start"
        if waited < patience:
            return None
        answer = f"answers {seen.detail!r}" if seen.answered else f"does not answer ({seen.detail})"
        reason = f"/health {what} for {waited:.0f}s: it {answer}"
        stop = Stop.TERM if seen.answered else Stop.KILL
    attempt = track.restarts + 1
    return Restart(seen.name, reason, attempt, stop, policy.backoff_s(attempt))
