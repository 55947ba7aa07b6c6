"""The OpenAI Agents SDK model provider through the real package against the loopback fake of
the OpenAI Responses API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from agentledger.producers import BudgetExceeded
from agentledger.producers.framework import Pause
from agentledger.schemas import ControlAction
from tests.unit.framework_fakes import FakeApi, StopAt, assert_paused_then_resumed, assert_priced
from tests.unit.test_producer_ledger import Harness

agents = pytest.importorskip("agents")
import openai  # noqa: E402
from agents import Agent, OpenAIProvider, RunConfig, Runner, function_tool  # noqa: E402
from agents.tracing import set_trace_processors  # noqa: E402

from agentledger.producers.openai_agents import LedgerModelProvider  # noqa: E402


@pytest.fixture(autouse=True)
def no_trace_export() -> Iterator[None]:
    # Traces are still made (the provider reads the agent span and the trace id), but no
    # processor exports them anywhere.
    set_trace_processors([])
    yield


class Run:
    """A run config over a client of its own, closed in the run's event loop (the SDK's
    default client is shared across loops, and a client left open warns when collected)."""

    def __init__(self, api: FakeApi, h: Harness, **kwargs: Any) -> None:
        agent = h.ledger.agent("lead", pool="p", workflow="wf")
        self.client = openai.AsyncOpenAI(api_key="test", base_url=f"{api.url}/v1", max_retries=0)
        inner = OpenAIProvider(openai_client=self.client, use_responses=True)
        self.config = RunConfig(model_provider=LedgerModelProvider(agent, inner, **kwargs))

    def __call__(self, bot: Agent[Any], text: str = "hi", **kwargs: Any) -> Any:
        async def main() -> Any:
            try:
                return await Runner.run(bot, text, run_config=self.config, **kwargs)
            finally:
                await self.client.close()

        return asyncio.run(main())


def test_usage_task_and_handoff_and_agent_as_tool_spawns(api: FakeApi, h: Harness) -> None:
    helper = Agent(name="helper", model="gpt-4o", instructions="help")
    writer = Agent(name="writer", model="gpt-4o", instructions="write")
    lead = Agent(
        name="lead bot",
        model="gpt-4o",
        tools=[helper.as_tool(tool_name="ask_helper", tool_description="ask the helper")],
        handoffs=[writer],
    )
    # lead asks the helper (a nested run), the helper answers, lead hands off to the writer,
    # who answers.
    api.tool_calls = ["ask_helper", "", "transfer_to_writer"]
    api.tool_args["ask_helper"] = '{"input": "find it"}'
    result = Run(api, h)(lead)
    assert result.final_output == "hello"
    events = h.events()
    assert [(e.agent_id, e.parent_agent_id, e.spawn_depth) for e in events] == [
        ("lead", None, 0),
        ("lead.helper", "lead", 1),
        ("lead", None, 0),
        ("lead.writer", "lead", 1),
    ]
    assert len(api.requests) == 4
    # One trace per top-level run: one task, the nested run included.
    assert len({(e.task_type, e.task_id) for e in events}) == 1
    assert events[0].task_type == "Agent_workflow"
    assert events[0].task_id is not None and events[0].task_id.startswith("trace_")
    for event in events:
        assert (event.provider, event.requested_model) == ("openai", "gpt-4o")
        assert_priced(event, "gpt-4o")


def test_tracing_disabled_still_maps_agents_but_has_no_task(api: FakeApi, h: Harness) -> None:
    writer = Agent(name="writer", model="gpt-4o")
    lead = Agent(name="lead", model="gpt-4o", handoffs=[writer])
    api.tool_calls = ["transfer_to_writer"]
    run = Run(api, h)
    run.config.tracing_disabled = True
    run(lead)
    events = h.events()
    assert [e.agent_id for e in events] == ["lead", "lead.writer"]
    assert {e.task_id for e in events} == {None}


def test_streamed_run_records_the_completed_response(api: FakeApi, h: Harness) -> None:
    run = Run(api, h)

    async def main() -> None:
        result = Runner.run_streamed(Agent(name="a", model="gpt-4o"), "hi", run_config=run.config)
        async for _ in result.stream_events():
            pass
        await run.client.close()

    asyncio.run(main())
    (event,) = h.events()
    assert api.requests[0]["stream"] is True
    assert_priced(event, "gpt-4o")


def test_route_asks_the_wrapped_provider_for_the_routed_model(api: FakeApi, h: Harness) -> None:
    h.publish("pool:p", ControlAction.ROUTE, params={"from": "gpt-4o", "to": "gpt-4o-mini"})
    Run(api, h)(Agent(name="a", model="gpt-4o"))
    assert api.requests[0]["model"] == "gpt-4o-mini"
    (event,) = h.events()
    assert event.requested_model == "gpt-4o"
    assert_priced(event, "gpt-4o-mini")


def test_a_stop_mid_run_raises_out_of_runner_run(api: FakeApi, h: Harness) -> None:
    stop = StopAt(h, 3, "agent:lead")

    @function_tool
    def search() -> str:
        """Search for more."""
        return stop()

    api.loop_tool = "search"
    bot = Agent(name="lead", model="gpt-4o", tools=[search])
    with pytest.raises(BudgetExceeded, match="agent:lead"):
        Run(api, h)(bot, max_turns=50)
    assert len(h.events()) == 3 and len(api.requests) == 3
    assert h.ledger.stats["refused"] == 1


def test_failed_request_is_recorded(api: FakeApi, h: Harness) -> None:
    api.fail_with = 500
    with pytest.raises(Exception, match="500"):
        Run(api, h)(Agent(name="a", model="gpt-4o"))
    assert {e.status for e in h.events()} == {"error"}


def test_pause_waits_for_a_resume(api: FakeApi, h: Harness) -> None:
    run = Run(api, h, pause=Pause(timeout_s=60, poll_s=0.01))
    assert_paused_then_resumed(h, api, "agent:lead", lambda: run(Agent(name="a", model="gpt-4o")))
