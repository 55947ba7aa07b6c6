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
budgets. A sub-agent (delegation from a tool) is recorded as a spawn by wrapping its model with
``lead.spawn(...)``; its calls carry the task its parent runs in. pydantic-ai is imported only
when this module is.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models import KnownModelName, Model, ModelRequestParameters, StreamedResponse
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.settings import ModelSettings

from .framework import Pause, admit_async, identifier, inherited_task
from .ledger import AgentLedger, CallRecorder
from .sdk_usage import fail, token_count

__all__ = ["LedgerModel"]


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

    def _begin(self, model_settings: ModelSettings | None) -> Any:
        merged: dict[str, Any] = {**(self.wrapped.settings or {}), **(model_settings or {})}
        limit = merged.get("max_tokens")
        agent = self.agent
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
        call = await self._begin(model_settings)
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
        return response

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: Any = None,
    ) -> AsyncIterator[StreamedResponse]:
        call = await self._begin(model_settings)
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
