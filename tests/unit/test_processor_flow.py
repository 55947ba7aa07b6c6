"""Resuming flow must not drop queued events (faust empties stream queues on every resume)."""

from __future__ import annotations

import asyncio

from mode.utils.queues import FlowControlEvent, FlowControlQueue

from agentledger.stream_processors.flow import (
    LedgerApp,
    ReadCommittedConsumer,
    ReadCommittedThread,
    ResumeKeepsQueues,
)


async def queued_after_resume(flow: FlowControlEvent) -> list[str]:
    """Resume flow (as recovery does), queue two events, resume again (as faust does once the
    stream partitions are sought) and return what the queue still holds."""
    queue: FlowControlQueue[str] = FlowControlQueue(flow_control=flow, clear_on_resume=True)
    flow.resume()
    queue.put_nowait("calls:4@0")
    queue.put_nowait("calls:4@1")
    flow.resume()
    await asyncio.wait_for(flow.acquire(), timeout=1)  # flow is open: acquire does not block
    return [queue.get_nowait() for _ in range(queue.qsize())]


def test_resume_keeps_queued_events() -> None:
    assert asyncio.run(queued_after_resume(ResumeKeepsQueues())) == ["calls:4@0", "calls:4@1"]


def test_faust_flow_control_drops_them() -> None:
    # The behaviour flow.py works around; when mode stops clearing on resume, this fails and
    # ResumeKeepsQueues can go.
    assert asyncio.run(queued_after_resume(FlowControlEvent())) == []


def test_clear_and_suspend_still_work() -> None:
    async def scenario() -> tuple[int, bool]:
        flow = ResumeKeepsQueues()
        queue: FlowControlQueue[str] = FlowControlQueue(flow_control=flow, clear_on_resume=True)
        flow.resume()
        queue.put_nowait("stale")
        flow.suspend()
        flow.clear()  # what faust does when partitions are revoked
        return queue.qsize(), flow.is_active()

    assert asyncio.run(scenario()) == (0, False)


def test_the_app_uses_it() -> None:
    app = LedgerApp("flow-test", autodiscover=False)
    assert isinstance(app.flow_control, ResumeKeepsQueues)


def test_the_app_reads_committed_records_only() -> None:
    """faust's alerts agent reads a topic the data plane writes in transactions: an aborted
    cycle's alerts must never be posted."""

    async def consumer_classes() -> tuple[type, type]:
        app = LedgerApp("flow-read-committed", autodiscover=False, broker="kafka://127.0.0.1:1")
        consumer = app.consumer
        try:
            return type(consumer), type(consumer._thread)  # type: ignore[attr-defined]
        finally:
            consumer._thread.thread_loop.close()  # type: ignore[attr-defined]

    consumer, thread = asyncio.run(consumer_classes())
    assert issubclass(consumer, ReadCommittedConsumer)
    assert issubclass(thread, ReadCommittedThread)
