"""An OpenAI Agents SDK model provider that records and enforces every model call of a run.

```python
from agents import Runner, RunConfig
from agentledger.producers.openai_agents import LedgerModelProvider
Runner.run(bot, "hi", run_config=RunConfig(model_provider=LedgerModelProvider(agent)))
```

The runner asks the provider for a model on every turn. Each model call (``get_response``
and ``stream_response``) starts inside ``agent.acall``: a STOP, a local refusal or a fail-closed
control plane raises ``BudgetExceeded`` out of ``Runner.run`` / ``run_sync`` / ``run_streamed``
before the request; a THROTTLE waits for a slot; a ROUTE asks the wrapped provider for the
routed model instead. Usage is read from the response (``ModelResponse.usage``, or the
``response.completed`` event of a stream). The SDK agent a call is made for is read from the
current turn or agent span (the SDK keeps them also with tracing disabled): the first
SDK agent the provider sees records as ``agent``; every other one (a handoff target, an agent
run as a tool) as a spawn of the agent whose turn it came from. Each trace (one per top-level
``Runner.run``) is a task. The SDK is imported only when this module is.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

from agents.models.interface import Model, ModelProvider
from agents.models.multi_provider import MultiProvider
from agents.tracing import get_current_span, get_current_trace
from agents.tracing.span_data import AgentSpanData, TurnSpanData

from .framework import Pause, admit_async, identifier, inherited_task
from .ledger import AgentLedger, CallRecorder
from .sdk_usage import fail, openai_responses_usage

__all__ = ["LedgerModelProvider"]

# The ledger agent of the SDK agent whose model call ran last in this context: a handoff
# continues in the same context, an agent run as a tool in a copy of it.
_ACTIVE: ContextVar[AgentLedger | None] = ContextVar("agentledger_sdk_agent", default=None)


class LedgerModelProvider(ModelProvider):
    """Wraps ``inner`` (default: the SDK's ``MultiProvider``) so every model it hands out is
    admitted and recorded by ``agent``."""

    def __init__(
        self,
        agent: AgentLedger,
        inner: ModelProvider | None = None,
        *,
        pause: Pause | None = None,
        provider: str = "openai",
    ) -> None:
        self.agent = agent
        self.inner = inner if inner is not None else MultiProvider()
        self.pause = pause
        self.provider = identifier(provider, "openai")
        self._lock = threading.Lock()
        self._root_name: str | None = None
        self._agents: dict[str, AgentLedger] = {}

    def get_model(self, model_name: str | None) -> Model:
        return _LedgerModel(self, model_name, self.inner.get_model(model_name))

    def agent_for(self, sdk_agent: str | None) -> AgentLedger:
        """The ledger agent recording the calls of the SDK agent named ``sdk_agent``."""
        with self._lock:
            if sdk_agent is None:
                return self.agent
            if self._root_name is None:
                self._root_name = sdk_agent
            if sdk_agent == self._root_name:
                return self.agent
            found = self._agents.get(sdk_agent)
            if found is None:
                parent = _ACTIVE.get()
                if parent is None or parent.ledger is not self.agent.ledger:
                    parent = self.agent  # another provider's agent is no parent of ours
                found = self._agents[sdk_agent] = parent.spawn(
                    identifier(f"{self.agent.agent_id}.{sdk_agent}", "sub")
                )
            return found


def _sdk_agent_name() -> str | None:
    # A model call runs inside the turn span of its agent, itself inside the agent span.
    data = getattr(get_current_span(), "span_data", None)
    if isinstance(data, TurnSpanData):
        return data.agent_name
    return data.name if isinstance(data, AgentSpanData) else None


def _task() -> tuple[str, str] | None:
    trace = get_current_trace()
    trace_id = getattr(trace, "trace_id", None)
    if not isinstance(trace_id, str) or not trace_id.startswith("trace_"):
        return None  # tracing disabled: no run identity to group the calls by
    return identifier(getattr(trace, "name", None), "agents"), identifier(trace_id, "trace")


class _LedgerModel(Model):
    def __init__(self, owner: LedgerModelProvider, name: str | None, inner: Model) -> None:
        self._owner = owner
        self._inner = inner
        served = getattr(inner, "model", None)
        self._name = identifier(name or (served if isinstance(served, str) else None), "unknown")

    async def _begin(self, model_settings: Any) -> tuple[CallRecorder, Model]:
        owner = self._owner
        agent = owner.agent_for(_sdk_agent_name())
        _ACTIVE.set(agent)
        limit = getattr(model_settings, "max_tokens", None)
        # The caller's own agent.task() (or its parent's) wins over the trace.
        user_task = inherited_task(agent)
        if user_task is not None:
            task: tuple[str, str] | None = (user_task.task_type, user_task.task_id)
        else:
            task = _task()

        def make() -> CallRecorder:
            call = agent.call(
                provider=owner.provider,
                model=self._name,
                task_type=task[0] if task is not None else None,
                max_tokens=limit if isinstance(limit, int) and limit >= 0 else None,
            )
            if task is not None:
                call.task_id = task[1]
            return call

        call = await admit_async(make, agent, owner.pause)
        if call.model == self._name:
            return call, self._inner
        try:
            return call, owner.inner.get_model(call.model)
        except BaseException as exc:
            fail(call, exc)
            raise

    async def get_response(self, *args: Any, **kwargs: Any) -> Any:
        settings = kwargs.get("model_settings", args[2] if len(args) > 2 else None)
        call, model = await self._begin(settings)
        try:
            response = await model.get_response(*args, **kwargs)
        except BaseException as exc:
            fail(call, exc)
            raise
        try:
            openai_responses_usage(call, getattr(response, "usage", None))
        finally:
            call.__exit__(None, None, None)
        return response

    async def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        settings = kwargs.get("model_settings", args[2] if len(args) > 2 else None)
        call, model = await self._begin(settings)
        try:
            async for event in model.stream_response(*args, **kwargs):
                if getattr(event, "type", None) == "response.completed":
                    response = getattr(event, "response", None)
                    openai_responses_usage(call, getattr(response, "usage", None))
                yield event
        except GeneratorExit:  # the runner stopped reading: what it read is recorded
            call.__exit__(None, None, None)
            raise
        except BaseException as exc:
            fail(call, exc)
            raise
        call.__exit__(None, None, None)

    async def close(self) -> None:
        await self._inner.close()

    def get_retry_advice(self, request: Any) -> Any:
        return self._inner.get_retry_advice(request)

    async def _cleanup_on_run_end(self, owner: object) -> None:
        await self._inner._cleanup_on_run_end(owner)
