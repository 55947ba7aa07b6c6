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

import argparse
import asyncio
from decimal import Decimal
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage, UsageLimits

from agentledger.budgets import apply_policies
from agentledger.config import Settings
from agentledger.producers import BudgetExceeded, Ledger
from agentledger.producers.framework import Pause
from agentledger.producers.pydantic_ai import LedgerModel
from agentledger.schemas import BudgetPolicy, PolicyFile

LATENCY_S = 0.05
AGENT = "pa-example"


async def offline(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Always asks for the search tool, with gpt-4o-mini usage as OpenAI would report it."""
    await asyncio.sleep(LATENCY_S)  # a model takes time to answer
    return ModelResponse(
        parts=[ToolCallPart("search", {"query": "more"})],
        usage=RequestUsage(input_tokens=20_000, output_tokens=500),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="use an in-process fake model")
    parser.add_argument("--pause", type=float, help="wait up to this many seconds for a resume")
    parser.add_argument("--requests", type=int, default=400, help="pydantic-ai's request limit")
    args = parser.parse_args()
    settings = Settings()
    budget = BudgetPolicy(scope=f"agent:{AGENT}", limit_usd=Decimal("0.02"))
    apply_policies(settings, PolicyFile(budgets=[budget]))
    model: Any
    if args.offline:
        # Priced as gpt-4o-mini: the shim prices what the wrapped model says it is.
        model = FunctionModel(offline, model_name="gpt-4o-mini")
        provider: str | None = "openai"
    else:
        model, provider = "openai:gpt-4o-mini", None
    with Ledger(settings) as ledger:
        ledger.wait_for_control(10)
        agent = ledger.agent(AGENT, workflow="wf-example", pool="examples")
        pause = Pause(timeout_s=args.pause) if args.pause else None
        bot: Agent[None, str] = Agent(LedgerModel(model, agent, pause=pause, provider=provider))

        @bot.tool_plain
        def search(query: str) -> str:
            """Search the web for ``query``."""
            return f"nothing new about {query}; search again"

        try:
            bot.run_sync(
                "find everything about budgets",
                usage_limits=UsageLimits(request_limit=args.requests),
            )
            print("the run finished")
        except BudgetExceeded as stop:
            print(f"stopped after {ledger.stats['events']} calls: {stop}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
