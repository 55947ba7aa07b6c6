"""A looping LangGraph agent under a fleet budget: every model call is recorded and enforced by
``LedgerCallbackHandler``, so the processor's STOP ends the loop from inside ``invoke``.

Against the local stack (``agentledger up``), with a $0.02 daily budget for the agent:

    .venv/bin/python examples/langgraph_budget.py --offline          # an in-process fake model
    OPENAI_API_KEY=... .venv/bin/python examples/langgraph_budget.py   # gpt-4o-mini for real
    .venv/bin/python examples/langgraph_budget.py --offline --pause 60 # wait for a resume instead

With ``--pause``, resume it from another shell: ``agentledger control resume agent:lg-example``.
Needs ``pip install 'agentledger[langchain]'`` (and ``langchain-openai`` without --offline).
"""

from __future__ import annotations

import argparse
import time
from decimal import Decimal
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph

from agentledger.budgets import apply_policies
from agentledger.config import Settings
from agentledger.producers import BudgetExceeded, Ledger
from agentledger.producers.framework import Pause
from agentledger.producers.langchain import LedgerCallbackHandler
from agentledger.schemas import BudgetPolicy, PolicyFile

LATENCY_S = 0.05
AGENT = "lg-example"


class OfflineModel(BaseChatModel):
    """Always asks for the search tool, and reports gpt-4o-mini usage like OpenAI would."""

    @property
    def _llm_type(self) -> str:
        return "offline"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        return {"ls_provider": "openai", "ls_model_name": "gpt-4o-mini", "ls_max_tokens": 500}

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **_: Any
    ) -> ChatResult:
        time.sleep(LATENCY_S)  # a model takes time to answer
        call = {"name": "search", "args": {"query": "more"}, "id": f"call_{len(messages)}"}
        usage = {"input_tokens": 20_000, "output_tokens": 500, "total_tokens": 20_500}
        message = AIMessage(content="", tool_calls=[call], usage_metadata=usage)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self


@tool
def search(query: str) -> str:
    """Search the web for ``query``."""
    return f"nothing new about {query}; search again"


def build(model: Any) -> Any:
    bound = model.bind_tools([search])

    def think(state: MessagesState) -> dict[str, Any]:
        return {"messages": [bound.invoke(state["messages"])]}

    def act(state: MessagesState) -> dict[str, Any]:
        last = state["messages"][-1]
        calls = last.tool_calls if isinstance(last, AIMessage) else []
        return {"messages": [search.invoke(c) for c in calls]}

    def again(state: MessagesState) -> str:
        last = state["messages"][-1]
        return "act" if isinstance(last, AIMessage) and last.tool_calls else END

    graph = StateGraph(MessagesState)
    graph.add_node("think", think)
    graph.add_node("act", act)
    graph.add_edge(START, "think")
    graph.add_conditional_edges("think", again, ["act", END])
    graph.add_edge("act", "think")
    return graph.compile()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="use an in-process fake model")
    parser.add_argument("--pause", type=float, help="wait up to this many seconds for a resume")
    parser.add_argument("--steps", type=int, default=400, help="the graph's recursion limit")
    args = parser.parse_args()
    settings = Settings()
    apply_policies(
        settings,
        PolicyFile(budgets=[BudgetPolicy(scope=f"agent:{AGENT}", limit_usd=Decimal("0.02"))]),
    )
    if args.offline:
        model: Any = OfflineModel()
    else:
        from langchain_openai import ChatOpenAI

        model = ChatOpenAI(model="gpt-4o-mini")
    with Ledger(settings) as ledger:
        ledger.wait_for_control(10)
        agent = ledger.agent(AGENT, workflow="wf-example", pool="examples")
        pause = Pause(timeout_s=args.pause) if args.pause else None
        handler = LedgerCallbackHandler(agent, pause=pause)
        graph = build(handler.routable(model))
        try:
            graph.invoke(
                {"messages": [("user", "find everything about budgets")]},
                config={"callbacks": [handler], "recursion_limit": args.steps},
            )
            print("the graph finished within its step limit")
        except BudgetExceeded as stop:
            print(f"stopped after {ledger.stats['events']} calls: {stop}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
