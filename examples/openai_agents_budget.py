"""An OpenAI Agents SDK run under a fleet budget: ``LedgerModelProvider`` admits and records
every model call, a handoff target records as a spawned agent, and the processor's STOP ends
the run from inside ``Runner.run``.

Against the local stack (``agentledger up``), with a $0.02 daily budget for the agent:

    .venv/bin/python examples/openai_agents_budget.py --offline          # an in-process fake
    OPENAI_API_KEY=... .venv/bin/python examples/openai_agents_budget.py   # gpt-4o-mini for real

Needs ``pip install 'agentledger[openai-agents]'``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from agents import (
    Agent,
    ModelResponse,
    RunConfig,
    Runner,
    Usage,
    function_tool,
    set_tracing_disabled,
)
from agents.models.interface import Model, ModelProvider
from budget_demo import LATENCY_S, OFFLINE_USAGE, TOOL_ARGS, Demo, parse, search_result
from openai.types.responses import ResponseFunctionToolCall

from agentledger.producers.openai_agents import LedgerModelProvider

AGENT = "oa-example"


class OfflineModel(Model):
    """Always asks for the search tool, and reports gpt-4o-mini usage like OpenAI would."""

    def __init__(self) -> None:
        self.calls = 0

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        self.calls += 1
        await asyncio.sleep(LATENCY_S)
        call = ResponseFunctionToolCall(
            type="function_call",
            call_id=f"call_{self.calls}",
            name="search",
            arguments=json.dumps(TOOL_ARGS),
        )
        inp, out = OFFLINE_USAGE
        usage = Usage(requests=1, input_tokens=inp, output_tokens=out, total_tokens=inp + out)
        return ModelResponse(output=[call], usage=usage, response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the offline model does not stream")


class OfflineProvider(ModelProvider):
    def __init__(self) -> None:
        self.model = OfflineModel()

    def get_model(self, model_name: str | None) -> Model:
        return self.model


@function_tool
def search(query: str) -> str:
    """Search the web for ``query``."""
    return search_result(query)


async def run(provider: LedgerModelProvider, turns: int) -> None:
    researcher = Agent(name="researcher", model="gpt-4o-mini", tools=[search])
    await Runner.run(
        researcher,
        "find everything about budgets",
        run_config=RunConfig(model_provider=provider),
        max_turns=turns,
    )


def main() -> int:
    args = parse(__doc__, "turns", "the run's max_turns")
    if args.offline:
        set_tracing_disabled(True)  # nothing to export traces to
    with Demo.start(AGENT, args) as demo:
        inner = OfflineProvider() if args.offline else None
        provider = LedgerModelProvider(demo.agent, inner, pause=demo.pause)
        return demo.run(lambda: asyncio.run(run(provider, args.turns)))


if __name__ == "__main__":
    raise SystemExit(main())
