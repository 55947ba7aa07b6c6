"""A pydantic-ai model wrapper that records and enforces every request of an agent.

```python
from pydantic_ai import Agent
from agentledger.producers.pydantic_ai import LedgerModel
bot = Agent(LedgerModel(OpenAIChatModel("gpt-4o", provider=...), agent))
```

Each model request (``request`` and ``request_stream``) starts inside ``agent.acall``: a STOP,
a local refusal or a fail-closed control plane raises ``BudgetExceeded`` out of ``run``,
``run_sync`` and ``run_stream`` before the request is sent; a THROTTLE waits for a slot; a ROUTE
sends the request through a copy of the wrapped model set to the routed model (models that
keep their name in ``_model_name``, as pydantic-ai's own do; others are sent unrouted and the
event says so). Usage comes from the response's ``RequestUsage``. pydantic-ai's own
``UsageLimits`` are untouched: they stay the caller's per-run limits, ours are the fleet's
budgets. A delegate (an agent run from another agent's tool with ``usage=ctx.usage``, as
pydantic-ai's agent delegation does) whose model is wrapped for the same ledger agent is recorded
as a spawn of the agent it works for, ``<agent>.<delegate name>``; its calls carry the task its
parent runs in. pydantic-ai is imported only when this module is.
"""

from __future__ import annotations

import copy
import itertools
import threading
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic_ai import _run_context
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models import KnownModelName, Model, ModelRequestParameters, StreamedResponse
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.settings import ModelSettings

from .framework import Pause, admit_async, identifier, inherited_task
from .ledger import AgentLedger, CallRecorder
from .sdk_usage import fail, token_count

__all__ = ["LedgerModel"]


@dataclass(slots=True)
class _Run:
    configured: AgentLedger
    """the agent the run's ``LedgerModel`` was given"""
    recorded: AgentLedger
    """the agent its calls are recorded by: ``configured``, or a spawn for a delegate"""
    order: int
    in_tools: bool = False
    """its last response asked for tools, so a run starting now may be its delegate"""


@dataclass(slots=True)
class _Family:
    """The runs sharing one ``RunUsage``: a run and the delegates it handed its usage to."""

    runs: dict[str, _Run] = field(default_factory=dict)


_FAMILIES: dict[int, _Family] = {}
_FAMILIES_LOCK = threading.Lock()
_ORDER = itertools.count()


def _family(usage: object) -> _Family:
    """The family of ``usage``, kept while the usage object lives."""
    key = id(usage)
    with _FAMILIES_LOCK:
        found = _FAMILIES.get(key)
        if found is None:
            found = _FAMILIES[key] = _Family()
            weakref.finalize(usage, _forget, key, found)
        return found


def _forget(key: int, family: _Family) -> None:
    with _FAMILIES_LOCK:
        if _FAMILIES.get(key) is family:
            del _FAMILIES[key]


def _current_context() -> Any:
    """pydantic-ai's current ``RunContext`` (set around each model request). Its accessor is
    private: without it, delegates are recorded by their own model's agent, nothing fails."""
    getter = getattr(_run_context, "get_current_run_context", None)
    return getter() if callable(getter) else None


