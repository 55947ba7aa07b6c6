"""What the framework integrations (LangChain, OpenAI Agents SDK, pydantic-ai) share: admitting
a call through ``agent.call`` with an optional pause, and framework names made identifiers.

A refused call raises ``BudgetExceeded`` by default. With a ``Pause``, a call refused by a STOP
or by the local reservation waits instead, re-trying admission every ``poll_s``: it goes on
once the STOP lapses (the budget period reset) or is lifted (``agentledger control resume``),
and raises the refusal once ``timeout_s`` passed. A ``ThrottleTimeout`` (already a wait) and
``NewWorkRefused`` (it refuses tasks, not calls) are never paused. While calls wait, the
process publishes a ``PauseRecord`` per refusing scope to the pauses topic (``PauseStats``), so
the dashboard shows the pause until it ends.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Self, TypeVar

from agentledger.schemas import PauseRecord, pause_key
from agentledger.schemas.pause import MAX_AGENTS

from .errors import BudgetExceeded, ControlPlaneUnavailable, NewWorkRefused, ThrottleTimeout
from .ledger import AgentLedger, CallRecorder, Ledger
from .scope import TaskScope, current_task

__all__ = [
    "Pause",
    "PauseStats",
    "Publish",
    "admit",
    "admit_async",
    "check_task",
    "identifier",
    "inherited_task",
    "pause_stats",
]

_T = TypeVar("_T")
_NOT_ID = re.compile(r"[^A-Za-z0-9._:/@+\-]")

Publish = Callable[[bytes, bytes | None], bool]
"""Sends one pause record (key, value; value None is the tombstone); False if it was not
queued."""


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@functools.cache
def _host() -> str:
    return socket.gethostname()[:255] or "unknown"


def _process_id() -> str:
    """This process among every shim's: host, pid, and a random part (a pid is reused)."""
    return identifier(f"{_host()}.{os.getpid()}.{secrets.token_hex(4)}", "shim")


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
    """Per ledger: how many calls paused, how many are paused now, and on which scopes.

    While calls wait on a scope, a ``PauseRecord`` for (this process, that scope) goes to
    ``publish`` (key, JSON value; a tombstone value None when the last call stops waiting) when
    the waiting set changes and every ``refresh_s`` in between, so the dashboard can show the
    pause. ``pause_stats`` wires it to the pauses topic for a Kafka transport."""

    def __init__(
        self,
        publish: Publish | None = None,
        *,
        clock_ms: Callable[[], int] = _wall_ms,
        refresh_s: float = 10.0,
    ) -> None:
        if not refresh_s > 0:
            raise ValueError(f"PauseStats.refresh_s must be > 0 seconds, got {refresh_s!r}")
        self._lock = threading.Lock()
        self.publish = publish
        self.clock_ms = clock_ms
        self.refresh_s = refresh_s
        self.process = _process_id()
        self.pauses = 0
        self.resumed = 0
        self.timed_out = 0
        self.publish_failures = 0
        self._waiting: dict[str, _Waiting] = {}

    @property
    def paused_now(self) -> dict[str, int]:
        """the scope that refused each call paused now -> how many calls wait on it"""
        with self._lock:
            return {scope: len(w.calls) for scope, w in self._waiting.items()}

    def _begin(self, call: object, agent_id: str, exc: BudgetExceeded, timeout_s: float) -> None:
        now = self.clock_ms()
        with self._lock:
            self.pauses += 1
            waiting = self._waiting.get(exc.scope)
            if waiting is None:
                waiting = self._waiting[exc.scope] = _Waiting(exc, since_ms=now)
            waiting.calls[call] = (agent_id, now + int(timeout_s * 1000))
            self._send(exc.scope, waiting, now)

    def _refresh(self, scope: str) -> None:
        with self._lock:
            waiting = self._waiting.get(scope)
            if waiting is not None and time.monotonic() - waiting.sent_at >= self.refresh_s:
                self._send(scope, waiting, self.clock_ms())

    def _end(self, call: object, scope: str, resumed: bool) -> None:
        with self._lock:
            waiting = self._waiting[scope]
            del waiting.calls[call]
            if not waiting.calls:
                del self._waiting[scope]
            self._send(scope, waiting, self.clock_ms())
            if resumed:
                self.resumed += 1
            else:
                self.timed_out += 1

    def record(self, scope: str) -> PauseRecord | None:
        """The record this process publishes for ``scope`` now (None: nothing waits on it)."""
        with self._lock:
            waiting = self._waiting.get(scope)
            return None if waiting is None else self._record(scope, waiting, self.clock_ms())

    def _record(self, scope: str, waiting: _Waiting, now: int) -> PauseRecord:
        agents = sorted({agent for agent, _ in waiting.calls.values()})
        exc = waiting.first
        return PauseRecord(
            process=self.process,
            host=_host(),
            pid=os.getpid(),
            scope=scope,
            agents=agents[:MAX_AGENTS],
            calls=len(waiting.calls),
            reason=str(exc)[:500],
            since_ms=waiting.since_ms,
            waits_until_ms=max(deadline for _, deadline in waiting.calls.values()),
            resets_at_ms=exc.resets_at_ms,
            updated_at_ms=max(now, waiting.since_ms),
            refresh_ms=max(1, int(self.refresh_s * 1000)),
        )

    def _send(self, scope: str, waiting: _Waiting, now: int) -> None:
        # Under the lock, so a key's records leave in the order the waiting set changed.
        waiting.sent_at = time.monotonic()
        if self.publish is None:
            return
        key = pause_key(self.process, scope)
        if waiting.calls:
            value: bytes | None = self._record(scope, waiting, now).model_dump_json().encode()
        else:
            value = None
        if not self.publish(key, value):
            self.publish_failures += 1


