"""A replay of the real Azure code trace (../shared/data) through the sink worker into chDB, with
a spool replay of some calls at new offsets: the review's totals equal a recomputation in Python
from the trace itself."""

from __future__ import annotations

import uuid

import pytest

from agentledger.review.insights import build_review
from agentledger.schemas import CallEvent, CallStatus
from agentledger.sinks.database import ClickHouse
from agentledger.traces import TraceCall, find_trace_dir, load_trace
from tests.unit.test_sink_review import LocalClient
from tests.unit.test_sink_worker import Msg, worker_on_chdb

# Integer prices, nano-USD per token (input, output): exact by construction.
PRICES = {"small": (150, 600), "big": (2_500, 10_000)}


def to_event(n: int, call: TraceCall) -> CallEvent:
    model = "big" if n % 5 == 0 else "small"
    price_in, price_out = PRICES[model]
    return CallEvent(
        event_id=uuid.UUID(int=n + 1),
        event_time_ms=call.arrival_ms,
        agent_id=f"agent-{n % 7}",
        task_type="code",
        task_id=f"t-{n // 3}",
        provider="p",
        requested_model=model,
        used_model=model,
        input_tokens=call.input_tokens,
        output_tokens=call.output_tokens,
        cost_nano_usd=call.input_tokens * price_in + call.output_tokens * price_out,
        latency_ms=20 + call.output_tokens,
        attempt=1 + (n % 4 == 0),
        status=CallStatus.OK if n % 11 else CallStatus.ERROR,
    )


def test_trace_replay_totals_equal_an_independent_recomputation(db: ClickHouse) -> None:
    try:
        trace = load_trace("code", trace_dir=find_trace_dir())
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    events = [to_event(n, call) for n, call in enumerate(trace)]
    payloads = [e.model_dump_json().encode() for e in events]
    # Every 20th call is re-sent by a spool later, at a new offset of another partition.
    records = [Msg("x.calls", n % 2, n // 2, p) for n, p in enumerate(payloads)]
    replays = [
        Msg("x.calls", 1 - n % 2, len(payloads) + n, payloads[n])
        for n in range(0, len(payloads), 20)
    ]
    worker, consumer, _ = worker_on_chdb(db, batch_max_rows=2_000, batch_max_ms=50)
    consumer.assign_partitions("x.calls", [0, 1])
    consumer.queued = records + replays
    while consumer.queued:
        worker.step()
    assert worker.stats.duplicates_skipped == len(replays)

    # The window: whole minutes around the trace, so the review reads the rollups.
    since = min(e.event_time_ms for e in events) // 60_000 * 60_000
    until = (max(e.event_time_ms for e in events) // 60_000 + 1) * 60_000
    review = build_review(LocalClient(db), since, until, by="agent")
    assert review.source.startswith("calls_by_")
    assert review.total_calls == len(trace)
    assert review.total_nano_usd == sum(e.cost_nano_usd for e in events)
    for spender in review.current:
        mine = [e for e in events if e.agent_id == spender.key]
        assert spender.calls == len(mine)
        assert spender.cost_nano_usd == sum(e.cost_nano_usd for e in mine)
        assert spender.retry_cost_nano_usd == sum(e.cost_nano_usd for e in mine if e.attempt > 1)
        assert spender.failed_cost_nano_usd == sum(
            e.cost_nano_usd for e in mine if e.status != CallStatus.OK
        )
        assert spender.expensive_cost_nano_usd == sum(
            e.cost_nano_usd for e in mine if e.used_model == "big"
        )
        assert spender.ok_tasks == len({e.task_id for e in mine if e.status == CallStatus.OK})
    assert len(review.current) == 7
