"""REFUSE_NEW_WORK, THROTTLE and ROUTE applied inside the agent; task units, child agents and
scope propagation through contextvars (threads and asyncio)."""

from __future__ import annotations

import asyncio
import contextvars
import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.producers import (
    BudgetExceeded,
    InMemoryTransport,
    Ledger,
    NewWorkRefused,
    ThrottleTimeout,
    current_task,
)
from agentledger.schemas import ControlAction
from tests.conftest import TEST_CONTROL_KEY
from tests.unit.test_producer_ledger import Harness

GPT: dict[str, Any] = {"provider": "openai", "model": "gpt-4o"}


def throttled_harness(tmp_path: Path, max_wait_s: float | None) -> Harness:
    h = Harness(tmp_path)
    h.ledger = Ledger(
        h.settings,
        transport=h.transport,
        control=h.state,
        clock=h.clock,
        start_control_listener=False,
        throttle_max_wait_s=max_wait_s,
    )
    return h


# --- task units and REFUSE_NEW_WORK -----------------------------------------------------------


def test_calls_in_a_task_carry_its_type_and_id(h: Harness) -> None:
    agent = h.ledger.agent("a", pool="p")
    with agent.task("summarize", task_id="t-1") as task:
        assert current_task() is not None
        with agent.call(**GPT):
            pass
        with agent.task("search") as inner, agent.call(**GPT):
            pass
    with agent.call(**GPT):
        pass
    assert current_task() is None
    events = h.events()
    assert [(e.task_type, e.task_id) for e in events] == [
        ("summarize", "t-1"),
        ("search", inner.task_id),
        (None, None),
    ]
    assert task.task_id == "t-1"
    assert inner.task_id is not None and inner.task_id != "t-1"


def test_refuse_new_work_refuses_tasks_but_not_calls_in_running_ones(h: Harness) -> None:
    agent = h.ledger.agent("a", workflow="wf-1")
    with agent.task("summarize"):
        h.publish(
            "workflow:wf-1",
            ControlAction.REFUSE_NEW_WORK,
            limit_nano_usd=4_000_000_000,
            spend_nano_usd=3_200_000_000,
        )
        with agent.call(**GPT):
            pass
        with pytest.raises(NewWorkRefused) as info, agent.task("more"):
            pytest.fail("a refused task ran")
        with agent.call(**GPT):
            pass
    assert len(h.events()) == 2
    exc = info.value
    assert isinstance(exc, BudgetExceeded)
    assert exc.scope == "workflow:wf-1"
    assert str(exc) == "new work refused for workflow:wf-1: spent $3.20 of $4.00"
    assert type(pickle.loads(pickle.dumps(exc))) is NewWorkRefused
    assert h.ledger.stats["refused_new_work"] == 1
    h.publish("workflow:wf-1", ControlAction.RESUME)
    with agent.task("more"):
        pass


def test_refuse_new_work_for_a_task_type_refuses_only_that_type(h: Harness) -> None:
    agent = h.ledger.agent("a")
    h.publish("task_type:research", ControlAction.REFUSE_NEW_WORK)
    with pytest.raises(NewWorkRefused, match="task_type:research"), agent.task("research"):
        pass
    with agent.task("summarize"), agent.call(**GPT):
        pass
    assert len(h.events()) == 1


def test_stop_refuses_tasks_too(h: Harness) -> None:
    agent = h.ledger.agent("a", pool="p")
    h.publish("pool:p")
    with pytest.raises(BudgetExceeded) as info, agent.task("summarize"):
        pass
    assert type(info.value) is BudgetExceeded
    assert info.value.scope == "pool:p"


def test_stop_in_a_running_task_stops_its_calls(h: Harness) -> None:
    agent = h.ledger.agent("a")
    with agent.task("summarize"):
        h.publish("task_type:summarize")
        with pytest.raises(BudgetExceeded, match="task_type:summarize"), agent.call(**GPT):
            pass


def test_narrowest_scope_is_named_when_several_stop(h: Harness) -> None:
    agent = h.ledger.agent("a", pool="p", workflow="w")
    h.publish("pool:p")
    h.publish("workflow:w")
    h.publish("agent:a")
    with pytest.raises(BudgetExceeded) as info, agent.call(**GPT):
        pass
    assert info.value.scope == "agent:a"


# --- ROUTE ----------------------------------------------------------------------------------


