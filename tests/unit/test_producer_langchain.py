"""The LangChain / LangGraph handler through the real packages (langchain-core, langgraph,
langchain-openai's ChatOpenAI) against the loopback fake of the OpenAI API."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agentledger.producers import BudgetExceeded, NewWorkRefused, ThrottleTimeout
from agentledger.producers.framework import Pause, pause_stats
from agentledger.schemas import ControlAction
from tests.unit.framework_fakes import FakeApi, StopAt, assert_priced, until
from tests.unit.test_producer_enforcement import throttled_harness as throttled
from tests.unit.test_producer_ledger import Harness

pytest.importorskip("langgraph")
langchain_openai = pytest.importorskip("langchain_openai")
from langchain_core.messages import AIMessage  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnableLambda  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langgraph.graph import END, START, MessagesState, StateGraph  # noqa: E402

from agentledger.producers.langchain import LedgerCallbackHandler  # noqa: E402


def chat(api: FakeApi, model: str = "gpt-4o") -> Any:
    return langchain_openai.ChatOpenAI(
        model=model, api_key="test", base_url=f"{api.url}/v1", max_retries=0
    )


def one_node(llm: Any) -> Callable[[MessagesState], dict[str, Any]]:
    def node(state: MessagesState) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    return node


def single(llm: Any, name: str = "call") -> Any:
    graph = StateGraph(MessagesState)
    graph.add_node(name, one_node(llm))
    graph.add_edge(START, name)
    graph.add_edge(name, END)
    return graph.compile()


def looping(llm: Any, on_tool: Callable[[], object]) -> Any:
    """An agent that calls its model, runs the tool the model asks for, and loops."""

    @tool
    def search() -> str:
        """Search for more."""
        on_tool()
        return "more"

    bound = llm.bind_tools([search])

    def think(state: MessagesState) -> dict[str, Any]:
        return {"messages": [bound.invoke(state["messages"])]}

    def act(state: MessagesState) -> dict[str, Any]:
        last = state["messages"][-1]
        assert isinstance(last, AIMessage) and last.tool_calls
        outs = [search.invoke(c) for c in last.tool_calls]
        return {"messages": outs}

    def more(state: MessagesState) -> str:
        last = state["messages"][-1]
        return "act" if isinstance(last, AIMessage) and last.tool_calls else END

    graph = StateGraph(MessagesState)
    graph.add_node("think", think)
    graph.add_node("act", act)
    graph.add_edge(START, "think")
    graph.add_conditional_edges("think", more, ["act", END])
    graph.add_edge("act", "think")
    return graph.compile()


HI = {"messages": [("user", "hi")]}


def test_usage_task_and_spawn_structure(api: FakeApi, h: Harness) -> None:
    agent = h.ledger.agent("lead", pool="p", workflow="wf")
    handler = LedgerCallbackHandler(agent)
    llm = chat(api)
    inner = single(llm, "inner")

    @tool
    def delegate() -> str:
        """Ask the helper agent."""
        return str(inner.invoke(HI)["messages"][-1].content)

    def via_tool(state: MessagesState) -> dict[str, Any]:
        return {"messages": [("user", delegate.invoke({}))]}

    graph = StateGraph(MessagesState)
    graph.add_node("plan", one_node(llm))
    graph.add_node("research", inner)  # a sub-graph as a node
    graph.add_node("tools", via_tool)  # a graph invoked by a tool, named after the tool
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "research")
    graph.add_edge("research", "tools")
    graph.add_edge("tools", END)
    graph.compile().invoke(HI, config={"callbacks": [handler]})

    events = h.events()
    assert [(e.agent_id, e.parent_agent_id, e.spawn_depth) for e in events] == [
        ("lead", None, 0),
        ("lead.research", "lead", 1),
        ("lead.delegate", "lead", 1),
    ]
    assert {e.workflow_id for e in events} == {"wf"}
    assert {e.pool for e in events} == {"p"}
    # One top-level run, one task; its id is the run's.
    assert {(e.task_type, e.task_id) for e in events} == {("LangGraph", events[0].task_id)}
    assert events[0].task_id is not None
    for event in events:
        assert (event.provider, event.requested_model) == ("openai", "gpt-4o")
        assert_priced(event, "gpt-4o")
        assert event.status == "ok"


def test_agents_invoked_from_tools_are_spawns_without_langgraph(api: FakeApi, h: Harness) -> None:
    agent = h.ledger.agent("lead", workflow="wf")
    handler = LedgerCallbackHandler(agent)
    llm = chat(api)
    writer = ChatPromptTemplate.from_messages([("user", "{q}")]) | llm

    @tool
    def write(q: str) -> str:
        """Ask the writer agent."""
        return str(writer.invoke({"q": q}).content)

    # An agent with a tool of its own: it asks the writer, then its model.
    researcher = RunnableLambda(lambda q: write.invoke({"q": q})) | RunnableLambda(llm.invoke)

    @tool
    def research(q: str) -> str:
        """Ask the researcher agent."""
        return str(researcher.invoke(q).content)

    @tool
    def quick(q: str) -> str:
        """A tool that calls the model itself: no agent of its own."""
        return str(llm.invoke(q).content)

    def lead_agent(text: str) -> str:
        llm.invoke(text)
        quick.invoke({"q": text})
        return research.invoke({"q": text})

    RunnableLambda(lead_agent).invoke("hi", config={"callbacks": [handler]})
    events = h.events()
    assert [(e.agent_id, e.parent_agent_id, e.spawn_depth) for e in events] == [
        ("lead", None, 0),
        ("lead", None, 0),
        ("lead.research.write", "lead.research", 2),
        ("lead.research", "lead", 1),
    ]
    # One top-level run: one task, carried by the spawns too.
    assert len({(e.task_type, e.task_id) for e in events}) == 1
    assert events[0].task_id is not None
    assert {e.workflow_id for e in events} == {"wf"}
    for event in events:
        assert_priced(event, "gpt-4o")


def test_user_task_wins_and_plain_chat_model_calls_are_recorded(api: FakeApi, h: Harness) -> None:
    agent = h.ledger.agent("a")
    handler = LedgerCallbackHandler(agent)
    llm = chat(api, "gpt-4o-mini")
    with agent.task("summarize", task_id="t-1"):
        llm.invoke("hi", config={"callbacks": [handler]})
    llm.invoke("hi", config={"callbacks": [handler]})
    first, second = h.events()
    assert (first.task_type, first.task_id) == ("summarize", "t-1")
    # A bare model call is no run of its own: no task.
    assert (second.task_type, second.task_id) == (None, None)
    assert_priced(first, "gpt-4o-mini")


def test_streaming_records_the_final_usage(api: FakeApi, h: Harness) -> None:
    handler = LedgerCallbackHandler(h.ledger.agent("a"))
    config: Any = {"callbacks": [handler]}
    # ChatOpenAI asks for usage in a stream by itself only from OpenAI's own endpoint; the
    # routable wrapper asks for it.
    for llm in (chat(api).bind(stream_usage=True), handler.routable(chat(api))):
        assert "".join(str(c.content) for c in llm.stream("hi", config=config)) == "hello"
    for event in h.events():
        assert_priced(event, "gpt-4o")
    assert len(h.events()) == 2


def test_failed_call_is_recorded_with_its_status(api: FakeApi, h: Harness) -> None:
    handler = LedgerCallbackHandler(h.ledger.agent("a"))
    api.fail_with = 429
    with pytest.raises(Exception, match="429"):
        chat(api).invoke("hi", config={"callbacks": [handler]})
    (event,) = h.events()
    assert (event.status, event.error_type) == ("rate_limited", "OpenAIRateLimitError")


ENTRY_POINTS = ["invoke", "ainvoke", "stream", "astream"]


def run_entry(app: Any, entry: str, config: dict[str, Any]) -> None:
    args = ({**HI}, config | {"recursion_limit": 100})
    if entry == "invoke":
        app.invoke(*args)
    elif entry == "stream":
        list(app.stream(*args))
    elif entry == "ainvoke":
        asyncio.run(app.ainvoke(*args))
    else:

        async def drain() -> None:
            async for _ in app.astream(*args):
                pass

        asyncio.run(drain())


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_stop_mid_run_raises_out_of_the_entry_point(api: FakeApi, h: Harness, entry: str) -> None:
    api.loop_tool = "search"
    agent = h.ledger.agent("looper", pool="p")
    app = looping(chat(api), StopAt(h, 3, "agent:looper"))
    with pytest.raises(BudgetExceeded) as info:
        run_entry(app, entry, {"callbacks": [LedgerCallbackHandler(agent)]})
    assert type(info.value) is BudgetExceeded
    assert info.value.scope == "agent:looper"
    # Three calls ran; the fourth was refused before its request was sent.
    assert len(h.events()) == 3
    assert len(api.requests) == 3
    assert h.ledger.stats["refused"] == 1


def test_a_standing_stop_refuses_the_run_and_refuse_new_work_refuses_new_runs(
    api: FakeApi, h: Harness
) -> None:
    agent = h.ledger.agent("a", pool="p")
    app = single(chat(api))
    h.publish("pool:p", ControlAction.REFUSE_NEW_WORK)
    with pytest.raises(NewWorkRefused, match="pool:p"):
        app.invoke(HI, config={"callbacks": [LedgerCallbackHandler(agent)]})
    h.publish("pool:p", ControlAction.RESUME)
    h.publish("agent:a")
    with pytest.raises(BudgetExceeded, match="agent:a"):
        app.invoke(HI, config={"callbacks": [LedgerCallbackHandler(agent)]})
    assert api.requests == []


def test_route_is_applied_through_routable_and_recorded(api: FakeApi, h: Harness) -> None:
    agent = h.ledger.agent("a", pool="p")
    handler = LedgerCallbackHandler(agent)
    h.publish("pool:p", ControlAction.ROUTE, params={"from": "gpt-4o", "to": "gpt-4o-mini"})
    api.tool_calls = ["search"]
    app = looping(handler.routable(chat(api)), lambda: None)
    app.invoke(HI, config={"callbacks": [handler]})
    assert [r["model"] for r in api.requests] == ["gpt-4o-mini", "gpt-4o-mini"]
    assert api.requests[0]["tools"][0]["function"]["name"] == "search"  # bind_tools kept
    for event in h.events():
        assert event.requested_model == "gpt-4o"
        assert_priced(event, "gpt-4o-mini")
    # A model that is not wrapped is sent unrouted, and recorded as such.
    chat(api).invoke("hi", config={"callbacks": [handler]})
    assert api.requests[-1]["model"] == "gpt-4o"
    assert_priced(h.events()[-1], "gpt-4o")
    assert handler.unrouted == 1


def test_throttle_waits_for_a_slot(api: FakeApi, tmp_path: Path) -> None:
    h = throttled(tmp_path, None)
    agent = h.ledger.agent("a", pool="p")
    h.publish("pool:p", ControlAction.THROTTLE, params={"concurrency": 1})
    holder = agent.call(provider="openai", model="gpt-4o").__enter__()  # the one slot
    app = single(chat(api))
    done = threading.Event()

    def run() -> None:
        app.invoke(HI, config={"callbacks": [LedgerCallbackHandler(agent)]})
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    until(lambda: h.ledger.stats["throttled"] == 1, "the graph's call to wait for a slot")
    assert not done.is_set() and api.requests == []
    holder.__exit__(None, None, None)
    thread.join(30)
    assert done.is_set()
    assert len(api.requests) == 1


def test_throttle_timeout_raises_out_of_invoke(api: FakeApi, tmp_path: Path) -> None:
    h = throttled(tmp_path, 0.05)
    agent = h.ledger.agent("a", pool="p")
    h.publish("pool:p", ControlAction.THROTTLE, params={"concurrency": 1})
    with (
        agent.call(provider="openai", model="gpt-4o"),
        pytest.raises(ThrottleTimeout, match="pool:p"),
    ):
        single(chat(api)).invoke(HI, config={"callbacks": [LedgerCallbackHandler(agent)]})


def test_pause_waits_for_a_resume(api: FakeApi, h: Harness) -> None:
    agent = h.ledger.agent("a", pool="p")
    api.tool_calls = ["search"]
    handler = LedgerCallbackHandler(agent, pause=Pause(timeout_s=60, poll_s=0.01))
    app = looping(chat(api), StopAt(h, 1, "pool:p"))
    done = threading.Event()

    def run() -> None:
        app.invoke(HI, config={"callbacks": [handler]})
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    stats = pause_stats(h.ledger)
    until(lambda: stats.paused_now == {"pool:p": 1}, "the second call to pause")
    assert not done.is_set() and len(api.requests) == 1
    h.publish("pool:p", ControlAction.RESUME)  # what `agentledger control resume` publishes
    thread.join(30)
    assert done.is_set()
    assert len(h.events()) == 2
    assert (stats.pauses, stats.resumed, stats.timed_out, stats.paused_now) == (1, 1, 0, {})


def test_pause_ends_when_the_budget_resets_and_raises_after_its_timeout(
    api: FakeApi, h: Harness
) -> None:
    agent = h.ledger.agent("a")
    until_ms = h.clock.now + 60_000
    h.publish("agent:a", until_ms=until_ms)
    app = single(chat(api))
    with pytest.raises(BudgetExceeded, match="agent:a"):
        app.invoke(
            HI, config={"callbacks": [LedgerCallbackHandler(agent, pause=Pause(timeout_s=0.05))]}
        )
    assert pause_stats(h.ledger).timed_out == 1
    thread = threading.Thread(
        target=app.invoke,
        args=(HI,),
        kwargs={
            "config": {
                "callbacks": [LedgerCallbackHandler(agent, pause=Pause(timeout_s=60, poll_s=0.01))]
            }
        },
    )
    thread.start()
    until(lambda: pause_stats(h.ledger).paused_now == {"agent:a": 1}, "the run to pause")
    h.clock.now = until_ms  # the day ends: the STOP lapses
    thread.join(30)
    assert not thread.is_alive()
    assert len(h.events()) == 1


def test_an_exhausted_budget_is_refused_locally_out_of_invoke(api: FakeApi, h: Harness) -> None:
    agent = h.ledger.agent("a")
    # The processor's last report: $0.001 left of $1.00; a gpt-4o call capped at 500 output
    # tokens reserves $0.005, so the shim refuses it before the request.
    h.publish(
        "agent:a",
        ControlAction.THROTTLE,
        params={"concurrency": 100},
        spend_nano_usd=999_000_000,
        limit_nano_usd=1_000_000_000,
    )
    llm = langchain_openai.ChatOpenAI(
        model="gpt-4o", api_key="test", base_url=f"{api.url}/v1", max_retries=0, max_tokens=500
    )
    with pytest.raises(BudgetExceeded, match="local reservation"):
        single(llm).invoke(HI, config={"callbacks": [LedgerCallbackHandler(agent)]})
    assert api.requests == [] and h.ledger.stats["refused_local"] == 1
