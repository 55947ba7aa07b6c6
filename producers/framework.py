"""What the framework integrations (LangChain, OpenAI Agents SDK, pydantic-ai) share: admitting
a call through ``agent.call`` with an optional pause, and framework names made identifiers.

A refused call raises ``BudgetExceeded`` by default. With a ``Pause``, a call refused by a STOP
or by the local reservation waits instead, re-trying admission every ``poll_s``: it goes on
once the STOP lapses (the budget period reset) or is lifted (``agentledger control resume``),
and raises the refusal once ``timeout_s`` passed. A ``ThrottleTimeout`` (already a wait) and
``NewWorkRefused`` (it refuses tasks, not calls) are never paused.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import BudgetExceeded, ControlPlaneUnavailable, NewWorkRefused, ThrottleTimeout
from .ledger import AgentLedger, CallRecorder, Ledger
from .scope import TaskScope, current_task

__all__ = [
    "Pause",
    "PauseStats",
    "admit",
    "admit_async",
    "check_task",
    "identifier",
    "inherited_task",
    "pause_stats",
]

_T = TypeVar("_T")
_NOT_ID = re.compile(r"[^A-Za-z0-9._:/@+\-]")


def identifier(value: object, fallback: str) -> str:
    """A framework's name (agent, node, model) as an identifier events accept: other characters
    become ``_``, and it is cut to 200."""
    if not isinstance(value, str) or not value:
        return fallback
    return _NOT_ID.sub("_", value)[:200]


@dataclass(frozen=True, slots=True)
class Pause:
    """Wait instead of raising while a STOP or a local refusal stands, up to ``timeout_s``."""

    timeout_s: float
    poll_s: float = 0.25

    def __post_init__(self) -> None:
        if not self.timeout_s >= 0:
            raise ValueError(f"Pause.timeout_s must be >= 0 seconds, got {self.timeout_s!r}")
        if not self.poll_s > 0:
            raise ValueError(f"Pause.poll_s must be > 0 seconds, got {self.poll_s!r}")


class PauseStats:
    """Per ledger: how many calls paused, how many are paused now, and on which scopes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pauses = 0
        self.resumed = 0
        self.timed_out = 0
        self.paused_now: dict[str, int] = {}
        """the scope that refused each call paused now -> how many calls wait on it"""

    def _begin(self, scope: str) -> None:
        with self._lock:
            self.pauses += 1
            self.paused_now[scope] = self.paused_now.get(scope, 0) + 1

    def _end(self, scope: str, resumed: bool) -> None:
        with self._lock:
            left = self.paused_now[scope] - 1
            if left:
                self.paused_now[scope] = left
            else:
                del self.paused_now[scope]
            if resumed:
                self.resumed += 1
            else:
                self.timed_out += 1


_STATS: weakref.WeakKeyDictionary[Ledger, PauseStats] = weakref.WeakKeyDictionary()
_STATS_LOCK = threading.Lock()


def pause_stats(ledger: Ledger) -> PauseStats:
    """The pause counters of ``ledger``'s framework integrations."""
    with _STATS_LOCK:
        found = _STATS.get(ledger)
        if found is None:
            found = _STATS[ledger] = PauseStats()
        return found


def inherited_task(agent: AgentLedger) -> TaskScope | None:
    """The task ``agent`` runs in: its own, else one an ancestor runs in the caller's context
    (a sub-agent working for its parent's task, as a framework delegates)."""
    own = agent.current_task()
    if own is not None:
        return own
    found = current_task()
    if found is not None and found.agent_id in agent.ancestors:
        return found
    return None


def _pausable(exc: BudgetExceeded) -> bool:
    return not isinstance(exc, ThrottleTimeout | NewWorkRefused | ControlPlaneUnavailable)


def _retry(once: Callable[[], _T], agent: AgentLedger, pause: Pause | None) -> _T:
    try:
        return once()
    except BudgetExceeded as exc:
        if pause is None or not _pausable(exc):
            raise
        first = exc
    stats = pause_stats(agent.ledger)
    stats._begin(first.scope)
    deadline = time.monotonic() + pause.timeout_s
    resumed = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise first
            time.sleep(min(pause.poll_s, left))
            try:
                result = once()
            except BudgetExceeded as exc:
                if not _pausable(exc):
                    raise
                continue
            resumed = True
            return result
    finally:
        stats._end(first.scope, resumed)


def admit(
    make: Callable[[], CallRecorder], agent: AgentLedger, pause: Pause | None
) -> CallRecorder:
    """Enter a new call from ``make()``; under ``pause``, wait out a refusal."""
    return _retry(lambda: make().__enter__(), agent, pause)


def check_task(
    agent: AgentLedger, task_type: str, task_id: str | None, pause: Pause | None
) -> None:
    """What entering ``agent.task(task_type)`` checks (STOP, REFUSE_NEW_WORK), for a unit of
    work the framework runs outside the caller's context; under ``pause``, wait out a STOP."""

    def once() -> None:
        with agent.task(task_type, task_id):
            pass

    _retry(once, agent, pause)


async def admit_async(
    make: Callable[[], CallRecorder], agent: AgentLedger, pause: Pause | None
) -> CallRecorder:
    """``admit`` for coroutines: THROTTLE and pause waits yield to the event loop."""
    try:
        return await make()._enter_async()
    except BudgetExceeded as exc:
        if pause is None or not _pausable(exc):
            raise
        first = exc
    stats = pause_stats(agent.ledger)
    stats._begin(first.scope)
    deadline = time.monotonic() + pause.timeout_s
    resumed = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise first
            await asyncio.sleep(min(pause.poll_s, left))
            try:
                call = await make()._enter_async()
            except BudgetExceeded as exc:
                if not _pausable(exc):
                    raise
                continue
            resumed = True
            return call
    finally:
        stats._end(first.scope, resumed)
