"""Bounded overshoot: each call reserves its estimated maximum cost against the processor's
last spend report plus this process's unconfirmed spend, and is refused locally when the
reservation would pass the limit."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agentledger.producers import BudgetExceeded, Ledger
from agentledger.producers.reservation import PENDING_MAX, SpendBook
from agentledger.schemas import ControlAction
from tests.unit.test_producer_ledger import Harness

# gpt-4o-mini: $0.15 / 1M input, $0.60 / 1M output.
MINI = {"provider": "openai", "model": "gpt-4o-mini"}
OUT_1K = 600_000  # nano-USD of 1,000 output tokens of gpt-4o-mini


def report(h: Harness, scope: str, spend: int, limit: int) -> None:
    # A warn-threshold command is how the processor states spend below the limit.
    h.publish(scope, ControlAction.REFUSE_NEW_WORK, spend_nano_usd=spend, limit_nano_usd=limit)


def test_reservation_refuses_the_call_that_could_pass_the_limit(h: Harness) -> None:
    agent = h.ledger.agent("a", pool="p")
    report(h, "pool:p", spend=10 * OUT_1K, limit=12 * OUT_1K)
    # Room for two calls of at most 1,000 output tokens each.
    for _ in range(2):
        with agent.call(**MINI, max_tokens=1000) as call:
            call.record(input_tokens=0, output_tokens=1000)
    with pytest.raises(BudgetExceeded) as info, agent.call(**MINI, max_tokens=1000):
        pytest.fail("a call past the limit ran")
    exc = info.value
    assert exc.scope == "pool:p"
    assert exc.reason.startswith("local reservation")
    assert "refused by the local reservation" in str(exc)
    assert h.ledger.stats["refused_local"] == 1
    # A smaller call that still fits is fine: nothing is left, so only a zero-cost one.
    with agent.call(**MINI, max_tokens=0):
        pass
    assert len(h.events()) == 3


def test_reservations_of_running_calls_count(h: Harness) -> None:
    agent = h.ledger.agent("a")
    report(h, "agent:a", spend=0, limit=3 * OUT_1K)
    with (
        agent.call(**MINI, max_tokens=2000),
        agent.call(**MINI, max_tokens=1000),
        pytest.raises(BudgetExceeded),
        agent.call(**MINI, max_tokens=1),
    ):
        pass
    # Both ended having spent nothing: all the room is back.
    with agent.call(**MINI, max_tokens=3000):
        pass


def test_default_output_reservation_without_max_tokens(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.ledger = Ledger(
        h.settings,
        transport=h.transport,
        control=h.state,
        clock=h.clock,
        start_control_listener=False,
        default_max_output_tokens=5000,
    )
    agent = h.ledger.agent("a")
    report(h, "agent:a", spend=0, limit=4 * OUT_1K)
    with pytest.raises(BudgetExceeded, match="local reservation"), agent.call(**MINI):
        pass
    with agent.call(**MINI, max_tokens=4000) as call:
        assert call.reserved_nano_usd == 4 * OUT_1K


def test_a_newer_report_replaces_unconfirmed_spend(h: Harness) -> None:
    agent = h.ledger.agent("a")
    report(h, "agent:a", spend=0, limit=2 * OUT_1K)
    for _ in range(2):
        with agent.call(**MINI, max_tokens=1000) as call:
            call.record(output_tokens=1000)
    with pytest.raises(BudgetExceeded), agent.call(**MINI, max_tokens=1000):
        pass
    # Two seconds later the processor has counted both calls and the limit was raised.
    h.clock.now += 2000
    report(h, "agent:a", spend=2 * OUT_1K, limit=3 * OUT_1K)
    with agent.call(**MINI, max_tokens=1000):
        pass


def test_resume_drops_the_report(h: Harness) -> None:
    agent = h.ledger.agent("a")
    report(h, "agent:a", spend=3 * OUT_1K, limit=3 * OUT_1K)
    with pytest.raises(BudgetExceeded), agent.call(**MINI, max_tokens=1):
        pass
    # A RESUME that still states the old spend (as an operator's might) lifts it too.
    h.publish("agent:a", ControlAction.RESUME, spend_nano_usd=3 * OUT_1K, limit_nano_usd=3 * OUT_1K)
    with agent.call(**MINI, max_tokens=100_000):
        pass


def test_no_report_means_no_local_refusal(h: Harness) -> None:
    agent = h.ledger.agent("a")
    h.publish("agent:a", ControlAction.THROTTLE, params={"concurrency": 5})
    with agent.call(**MINI, max_tokens=10_000_000) as call:
        assert call.reserved_nano_usd == 0


def test_sixteen_threads_never_pass_the_limit(h: Harness) -> None:
    agent = h.ledger.agent("a", workflow="w")
    limit = 100 * OUT_1K
    report(h, "workflow:w", spend=37 * OUT_1K, limit=limit)
    refused = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal refused
        for _ in range(20):
            try:
                with agent.call(**MINI, max_tokens=1000) as call:
                    call.record(output_tokens=1000)
            except BudgetExceeded:
                with lock:
                    refused += 1

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    spent = sum(e.cost_nano_usd for e in h.events())
    assert 37 * OUT_1K + spent == limit  # exactly filled, never passed
    assert len(h.events()) == 63
    assert refused == 16 * 20 - 63


def test_spend_book_keeps_a_partly_reported_second() -> None:
    book = SpendBook()
    book.settle(("agent:a",), 0, 5, ended_ms=10_040)
    book.settle(("agent:a",), 0, 7, ended_ms=10_110)
    # A report issued at 10_050 may or may not include the 10_040 cost: it is kept.
    assert book.unconfirmed("agent:a", report_ms=10_050, now_ms=10_120) == 12
    assert book.unconfirmed("agent:a", report_ms=10_100, now_ms=10_120) == 7
    assert book.unconfirmed("agent:a", report_ms=10_200, now_ms=10_200) == 0


def test_costs_settled_from_many_threads_are_all_booked() -> None:
    book = SpendBook()
    scopes = ("agent:a", "pool:p")

    def settle_many() -> None:
        for i in range(1000):
            book.settle(scopes, 0, 3, ended_ms=20_000 + i)

    threads = [threading.Thread(target=settle_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Booked lock-free and in batches; never more than the batch size left waiting.
    assert len(book._pending) < PENDING_MAX
    assert book.unconfirmed("pool:p", report_ms=0, now_ms=21_000) == 8 * 1000 * 3
    # A reservation books what waits before it decides.
    book.settle(scopes, 0, 10, ended_ms=21_000)
    refusal = book.reserve(scopes, {"agent:a": (0, 24_010, 0)}, 1, now_ms=21_000)
    assert refusal is not None and refusal.committed_nano_usd == 24_010