class LedgerModel(WrapperModel):
    """``wrapped`` with every request admitted and recorded by ``agent``."""

    def __init__(
        self,
        wrapped: Model | KnownModelName,
        agent: AgentLedger,
        *,
        pause: Pause | None = None,
        provider: str | None = None,
    ) -> None:
        super().__init__(wrapped)
        self.agent = agent
        self.pause = pause
        self._provider_name = provider
        self._copies: dict[str, Model] = {}
        self._spawns: dict[tuple[str, str], AgentLedger] = {}

    def _run(self) -> _Run | None:
        """The pydantic-ai run this request belongs to, registered on its first request: a run
        that shares the usage of a run in its tool phase is that run's delegate."""
        context = _current_context()
        run_id = getattr(context, "run_id", None)
        if context is None or not isinstance(run_id, str):
            return None
        family = _family(context.usage)
        with _FAMILIES_LOCK:
            found = family.runs.get(run_id)
            if found is not None:
                return found
            waiting = [r for r in family.runs.values() if r.in_tools]
            parent = max(waiting, key=lambda r: r.order) if waiting else None
            recorded = self.agent
            if parent is not None and parent.configured is self.agent:
                # Bound to another agent (say an explicit spawn): the caller's choice stands.
                name = identifier(getattr(context.agent, "name", None), "delegate")
                key = (parent.recorded.agent_id, name)
                spawned = self._spawns.get(key)
                if spawned is None:
                    child_id = identifier(f"{key[0]}.{name}", "delegate")
                    spawned = self._spawns[key] = parent.recorded.spawn(child_id)
                recorded = spawned
            found = family.runs[run_id] = _Run(self.agent, recorded, next(_ORDER))
            return found

    def _begin(self, model_settings: ModelSettings | None, run: _Run | None) -> Any:
        merged: dict[str, Any] = {**(self.wrapped.settings or {}), **(model_settings or {})}
        limit = merged.get("max_tokens")
        agent = run.recorded if run is not None else self.agent
        provider = identifier(self._provider_name or self.wrapped.system, "unknown")
        model = identifier(self.wrapped.model_name, "unknown")

        task = inherited_task(agent)

        def make() -> CallRecorder:
            call = agent.call(
                provider=provider,
                model=model,
                task_type=task.task_type if task is not None else None,
                max_tokens=limit if isinstance(limit, int) and limit >= 0 else None,
            )
            if task is not None:
                call.task_id = task.task_id
            return call

        return admit_async(make, agent, self.pause)

    def _target(self, call: CallRecorder) -> Model:
        if call.model == call.requested_model:
            return self.wrapped
        found = self._copies.get(call.model)
        if found is None:
            if not isinstance(getattr(self.wrapped, "_model_name", None), str):
                # Nothing to swap: the event records the model actually asked for.
                call.model = call.used_model = call.requested_model
                return self.wrapped
            # A shallow copy shares the wrapped model's client and provider.
            found = copy.copy(self.wrapped)
            found._model_name = call.model  # type: ignore[attr-defined]
            self._copies[call.model] = found
        return found

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        run = self._run()
        call = await self._begin(model_settings, run)
        try:
            response = await self._target(call).request(
                messages, model_settings, model_request_parameters
            )
        except BaseException as exc:
            fail(call, exc)
            raise
        try:
            _record(call, response.usage)
        finally:
            call.__exit__(None, None, None)
        _answered(run, response)
        return response

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: Any = None,
    ) -> AsyncIterator[StreamedResponse]:
        run = self._run()
        call = await self._begin(model_settings, run)
        stream: StreamedResponse | None = None
        try:
            async with self._target(call).request_stream(
                messages, model_settings, model_request_parameters, run_context
            ) as stream:
                yield stream
        except BaseException as exc:
            if stream is not None:  # the tokens streamed so far are billed
                _record(call, stream.usage)
            fail(call, exc)
            raise
        try:
            _record(call, stream.usage)
        finally:
            call.__exit__(None, None, None)
        _answered(run, stream.get())


def _answered(run: _Run | None, response: ModelResponse) -> None:
    if run is not None:
        with _FAMILIES_LOCK:
            run.in_tools = any(isinstance(part, ToolCallPart) for part in response.parts)


def _record(call: CallRecorder, usage: Any) -> None:
    # pydantic-ai's input_tokens is the whole prompt, cache reads and writes included.
    inp = token_count(getattr(usage, "input_tokens", 0))
    out = token_count(getattr(usage, "output_tokens", 0))
    cached = token_count(getattr(usage, "cache_read_tokens", 0))
    details = getattr(usage, "details", None) or {}
    reasoning = token_count(details.get("reasoning_tokens")) if isinstance(details, dict) else 0
    call.record(
        input_tokens=inp,
        output_tokens=out,
        cached_input_tokens=min(cached, inp),
        reasoning_tokens=min(reasoning, out),
    )
