"""An OpenAI Agents SDK run under a fleet budget: ``LedgerModelProvider`` admits and records
every model call, a handoff target records as a spawned agent, and the processor's STOP ends
the run from inside ``Runner.run``.

Against the local stack (``agentledger up``), with a $0.02 daily budget for the agent:

    .venv/bin/python examples/openai_agents_budget.py --offline          # an in-process fake
    OPENAI_API_KEY=... .venv/bin/python examples/openai_agents_budget.py   # gpt-4o-mini for real

Needs ``pip install 'agentledger[openai-agents]'``.
"""

from __future__ import annotations

import argparse
import asyncio
from decimal import Decimal
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
from openai.types.responses import ResponseFunctionToolCall

from agentledger.budgets import apply_policies
from agentledger.config import Settings
from agentledger.producers import BudgetExceeded, Ledger
from agentledger.producers.framework import Pause
from agentledger.producers.openai_agents import LedgerModelProvider
from agentledger.schemas import BudgetPolicy, PolicyFile

LATENCY_S = 0.05
AGENT = "oa-example"


class OfflineModel(Model):
    """Always asks for the search tool, and reports gpt-4o-mini usage like OpenAI would."""

    def __init__(self) -> None:
        self.calls = 0

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        self.calls += 1
        await asyncio.sleep(LATENCY_S)  # a model takes time to answer
        call = ResponseFunctionToolCall(
            type="function_call",
            call_id=f"call_{self.calls}",
            name="search",
            arguments='{"query": "more"}',
        )
        usage = Usage(requests=1, input_tokens=20_000, output_tokens=500, total_tokens=20_500)
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
    return f"nothing new about {query}; search again"


async def run(provider: LedgerModelProvider, turns: int) -> None:
    researcher = Agent(name="researcher", model="gpt-4o-mini", tools=[search])
    await Runner.run(
        researcher,
        "find everything about budgets",
        run_config=RunConfig(model_provider=provider),
        max_turns=turns,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="use an in-process fake model")
    parser.add_argument("--pause", type=float, help="wait up to this many seconds for a resume")
    parser.add_argument("--turns", type=int, default=400, help="the run's max_turns")
    args = parser.parse_args()
    settings = Settings()
    budget = BudgetPolicy(scope=f"agent:{AGENT}", limit_usd=Decimal("0.02"))
    apply_policies(settings, PolicyFile(budgets=[budget]))
    if args.offline:
        set_tracing_disabled(True)  # nothing to export traces to
    with Ledger(settings) as ledger:
        ledger.wait_for_control(10)
        agent = ledger.agent(AGENT, workflow="wf-example", pool="examples")
        pause = Pause(timeout_s=args.pause) if args.pause else None
        inner = OfflineProvider() if args.offline else None
        provider = LedgerModelProvider(agent, inner, pause=pause)
        try:
            asyncio.run(run(provider, args.turns))
            print("the run finished")
        except BudgetExceeded as stop:
            print(f"stopped after {ledger.stats['events']} calls: {stop}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
