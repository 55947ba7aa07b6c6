"""Per-scope concurrency limits for THROTTLE commands: calls wait for a slot, they do not fail.

Every call holds a slot of every scope it belongs to while it runs, throttled or not, so a
THROTTLE that arrives while calls are running admits new calls only once fewer than ``n`` run.
A call takes the slots of all its scopes at once under one lock (cheap, and no lock-order
deadlock). The limit is per process: the shim cannot see other processes' calls.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping

__all__ = ["SlotTable"]

# How often a waiting call re-reads the standing THROTTLEs: a RESUME or a larger ``n`` arrives
# from the control topic without anyone releasing a slot.
RECHECK_S = 0.05

Limits = Mapping[str, int]
"""the concurrency limit per throttled scope; a scope not in it is unthrottled"""


class SlotTable:
    """Counts the calls running per scope; admits a call while each of its throttled scopes
    has fewer than its limit running."""

    def __init__(self) -> None:
        # try_acquire and release take the bare lock (a C call); only waiters need the
        # Condition built on it.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # Running calls per scope tuple (an agent's calls share one): a call updates one
        # count, and a scope's count is summed only while a THROTTLE stands.
        self._groups: dict[tuple[str, ...], int] = {}
        # Threads inside acquire(); release() wakes them only when there are any, since
        # notify_all costs more than the rest of a release.
        self._waiting = 0

    def active(self, scope: str) -> int:
        """How many calls of ``scope`` run now."""
        with self._lock:
            return self._active(scope)

    def _active(self, scope: str) -> int:
        return sum(n for group, n in self._groups.items() if scope in group)

    def _blocked(self, scopes: tuple[str, ...], limits: Limits) -> str | None:
        if limits:
            for scope in scopes:
                limit = limits.get(scope)
                if limit is not None and self._active(scope) >= limit:
                    return scope
        return None

    def _take(self, scopes: tuple[str, ...]) -> None:
        groups = self._groups
        groups[scopes] = groups.get(scopes, 0) + 1

    def try_acquire(self, scopes: tuple[str, ...], limits: Limits) -> str | None:
        """Take a slot in every scope and return None, or take none and return the scope
        that is full."""
        with self._lock:
            blocked = self._blocked(scopes, limits)
            if blocked is None:
                self._take(scopes)
            return blocked

    def acquire(
        self,
        scopes: tuple[str, ...],
        refresh: Callable[[], Limits],
        timeout_s: float | None,
    ) -> str | None:
        """Wait until every scope has room (``refresh`` re-reads the limits); None once the
        slots are taken, else the scope still full when ``timeout_s`` passed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            self._waiting += 1
            try:
                while True:
                    blocked = self._blocked(scopes, refresh())
                    if blocked is None:
                        self._take(scopes)
                        return None
                    wait = RECHECK_S
                    if deadline is not None:
                        wait = min(wait, deadline - time.monotonic())
                        if wait <= 0:
                            return blocked
                    self._cond.wait(wait)
            finally:
                self._waiting -= 1

    async def acquire_async(
        self,
        scopes: tuple[str, ...],
        refresh: Callable[[], Limits],
        timeout_s: float | None,
    ) -> str | None:
        """``acquire`` for coroutines: waits with ``asyncio.sleep``, never blocking the loop."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            blocked = self.try_acquire(scopes, refresh())
            if blocked is None:
                return None
            wait = RECHECK_S / 5
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return blocked
            await asyncio.sleep(wait)

    def release(self, scopes: tuple[str, ...]) -> None:
        with self._lock:
            groups = self._groups
            left = groups[scopes] - 1
            if left:
                groups[scopes] = left
            else:
                del groups[scopes]
            # Waiters may wait on different scopes; all re-check.
            if self._waiting:
                self._cond.notify_all()
