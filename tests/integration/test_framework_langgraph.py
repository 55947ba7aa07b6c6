"""A looping LangGraph agent, recorded and enforced by the LangChain handler, is stopped by its
budget through the real broker, processor and sink (the model is the loopback OpenAI fake)."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from typing import Any

import pytest
from confluent_kafka import Producer

from agentledger.budgets import apply_policies
from agentledger.config import Settings
from agentledger.dashboard.collector import Collector
from agentledger.deploy.stack import Stack
from agentledger.producers import BudgetExceeded, Ledger
from agentledger.producers.framework import Pause, pause_stats
from agentledger.review.query import QueryClient
from agentledger.schemas import BudgetPolicy, ControlAction, PolicyFile
from tests.integration.test_dashboard_feeds import command
from tests.integration.test_end_to_end import sink_totals
from tests.unit.framework_fakes import FakeApi, genai_nano, until

pytestmark = pytest.mark.integration

langchain_openai = pytest.importorskip("langchain_openai")
pytest.importorskip("langgraph")
from agentledger.producers.langchain import LedgerCallbackHandler  # noqa: E402
from tests.unit.test_producer_langchain import HI, looping, single  # noqa: E402


def test_a_looping_langgraph_agent_is_stopped_by_its_budget(stack: Stack, api: FakeApi) -> None:
    settings = stack.settings
    limit = Decimal("0.05")  # ten of the fake's gpt-4o calls ($0.00475 each)
    apply_policies(
        settings, PolicyFile(budgets=[BudgetPolicy(scope="agent:lg-looper", limit_usd=limit)])
    )
    api.loop_tool = "search"  # the model asks for the tool every time: the graph never ends
    llm = langchain_openai.ChatOpenAI(
        model="gpt-4o",
        api_key="test",
        base_url=f"{api.url}/v1",
        max_retries=0,
        # What each call may cost at most ($0.01 of output), so its allowance covers it.
        max_tokens=1000,
    )
    ledger = Ledger(settings)
    try:
        assert ledger.wait_for_control(15)
        agent = ledger.agent("lg-looper", workflow="wf-lg", pool="graphs")
        config: Any = {"callbacks": [LedgerCallbackHandler(agent)], "recursion_limit": 100_000}
        started = time.monotonic()
        with pytest.raises(BudgetExceeded) as stop:
            looping(llm, lambda: None).invoke(HI, config=config)
        print(
            f"the graph made {len(api.requests)} calls in {time.monotonic() - started:.1f}s "
            "before its budget refused the next"
        )
        assert stop.value.scope == "agent:lg-looper"
        assert stop.value.limit_usd == limit
        # Every request the graph sent was recorded; the allowance refused the call that
        # would not fit, so the budget was never passed.
        calls = len(api.requests)
        assert calls >= 5
        assert ledger.stats["events"] == calls
        assert calls * Decimal("0.00475") <= limit
        assert ledger.stats["refused_allowance"] + ledger.stats["refused"] >= 1
        assert ledger.transport.flush(10) == 0
    finally:
        ledger.close()

    each = genai_nano("openai", "gpt-4o", 1200, 300, 1000)
    client = QueryClient.from_settings(settings)
    deadline = time.monotonic() + 60
    while sink_totals(client, "wf-lg")[0] < calls and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sink_totals(client, "wf-lg") == (calls, calls * each)
    rows = client.query(
        "SELECT DISTINCT task_type, task_id FROM calls WHERE workflow_id = {wf:String}",
        {"wf": "wf-lg"},
    ).rows
    assert len(rows) == 1 and rows[0][0] == "LangGraph"  # one run, one task


def test_a_paused_langgraph_run_shows_on_the_dashboard_until_resumed(
    stack_settings: Settings, api: FakeApi
) -> None:
    settings = stack_settings
    producer = Producer({"bootstrap.servers": settings.kafka})

    def control(action: ControlAction) -> None:
        value = command("agent:lg-paused", action, time.time_ns() // 1_000_000)
        producer.produce(settings.topics.control, key=b"agent:lg-paused", value=value)
        assert producer.flush(10) == 0

    control(ControlAction.STOP)
    collector = Collector(settings)
    ledger = Ledger(settings)
    try:
        collector.start()
        assert ledger.wait_for_control(15)
        agent = ledger.agent("lg-paused", workflow="wf-paused")
        handler = LedgerCallbackHandler(agent, pause=Pause(timeout_s=120, poll_s=0.05))
        llm = langchain_openai.ChatOpenAI(
            model="gpt-4o", api_key="test", base_url=f"{api.url}/v1", max_retries=0
        )
        run = threading.Thread(
            target=single(llm).invoke, args=(HI,), kwargs={"config": {"callbacks": [handler]}}
        )
        run.start()

        def paused() -> list[dict[str, Any]]:
            return list(collector.refresh()["paused"])

        until(lambda: bool(paused()), "the pause to reach the dashboard", 60)
        (shown,) = paused()
        assert shown["scope"] == "agent:lg-paused" and shown["agents"] == ["lg-paused"]
        assert shown["calls"] == 1 and shown["process"] == pause_stats(ledger).process
        assert "budget exceeded for agent:lg-paused" in shown["reason"]
        assert api.requests == []  # the call waits before its request
        control(ControlAction.RESUME)  # what `agentledger control resume` publishes
        run.join(60)
        assert not run.is_alive() and len(api.requests) == 1
        until(lambda: not paused(), "the tombstone to clear the pause", 60)
        assert collector.pauses.rejected == 0
    finally:
        ledger.close()
        collector.stop()
