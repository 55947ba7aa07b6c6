"""A LangChain / LangGraph callback handler that records and enforces every model call.

```python
from agentledger.producers.langchain import LedgerCallbackHandler
graph.invoke(inputs, config={"callbacks": [LedgerCallbackHandler(agent)]})
```

Every chat-model and LLM call starts inside ``agent.call`` (so a STOP, a local refusal or a
fail-closed control plane raises ``BudgetExceeded`` out of ``invoke``/``ainvoke``/``stream``
before the request; a THROTTLE waits for a slot) and is recorded when it ends, with the usage
LangChain reports (``usage_metadata``, else ``llm_output["token_usage"]``). The run tree gives
the structure: each top-level run is a task (``task_id`` = its run id), and a call inside a
LangGraph sub-graph (a graph run as a node, or invoked from a node or tool) is recorded by a
spawned agent, one per sub-graph path. A callback cannot change the model a request is sent
to, so a ROUTE is applied only to a model wrapped with ``handler.routable(model)``; LangChain
is imported only when this module is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import LLMResult

from .framework import Pause, admit, check_task, identifier, inherited_task
from .ledger import AgentLedger, CallRecorder
from .sdk_usage import fail, token_count

__all__ = ["LedgerCallbackHandler"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Run:
    root: UUID
    task_type: str | None
    path: tuple[str, ...] = ()
    """the spawn path of the agent this run works for (empty: the handler's own agent)"""
    base: int = 0
    """how many parts of LangGraph's checkpoint namespace ``path`` already accounts for"""
    tool: str | None = None
    """a tool run's name: a chain started under it is an agent the tool invoked"""


def _namespace(metadata: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The node names of LangGraph's checkpoint namespace ``outer:<id>|inner:<id>``."""
    namespace = (metadata or {}).get("langgraph_checkpoint_ns")
    if not isinstance(namespace, str) or not namespace:
        return ()
    return tuple(identifier(part.partition(":")[0], "node") for part in namespace.split("|"))


def _path(run: _Run | None, namespace: tuple[str, ...]) -> tuple[str, ...]:
    """The spawn path of work under ``run`` at ``namespace``: the run's own, then one level per
    sub-graph below it (every namespace part but the last, the node doing the work)."""
    if run is None:
        return namespace[:-1]
    return run.path + namespace[run.base : len(namespace) - 1]


def _child(run_id: UUID, parent: _Run, namespace: tuple[str, ...], tool: str | None) -> _Run:
    """A run started under ``parent`` (or the first run, under a stand-in for itself)."""
    if tool is not None:  # a tool run: what it invokes is named after it
        return _Run(parent.root, parent.task_type, _path(parent, namespace), len(namespace), tool)
    if parent.tool is not None:  # a chain or agent a tool invoked: a sub-agent
        return _Run(parent.root, parent.task_type, (*parent.path, parent.tool), parent.base)
    return _Run(parent.root, parent.task_type, parent.path, parent.base)


class LedgerCallbackHandler(BaseCallbackHandler):
    """Records and enforces every model call of the runs it is passed to, for ``agent``.

    ``task_type`` names the task of each top-level run (default: the run's name, such as
    ``LangGraph``); ``tasks=False`` leaves runs out of tasks (and unchecked at their start);
    ``pause`` waits out a STOP instead of raising; ``provider`` is used when the model does
    not say (``ls_provider``)."""

    # LangChain logs and swallows a handler's exception unless the handler says otherwise.
    raise_error = True
    # In async runs a sync handler runs in an executor thread (a THROTTLE wait never blocks
    # the event loop); LangChain copies the context into it.
    run_inline = False

    def __init__(
        self,
        agent: AgentLedger,
        *,
        task_type: str | None = None,
        pause: Pause | None = None,
        provider: str = "unknown",
        tasks: bool = True,
    ) -> None:
        super().__init__()
        self.agent = agent
        self.task_type = None if task_type is None else identifier(task_type, "langchain")
        self.pause = pause
        self.provider = identifier(provider, "unknown")
        self.tasks = tasks
        self._lock = threading.Lock()
        self._runs: dict[UUID, _Run] = {}
        self._calls: dict[UUID, CallRecorder] = {}
        self._spawned: dict[tuple[str, ...], AgentLedger] = {}
        self._rerouted: set[UUID] = set()
        self.unrouted = 0
        """calls a ROUTE applied to that were sent unrouted: their model was not wrapped with
        ``routable``, so they are recorded at the model actually called"""

    # --- the run tree ---------------------------------------------------------------------

    def _start_run(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        name: object,
        metadata: Mapping[str, Any] | None,
        *,
        tool: bool,
    ) -> None:
        namespace = _namespace(metadata)
        tool_name = identifier(name, "tool") if tool else None
        with self._lock:
            parent = self._runs.get(parent_run_id) if parent_run_id is not None else None
            if parent is not None:
                self._runs[run_id] = _child(run_id, parent, namespace, tool_name)
                return
        if parent_run_id is not None or not self.tasks:
            # A run whose parent this handler never saw (it was passed below the top).
            with self._lock:
                self._runs[run_id] = _child(run_id, _Run(run_id, None), namespace, tool_name)
            return
        task_type = self.task_type or identifier(name, "langchain")
        if self.agent.current_task() is None:
            # A top-level run is a new unit of work: refused under a STOP or REFUSE_NEW_WORK.
            check_task(self.agent, task_type, str(run_id), self.pause)
        with self._lock:
            self._runs[run_id] = _child(run_id, _Run(run_id, task_type), namespace, tool_name)

    def _end_run(self, run_id: UUID) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = kwargs.get("name") or (serialized or {}).get("name")
        self._start_run(run_id, parent_run_id, name, metadata, tool=False)

    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = kwargs.get("name") or (serialized or {}).get("name")
        self._start_run(run_id, parent_run_id, name, metadata, tool=True)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_run(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_run(run_id)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_run(run_id)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_run(run_id)

    def _agent_for(self, path: tuple[str, ...]) -> AgentLedger:
        """The handler's agent, or its spawn (one per level) for the agent at ``path``."""
        if not path:
            return self.agent
        with self._lock:
            found = self._spawned.get(path)
        if found is not None:
            return found
        agent = self.agent
        for depth in range(1, len(path) + 1):
            key = path[:depth]
            with self._lock:
                known = self._spawned.get(key)
            if known is None:
                child_id = identifier(f"{self.agent.agent_id}.{'.'.join(key)}", "sub")
                known = agent.spawn(child_id)
                with self._lock:
                    known = self._spawned.setdefault(key, known)
            agent = known
        return agent

    # --- model calls ----------------------------------------------------------------------

    def _begin(
        self,
        serialized: Mapping[str, Any] | None,
        run_id: UUID,
        parent_run_id: UUID | None,
        metadata: Mapping[str, Any] | None,
        kwargs: Mapping[str, Any],
    ) -> None:
        metadata = metadata or {}
        params = kwargs.get("invocation_params") or {}
        model = identifier(
            metadata.get("ls_model_name")
            or params.get("model")
            or params.get("model_name")
            or (serialized or {}).get("name"),
            "unknown",
        )
        provider = identifier(metadata.get("ls_provider"), self.provider)
        limit = metadata.get("ls_max_tokens") or params.get("max_tokens")
        limit = limit or params.get("max_completion_tokens")
        with self._lock:
            run = self._runs.get(parent_run_id) if parent_run_id is not None else None
        agent = self._agent_for(_path(run, _namespace(metadata)))
        task_type = run.task_type if run is not None else None
        task_id = str(run.root) if run is not None and run.task_type is not None else None
        user_task = inherited_task(self.agent)
        if user_task is not None:  # the caller's own agent.task() wins
            task_type, task_id = user_task.task_type, user_task.task_id

        def make() -> CallRecorder:
            call = agent.call(
                provider=provider,
                model=model,
                task_type=task_type,
                max_tokens=limit if isinstance(limit, int) and limit >= 0 else None,
            )
            if task_id is not None:
                call.task_id = task_id
            return call

        call = admit(make, agent, self.pause)
        with self._lock:
            self._calls[run_id] = call

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[Any]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._begin(serialized, run_id, parent_run_id, metadata, kwargs)

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._begin(serialized, run_id, parent_run_id, metadata, kwargs)

    def _pop(self, run_id: UUID) -> CallRecorder | None:
        with self._lock:
            call = self._calls.pop(run_id, None)
            rerouted = run_id in self._rerouted
            self._rerouted.discard(run_id)
            if call is not None and call.model != call.requested_model and not rerouted:
                # The request went to the model LangChain built it for: record that one.
                log.warning(
                    "agentledger: a ROUTE to %s was not applied to a %s call: wrap the model "
                    "with handler.routable(model)",
                    call.model,
                    call.requested_model,
                )
                call.model = call.used_model = call.requested_model
                self.unrouted += 1
        return call

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        call = self._pop(run_id)
        if call is None:
            return
        try:
            _record_usage(call, response)
        finally:
            call.__exit__(None, None, None)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        call = self._pop(run_id)
        if call is not None:
            fail(call, error)

    def routed_model(self, run_id: UUID) -> str | None:
        """The model a running call was admitted with (after a ROUTE), for ``routable``,
        which sends the request there."""
        with self._lock:
            call = self._calls.get(run_id)
            if call is None:
                return None
            self._rerouted.add(run_id)
            return call.model

    def routable(self, model: Any) -> Any:
        """``model`` (a ``BaseChatModel``) wrapped so a standing ROUTE changes the model its
        requests are sent to; pass this handler in the run's callbacks as well."""
        from .langchain_route import RoutableChatModel

        return RoutableChatModel(inner=model)


def _usage_metadata(response: LLMResult) -> Mapping[str, Any] | None:
    for generations in response.generations:
        for generation in generations:
            message = getattr(generation, "message", None)
            usage = getattr(message, "usage_metadata", None)
            if isinstance(usage, Mapping):
                return usage
    return None


def _record_usage(call: CallRecorder, response: LLMResult) -> None:
    usage = _usage_metadata(response)
    if usage is not None:
        details = usage.get("input_token_details") or {}
        out_details = usage.get("output_token_details") or {}
        # LangChain's input_tokens is the whole prompt, cache reads and writes included.
        inp = token_count(usage.get("input_tokens"))
        out = token_count(usage.get("output_tokens"))
        cached = token_count(details.get("cache_read"))
        reasoning = token_count(out_details.get("reasoning"))
    else:
        raw = (response.llm_output or {}).get("token_usage")
        if not isinstance(raw, Mapping):
            # Recorded with 0 tokens; a ChatOpenAI stream reports usage only with
            # stream_usage=True (set by default only for OpenAI's own endpoint).
            log.warning(
                "agentledger: a %s call reported no usage; it is recorded with 0 tokens",
                call.requested_model,
            )
            return
        inp = token_count(raw.get("prompt_tokens"))
        out = token_count(raw.get("completion_tokens"))
        cached = token_count((raw.get("prompt_tokens_details") or {}).get("cached_tokens"))
        reasoning = token_count(
            (raw.get("completion_tokens_details") or {}).get("reasoning_tokens")
        )
    call.record(
        input_tokens=inp,
        output_tokens=out,
        cached_input_tokens=min(cached, inp),
        reasoning_tokens=min(reasoning, out),
    )
