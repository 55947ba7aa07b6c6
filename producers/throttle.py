"""Per-scope concurrency limits for THROTTLE commands: calls wait for a slot, they do not fail.

Every call holds a slot of every scope it belongs to while it runs, throttled or not, so a
THROTTLE that arrives while calls are running admits new calls only once fewer than ``n`` run.
The limit is per process: the shim cannot see other processes' calls.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

__all__ = ["ScopeLimiter"]

# How often a waiting call re-reads the standing THROTTLE: a RESUME or a larger ``n`` arrives
# from the control topic without anyone releasing a slot.
RECHECK_S = 0.05


class ScopeLimiter:
    """Counts the calls running in one scope; admits a new one while fewer than the limit run."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.active = 0

    def try_acquire(self, limit: int | None) -> bool:
        with self._cond:
            if limit is None or self.active < limit:
                self.active += 1
                return True
            return False

    def acquire(
        self,
        limit: int | None,
        refresh: Callable[[], int | None],
        timeout_s: float | None,
    ) -> bool:
        """Take a slot, waiting while ``limit`` slots are taken; ``refresh`` re-reads the limit
        (None: unthrottled). Returns False when ``timeout_s`` passed without a slot."""
        if self.try_acquire(limit):
            return True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                limit = refresh()
                if limit is None or self.active < limit:
                    self.active += 1
                    return True
                wait = RECHECK_S
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return False
                self._cond.wait(wait)

    async def acquire_async(
        self,
        limit: int | None,
        refresh: Callable[[], int | None],
        timeout_s: float | None,
    ) -> bool:
        """``acquire`` for coroutines: waits with ``asyncio.sleep``, never blocking the loop."""
        if self.try_acquire(limit):
            return True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self.try_acquire(refresh()):
                return True
            wait = RECHECK_S / 5
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return False
            await asyncio.sleep(wait)

    def release(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify()