@dataclass(slots=True)
class _Waiting:
    first: BudgetExceeded
    since_ms: int
    calls: dict[object, tuple[str, int]] = field(default_factory=dict)
    """each waiting call -> (its agent, when it gives up in ms)"""
    sent_at: float = 0.0


_STATS: weakref.WeakKeyDictionary[Ledger, PauseStats] = weakref.WeakKeyDictionary()
_STATS_LOCK = threading.Lock()


def pause_stats(ledger: Ledger) -> PauseStats:
    """The pause counters of ``ledger``'s framework integrations; with a Kafka transport they
    publish each pause to the pauses topic (partition 0, never spooled: a pause the broker
    does not hear of in time is stale anyway)."""
    with _STATS_LOCK:
        found = _STATS.get(ledger)
        if found is None:
            found = _STATS[ledger] = PauseStats(_kafka_publisher(ledger), clock_ms=ledger.clock)
        return found


def _kafka_publisher(ledger: Ledger) -> Publish | None:
    produce = getattr(ledger.transport, "produce_now", None)
    if produce is None:
        return None
    topic = ledger.settings.topics.pauses

    def publish(key: bytes, value: bytes | None) -> bool:
        return bool(produce(topic, key, value, 0))

    return publish


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


class _Wait:
    """One call waiting out ``first``: counted and published while it waits; ``next_s()`` is
    how long to sleep before the next attempt (it raises ``first`` once the time is up), and
    ``attempt()`` swallows a refusal that may be waited out."""

    def __init__(self, first: BudgetExceeded, agent: AgentLedger, pause: Pause) -> None:
        self.first = first
        self.pause = pause
        self.stats = pause_stats(agent.ledger)
        self.deadline = time.monotonic() + pause.timeout_s
        self.resumed = False
        self.stats._begin(self, agent.agent_id, first, pause.timeout_s)

    @classmethod
    def after(cls, first: BudgetExceeded, agent: AgentLedger, pause: Pause | None) -> _Wait:
        """The wait for ``first``; ``first`` itself, raised, when it is not to be waited out."""
        if pause is None or not _pausable(first):
            raise first
        return cls(first, agent, pause)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.stats._end(self, self.first.scope, self.resumed)

    def next_s(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.first
        self.stats._refresh(self.first.scope)
        return min(self.pause.poll_s, left)

    @contextmanager
    def attempt(self) -> Iterator[None]:
        try:
            yield
        except BudgetExceeded as exc:
            if not _pausable(exc):
                raise
            return
        self.resumed = True


def _retry(once: Callable[[], _T], agent: AgentLedger, pause: Pause | None) -> _T:
    try:
        return once()
    except BudgetExceeded as exc:
        wait = _Wait.after(exc, agent, pause)
    with wait:
        while True:
            time.sleep(wait.next_s())
            with wait.attempt():
                return once()


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
        wait = _Wait.after(exc, agent, pause)
    with wait:
        while True:
            await asyncio.sleep(wait.next_s())
            with wait.attempt():
                return await make()._enter_async()
