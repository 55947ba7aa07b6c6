"""The worker's watchdog over its data plane (app.keep_data_plane): a hung cycle or a failed
plane is replaced by a new one, the old one is stopped, and a healthy one is left alone."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from agentledger.stream_processors.app import keep_data_plane
from agentledger.stream_processors.metrics import ProcessorMetrics


class FakePlane:
    def __init__(self, *, hung: bool = False, error: str | None = None) -> None:
        self.hung = hung
        self.error = error
        self.stopped = threading.Event()
        self.ran = threading.Event()

    def run(self) -> None:
        self.ran.set()
        self.stopped.wait(5)

    def stuck(self, after_s: float) -> bool:
        assert after_s > 0
        return self.hung

    def stop(self) -> None:
        self.stopped.set()


async def watch(first: FakePlane, built: list[FakePlane], seconds: float) -> Any:
    proc = SimpleNamespace(plane=first, metrics=ProcessorMetrics())

    def build() -> FakePlane:
        built.append(FakePlane())
        return built[-1]

    task = asyncio.ensure_future(keep_data_plane(proc, build, every_s=0.01))  # type: ignore[arg-type]
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return proc


@pytest.mark.parametrize("first", [FakePlane(hung=True), FakePlane(error="KafkaException: x")])
def test_a_hung_or_failed_plane_is_stopped_and_replaced_once(first: FakePlane) -> None:
    built: list[FakePlane] = []
    proc = asyncio.run(watch(first, built, 0.3))
    assert first.ran.is_set() and first.stopped.is_set()
    # One replacement: the next is healthy, and replacements are spaced out anyway.
    assert len(built) == 1 and proc.plane is built[0]
    assert built[0].ran.wait(2) and not built[0].stopped.is_set()
    assert proc.metrics.plane_replaced._value.get() == 1
    built[0].stop()


def test_a_healthy_plane_is_left_alone() -> None:
    first = FakePlane()
    built: list[FakePlane] = []
    proc = asyncio.run(watch(first, built, 0.2))
    assert built == [] and proc.plane is first and not first.stopped.is_set()
    first.stop()