def test_route_replaces_the_model_and_the_event_records_both(h: Harness) -> None:
    agent = h.ledger.agent("a", pool="p")
    h.publish("pool:p", ControlAction.ROUTE, params={"from": "gpt-4o", "to": "gpt-4o-mini"})
    assert agent.model_for(None, "gpt-4o") == "gpt-4o-mini"
    assert agent.model_for(None, "o3") == "o3"
    with agent.call(provider="openai", model="gpt-4o") as call:
        assert call.model == "gpt-4o-mini"
        assert call.requested_model == "gpt-4o"
        call.record(input_tokens=1000, output_tokens=100)
    with agent.call(provider="openai", model="o3") as other:
        assert other.model == "o3"
    routed, untouched = h.events()
    assert (routed.requested_model, routed.used_model) == ("gpt-4o", "gpt-4o-mini")
    assert (untouched.requested_model, untouched.used_model) == ("o3", "o3")
    # Priced at the model actually used.
    assert (
        routed.cost_nano_usd
        == h.ledger.price(
            "openai",
            "gpt-4o-mini",
            input_tokens=1000,
            output_tokens=100,
            cached_input_tokens=0,
            at_ms=routed.event_time_ms,
        ).cost_nano_usd
    )
    assert h.ledger.stats["routed"] == 1


def test_narrowest_route_wins_and_task_type_route_applies_in_its_tasks(h: Harness) -> None:
    agent = h.ledger.agent("a", pool="p")
    h.publish("pool:p", ControlAction.ROUTE, params={"from": "gpt-4o", "to": "gpt-4o-mini"})
    h.publish("task_type:triage", ControlAction.ROUTE, params={"from": "gpt-4o", "to": "gpt-4.1"})
    assert agent.model_for(None, "gpt-4o") == "gpt-4o-mini"
    assert agent.model_for("triage", "gpt-4o") == "gpt-4.1"
    with agent.task("triage"), agent.call(**GPT) as call:
        assert call.model == "gpt-4.1"
    h.publish("agent:a", ControlAction.ROUTE, params={"from": "gpt-4o", "to": "gpt-4o-nano"})
    assert agent.model_for("triage", "gpt-4o") == "gpt-4o-nano"
    h.publish("agent:a", ControlAction.RESUME)
    h.publish("pool:p", ControlAction.RESUME)
    assert agent.model_for(None, "gpt-4o") == "gpt-4o"


def test_route_from_star_routes_every_model(h: Harness) -> None:
    agent = h.ledger.agent("a", workflow="w")
    h.publish("workflow:w", ControlAction.ROUTE, params={"from": "*", "to": "gpt-4o-mini"})
    assert agent.model_for(None, "o3") == "gpt-4o-mini"
    with agent.call(provider="openai", model="gpt-4.1") as call:
        assert call.model == "gpt-4o-mini"
    assert (h.events()[0].requested_model, h.events()[0].used_model) == ("gpt-4.1", "gpt-4o-mini")


def test_route_to_an_invalid_model_is_ignored_and_counted(h: Harness) -> None:
    agent = h.ledger.agent("a")
    h.publish("agent:a", ControlAction.ROUTE, params={"from": "gpt-4o", "to": "has space"})
    with agent.call(**GPT) as call:
        assert call.model == "gpt-4o"
    assert h.ledger.stats["bad_commands"] == 1


# --- THROTTLE -------------------------------------------------------------------------------


def run_concurrently(
    n: int, body: Callable[[Callable[[int], None]], None], timeout_s: float = 30.0
) -> tuple[list[BaseException], int]:
    """Run ``body()`` in ``n`` threads; return the exceptions and the peak concurrency seen."""
    lock = threading.Lock()
    running = 0
    peak = 0
    errors: list[BaseException] = []

    def worker() -> None:
        nonlocal running, peak
        try:
            body(note)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    def note(delta: int) -> None:
        nonlocal running, peak
        with lock:
            running += delta
            peak = max(peak, running)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads)
    return errors, peak


def test_throttle_queues_calls_behind_n_slots_and_none_fails(tmp_path: Path) -> None:
    h = throttled_harness(tmp_path, None)
    agent = h.ledger.agent("a", pool="p")
    h.publish("pool:p", ControlAction.THROTTLE, params={"concurrency": 2})

    def body(note: Callable[[int], None]) -> None:
        with agent.call(**GPT):
            note(1)
            time.sleep(0.02)
            note(-1)

    errors, peak = run_concurrently(8, body)
    assert errors == []
    assert peak == 2
    assert len(h.events()) == 8
    assert h.ledger.stats["throttled"] >= 1


