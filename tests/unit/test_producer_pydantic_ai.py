"""The pydantic-ai model wrapper through the real package (OpenAIChatModel) against the loopback
fake of the OpenAI chat completions API."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agentledger.producers import AgentLedger, BudgetExceeded
from agentledger.producers.framework import Pause
from agentledger.schemas import ControlAction
from tests.unit.framework_fakes import FakeApi, StopAt, assert_paused_then_resumed, assert_priced
from tests.unit.test_producer_ledger import Harness

pytest.importorskip("pydantic_ai")
import openai
from pydantic_ai import Agent, RunContext
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.usage import UsageLimits

from agentledger.producers.pydantic_ai import LedgerModel


class Models:
    """OpenAI chat models over one client, closed in the run's event loop."""

    def __init__(self, api: FakeApi) -> None:
        self.client = openai.AsyncOpenAI(api_key="test", base_url=f"{api.url}/v1", max_retries=0)

    def __call__(self, agent: AgentLedger, model: str = "gpt-4o", **kwargs: Any) -> LedgerModel:
        inner = OpenAIChatModel(model, provider=OpenAIProvider(openai_client=self.client))
        return LedgerModel(inner, agent, **kwargs)

    def run(self, bot: Agent[Any, Any], text: str = "hi", **kwargs: Any) -> Any:
        async def main() -> Any:
            try:
                return await bot.run(text, **kwargs)
            finally:
                await self.client.close()

        return asyncio.run(main())


def test_usage_and_an_explicitly_spawned_delegate(api: FakeApi, h: Harness) -> None:
    lead = h.ledger.agent("lead", pool="p", workflow="wf")
    models = Models(api)
    helper = Agent(models(lead.spawn("lead.helper")))
    bot = Agent(models(lead))

    @bot.tool
    async def ask_helper(ctx: RunContext[None]) -> str:
        """Ask the helper."""
        result = await helper.run("help", usage=ctx.usage)
        return str(result.output)

    api.tool_calls = ["ask_helper"]
    with lead.task("research", task_id="t-1"):
        result = models.run(bot)
    assert result.output == "hello"
    events = h.events()
    assert [(e.agent_id, e.parent_agent_id, e.spawn_depth) for e in events] == [
        ("lead", None, 0),
        ("lead.helper", "lead", 1),
        ("lead", None, 0),
    ]
    assert {(e.task_type, e.task_id) for e in events} == {("research", "t-1")}
    for event in events:
        assert (event.provider, event.requested_model) == ("openai", "gpt-4o")
        assert_priced(event, "gpt-4o")


def test_delegates_are_spawns_of_the_agent_they_work_for(api: FakeApi, h: Harness) -> None:
    lead = h.ledger.agent("lead", workflow="wf")
    models = Models(api)  # every model wrapped for the same ledger agent
    bot = Agent(models(lead), name="lead")
    helper = Agent(models(lead), name="helper")
    digger = Agent(models(lead), name="digger")
    writer = Agent(models(lead), name="writer")
    loner = Agent(models(lead), name="loner")

    @bot.tool
    async def ask_team(ctx: RunContext[None]) -> str:
        """Ask the helper, then the writer (pydantic-ai's agent delegation)."""
        found = await helper.run("find", usage=ctx.usage)
        written = await writer.run("write", usage=ctx.usage)
        await loner.run("no usage passed: not known as a delegate")
        return f"{found.output} {written.output}"

    @helper.tool
    async def dig(ctx: RunContext[None]) -> str:
        """The helper delegates in turn."""
        return str((await digger.run("dig", usage=ctx.usage)).output)

    # lead asks for ask_team; helper asks for dig; everyone else answers.
    api.tool_calls = ["ask_team", "dig"]
    with lead.task("research", task_id="t-2"):
        assert models.run(bot).output == "hello"
    events = h.events()
    assert [(e.agent_id, e.parent_agent_id, e.spawn_depth) for e in events] == [
        ("lead", None, 0),
        ("lead.helper", "lead", 1),
        ("lead.helper.digger", "lead.helper", 2),
        ("lead.helper", "lead", 1),
        ("lead.writer", "lead", 1),
        ("lead", None, 0),  # the loner
        ("lead", None, 0),
    ]
    assert {(e.task_type, e.task_id) for e in events} == {("research", "t-2")}
    for event in events:
        assert_priced(event, "gpt-4o")


def test_streamed_run_records_usage(api: FakeApi, h: Harness) -> None:
    models = Models(api)
    bot = Agent(models(h.ledger.agent("a")))

    async def main() -> str:
        async with bot.run_stream("hi") as stream:
            text = await stream.get_output()
        await models.client.close()
        return str(text)

    assert asyncio.run(main()) == "hello"
    (event,) = h.events()
    assert api.requests[0]["stream"] is True
    assert_priced(event, "gpt-4o")


def test_route_sends_the_routed_model(api: FakeApi, h: Harness) -> None:
    h.publish("pool:p", ControlAction.ROUTE, params={"from": "gpt-4o", "to": "gpt-4o-mini"})
    models = Models(api)
    models.run(Agent(models(h.ledger.agent("a", pool="p"))))
    assert api.requests[0]["model"] == "gpt-4o-mini"
    (event,) = h.events()
    assert event.requested_model == "gpt-4o"
    assert_priced(event, "gpt-4o-mini")


def test_a_stop_mid_run_raises_out_of_run_and_usage_limits_stay_pydantic_ais(
    api: FakeApi, h: Harness
) -> None:
    models = Models(api)
    bot = Agent(models(h.ledger.agent("looper")))
    stop = StopAt(h, 3, "agent:looper")

    @bot.tool_plain
    def search() -> str:
        """Search for more."""
        return stop()

    api.loop_tool = "search"
    with pytest.raises(BudgetExceeded, match="agent:looper"):
        models.run(bot, usage_limits=UsageLimits(request_limit=50))
    assert len(h.events()) == 3 and len(api.requests) == 3


def test_pause_waits_for_a_resume(api: FakeApi, h: Harness) -> None:
    models = Models(api)
    bot = Agent(models(h.ledger.agent("a"), pause=Pause(timeout_s=60, poll_s=0.01)))
    assert_paused_then_resumed(h, api, "agent:a", lambda: models.run(bot))


def test_failed_request_is_recorded(api: FakeApi, h: Harness) -> None:
    models = Models(api)
    api.fail_with = 429
    with pytest.raises(Exception, match="429"):
        models.run(Agent(models(h.ledger.agent("a"))))
    assert {(e.status, e.error_type) for e in h.events()} == {("rate_limited", "ModelHTTPError")}
