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

import time
from typing import Any

from budget_demo import (
    LATENCY_S,
    OFFLINE_MODEL,
    OFFLINE_USAGE,
    TOOL_ARGS,
    Demo,
    parse,
    search_result,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph

from agentledger.producers.langchain import LedgerCallbackHandler

AGENT = "lg-example"


class OfflineModel(BaseChatModel):
    """Always asks for the search tool, and reports gpt-4o-mini usage like OpenAI would."""

    @property
    def _llm_type(self) -> str:
        return "offline"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        return {"ls_provider": "openai", "ls_model_name": OFFLINE_MODEL, "ls_max_tokens": 500}

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **_: Any
    ) -> ChatResult:
        time.sleep(LATENCY_S)
        call = {"name": "search", "args": TOOL_ARGS, "id": f"call_{len(messages)}"}
        inp, out = OFFLINE_USAGE
        usage = {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out}
        message = AIMessage(content="", tool_calls=[call], usage_metadata=usage)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self


@tool
def search(query: str) -> str:
    """Search the web for ``query``."""
    return search_result(query)


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
    args = parse(__doc__, "steps", "the graph's recursion limit")
    if args.offline:
        model: Any = OfflineModel()
    else:
        from langchain_openai import ChatOpenAI

        model = ChatOpenAI(model="gpt-4o-mini")
    with Demo.start(AGENT, args) as demo:
        handler = LedgerCallbackHandler(demo.agent, pause=demo.pause)
        graph = build(handler.routable(model))
        return demo.run(
            lambda: graph.invoke(
                {"messages": [("user", "find everything about budgets")]},
                config={"callbacks": [handler], "recursion_limit": args.steps},
            )
        )


if __name__ == "__main__":
    raise SystemExit(main())