def test_unthrottled_calls_run_in_parallel(h: Harness) -> None:
    agent = h.ledger.agent("a", pool="p")
    barrier = threading.Barrier(4, timeout=10)

    def body(note: Callable[[int], None]) -> None:
        with agent.call(**GPT):
            note(1)
            barrier.wait()  # only passes if all 4 calls are inside at once
            note(-1)

    errors, peak = run_concurrently(4, body)
    assert errors == []
    assert peak == 4


def test_throttle_counts_calls_already_running_when_it_arrives(tmp_path: Path) -> None:
    h = throttled_harness(tmp_path, 0.1)
    agent = h.ledger.agent("a")
    with agent.call(**GPT):
        h.publish("agent:a", ControlAction.THROTTLE, params={"concurrency": 1})
        with pytest.raises(ThrottleTimeout) as info, agent.call(**GPT):
            pytest.fail("a second call ran beside the first under concurrency 1")
    exc = info.value
    assert isinstance(exc, BudgetExceeded)
    assert exc.scope == "agent:a"
    assert str(exc) == ("throttled at agent:a: no slot of 1 concurrent calls freed up within 0.1s")
    assert h.ledger.stats["throttle_timeouts"] == 1
    # The timed-out call held no slot: the next one gets in.
    with agent.call(**GPT):
        pass
    assert len(h.events()) == 2


def test_resume_releases_waiting_calls(tmp_path: Path) -> None:
    h = throttled_harness(tmp_path, None)
    agent = h.ledger.agent("a")
    h.publish("agent:a", ControlAction.THROTTLE, params={"concurrency": 1})
    entered = threading.Event()

    def second() -> None:
        with agent.call(**GPT):
            entered.set()

    with agent.call(**GPT):
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.2)
        h.publish("agent:a", ControlAction.RESUME)
        assert entered.wait(10), "the RESUME did not let the waiting call in"
    t.join(10)
    assert len(h.events()) == 2


@pytest.mark.parametrize("params", [{}, {"concurrency": 0}, {"concurrency": "many"}])
def test_throttle_without_a_valid_concurrency_is_ignored_and_counted(
    h: Harness, params: dict[str, object]
) -> None:
    agent = h.ledger.agent("a")
    h.publish("agent:a", ControlAction.THROTTLE, params=params)
    with agent.call(**GPT), agent.call(**GPT):
        pass
    assert len(h.events()) == 2
    assert h.ledger.stats["bad_commands"] >= 1


def test_bad_throttle_max_wait_names_the_setting(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, control_key=SecretStr(TEST_CONTROL_KEY))
    with pytest.raises(ValueError, match="throttle_max_wait_s"):
        Ledger(settings, transport=InMemoryTransport(), throttle_max_wait_s=-1)


# --- child agents and propagation -----------------------------------------------------------


def test_spawned_child_records_parent_depth_and_inherits_pool_and_workflow(h: Harness) -> None:
    parent = h.ledger.agent("lead", pool="research", workflow="wf-9")
    child = parent.spawn("sub-1")
    grandchild = child.spawn("sub-1a", pool="cheap")
    for agent in (parent, child, grandchild):
        with agent.call(**GPT):
            pass
    got = [
        (e.agent_id, e.parent_agent_id, e.spawn_depth, e.pool, e.workflow_id) for e in h.events()
    ]
    assert got == [
        ("lead", None, 0, "research", "wf-9"),
        ("sub-1", "lead", 1, "research", "wf-9"),
        ("sub-1a", "sub-1", 2, "cheap", "wf-9"),
    ]
    h.publish("pool:research")
    with pytest.raises(BudgetExceeded), child.call(**GPT):
        pass
    with grandchild.call(**GPT):
        pass
    with pytest.raises(ValueError, match="agent_id"):
        parent.spawn("bad id")


