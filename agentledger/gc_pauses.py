"""The cycle collector of a long-running worker: tuned once, its long pauses reported.

A worker's heap holds many long-lived objects (spend states, stats partials, the clients'
caches); with CPython's default thresholds a full collection walks all of them every so
often, and on a busy 2-core machine one such pass held the processor's data plane for
hundreds of milliseconds: enforcement latency (P2). Freezing the start-up heap moves it out
of the collector's walk, and a higher first threshold makes collections rarer (the hot paths
allocate mostly acyclic objects that reference counting frees anyway).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

__all__ = ["GcPauses", "tune_gc"]

# Collections longer than this are logged with their generation.
SLOW_S = 0.05


def tune_gc() -> None:
    """Freeze what the process allocated so far, and collect the young generation less often."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class GcPauses:
    """Times every collection (``gc.callbacks``); logs those over ``slow_s``."""

    def __init__(self, log: logging.Logger, slow_s: float = SLOW_S) -> None:
        self.log = log
        self.slow_s = slow_s
        self.slow = 0
        self.longest_s = 0.0
        self._started: float | None = None

    def install(self) -> GcPauses:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        return self

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        started, self._started = self._started, None
        if started is None:
            return
        took = time.perf_counter() - started
        self.longest_s = max(self.longest_s, took)
        if took > self.slow_s:
            self.slow += 1
            self.log.info(
                "garbage collection of generation %s took %.0f ms (%s objects collected)",
                info.get("generation"),
                took * 1000,
                info.get("collected"),
            )
