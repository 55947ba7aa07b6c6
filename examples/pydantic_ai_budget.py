"""A pydantic-ai agent under a fleet budget: ``LedgerModel`` admits and records every model
request, and the processor's STOP ends the run from inside ``run_sync``; pydantic-ai's own
``UsageLimits`` stay the per-run limits they are.

Against the local stack (``agentledger up``), with a $0.02 daily budget for the agent:

    .venv/bin/python examples/pydantic_ai_budget.py --offline          # an in-process fake
    OPENAI_API_KEY=... .venv/bin/python examples/pydantic_ai_budget.py   # gpt-4o-mini for real

Needs ``pip install 'agentledger[pydantic-ai]'`` (and ``pydantic-ai-slim[openai]`` without
--offline).
"""

from __future__ import annotations

import asyncio
from typing import Any

import budget_demo as shared
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage, UsageLimits

from agentledger.producers.pydantic_ai import LedgerModel

AGENT = "pa-example"


async def offline(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Always asks for the search tool, with gpt-4o-mini usage as OpenAI would report it."""
    await asyncio.sleep(shared.LATENCY_S)
    inp, out = shared.OFFLINE_USAGE
    return ModelResponse(
        parts=[ToolCallPart("search", dict(shared.TOOL_ARGS))],
        usage=RequestUsage(input_tokens=inp, output_tokens=out),
    )


def main() -> int:
    args = shared.parse(__doc__, "requests", "pydantic-ai's request limit")
    model: Any
    if args.offline:
        # Priced as gpt-4o-mini: the shim prices what the wrapped model says it is.
        model = FunctionModel(offline, model_name=shared.OFFLINE_MODEL)
        provider: str | None = "openai"
    else:
        model, provider = "openai:gpt-4o-mini", None
    with shared.Demo.start(AGENT, args) as demo:
        wrapped = LedgerModel(model, demo.agent, pause=demo.pause, provider=provider)
        bot: Agent[None, str] = Agent(wrapped)

        @bot.tool_plain
        def search(query: str) -> str:
            """Search the web for ``query``."""
            return shared.search_result(query)

        limits = UsageLimits(request_limit=args.requests)
        return demo.run(lambda: bot.run_sync("find everything about budgets", usage_limits=limits))


if __name__ == "__main__":
    raise SystemExit(main())