def test_a_subtree_stop_stops_every_descendant_of_its_root_and_nothing_else(
    h: Harness,
) -> None:
    root = h.ledger.agent("root", workflow="wf-9")
    lead_1, lead_2 = root.spawn("lead-1"), root.spawn("lead-2")
    worker = lead_1.spawn("w-1")
    grandchild = worker.spawn("w-1a")
    other_run = h.ledger.agent("root", workflow="wf-10").spawn("lead-1").spawn("w-1")
    assert grandchild.ancestors == ("w-1", "lead-1", "root")
    assert root.scopes() == ("agent:root", "workflow:wf-9")  # no subtree command: no lookups
    h.publish("subtree:wf-9|lead-1", schema_version=2)
    assert "subtree:wf-9|lead-1" in worker.scopes()
    for stopped in (worker, grandchild):
        with pytest.raises(BudgetExceeded) as info, stopped.call(**GPT):
            pass
        assert info.value.scope == "subtree:wf-9|lead-1"
    with pytest.raises(BudgetExceeded), worker.spawn("late").call(**GPT):
        pass  # spawned after the STOP: in the subtree too
    # lead-1 itself, its sibling's subtree and the same names in another workflow go on.
    for going in (root, lead_1, lead_2, lead_2.spawn("w-2"), other_run):
        with going.call(**GPT):
            pass
    assert [e.agent_id for e in h.events()] == ["root", "lead-1", "lead-2", "w-2", "w-1"]
    h.publish("subtree:wf-9|lead-1", ControlAction.RESUME, schema_version=2)
    assert worker.scopes() == ("agent:w-1", "workflow:wf-9")
    with grandchild.call(**GPT):
        pass


def test_subtree_commands_need_schema_version_2() -> None:
    from pydantic import ValidationError

    from agentledger.schemas import ControlCommand

    fields: dict[str, Any] = {
        "scope": "subtree:wf-9|lead-1",
        "action": "stop",
        "reason": "x",
        "issued_at_ms": 1,
    }
    with pytest.raises(ValidationError, match="needs schema_version 2"):
        ControlCommand.model_validate(fields)
    assert ControlCommand.model_validate({**fields, "schema_version": 2}).scope == fields["scope"]
    for bad in ("subtree:wf-9", "subtree:wf 9|a", "subtree:wf|a|b", "subtree:*|a"):
        with pytest.raises(ValidationError, match="scope"):
            ControlCommand.model_validate({**fields, "schema_version": 2, "scope": bad})


def test_task_scope_follows_copied_contexts_into_threads(h: Harness) -> None:
    agent = h.ledger.agent("a")

    def work() -> str | None:
        with agent.call(**GPT):
            pass
        task = current_task()
        return None if task is None else task.task_id

    with agent.task("fanout", task_id="t-7"), ThreadPoolExecutor(2) as pool:
        ids = [pool.submit(contextvars.copy_context().run, work).result() for _ in range(3)]
        # A thread that was not given the context runs outside the task.
        plain = pool.submit(work).result()
    assert ids == ["t-7"] * 3
    assert plain is None
    assert [e.task_id for e in h.events()] == ["t-7", "t-7", "t-7", None]


def test_task_scope_follows_asyncio_tasks_and_acall_works(h: Harness) -> None:
    agent = h.ledger.agent("a")

    async def one(n: int) -> None:
        async with agent.acall(**GPT) as call:
            await asyncio.sleep(0)
            call.record(input_tokens=n, output_tokens=1)

    async def main() -> None:
        with agent.task("fanout", task_id="t-async"):
            await asyncio.gather(*(asyncio.create_task(one(n)) for n in range(1, 4)))
        await one(9)

    asyncio.run(main())
    got = sorted((e.input_tokens, e.task_id) for e in h.events())
    assert got == [(1, "t-async"), (2, "t-async"), (3, "t-async"), (9, None)]


def test_async_throttle_waits_without_blocking_the_loop(tmp_path: Path) -> None:
    h = throttled_harness(tmp_path, None)
    agent = h.ledger.agent("a")
    h.publish("agent:a", ControlAction.THROTTLE, params={"concurrency": 1})
    running = 0
    peak = 0
    ticks = 0

    async def one() -> None:
        nonlocal running, peak
        async with agent.acall(**GPT):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.02)
            running -= 1

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    async def main() -> None:
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        await asyncio.gather(*(one() for _ in range(4)))
        stop.set()
        await tick

    asyncio.run(main())
    assert peak == 1
    assert len(h.events()) == 4
    assert ticks >= 4  # the loop kept running while calls waited


def test_async_throttle_timeout_raises(tmp_path: Path) -> None:
    h = throttled_harness(tmp_path, 0.05)
    agent = h.ledger.agent("a")

    async def main() -> None:
        async with agent.acall(**GPT):
            h.publish("agent:a", ControlAction.THROTTLE, params={"concurrency": 1})
            with pytest.raises(ThrottleTimeout, match="agent:a"):
                async with agent.acall(**GPT):
                    pytest.fail("ran beside the first call")

    asyncio.run(main())
    assert len(h.events()) == 1
