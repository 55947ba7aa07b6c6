"""P9: the shim's overhead per model call through each framework integration.

For each framework, the median time of one model call through the framework's own entry point
with the integration, minus the median without it, over the same in-process fake model (no
HTTP: the fake answers at once, with usage), so the difference is what the integration adds:
the handler or wrapper, ``agent.call`` admission, usage extraction, pricing and the event. The
shim sends to an in-memory transport (P4 measures the Kafka send: about 2 us more).

- LangChain: ``chat_model.invoke(...)`` with and without ``LedgerCallbackHandler`` in its
  callbacks; LangChain's own dispatch of one handler is part of that, so a no-op handler is
  measured too.
- OpenAI Agents SDK: ``model.get_response(...)`` of a model from ``LedgerModelProvider``
  (the span lookup included) against the wrapped model's; a whole ``Runner.run`` turn costs
  milliseconds of SDK work that would hide a difference of microseconds.
- pydantic-ai: ``LedgerModel(...).request(...)`` against the wrapped model's.

``.venv/bin/python -m bench.framework_overhead [iterations]``
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.producers import AgentLedger, Ledger
from agentledger.producers.transport import InMemoryTransport
from bench.shim_overhead import WARMUP, _median_ns


def _median_us(step: Callable[[], object], iterations: int) -> float:
    return _median_ns(step, iterations) / 1000


def _amedian_us(step: Callable[[], Awaitable[object]], iterations: int) -> float:
    async def main() -> float:
        for _ in range(WARMUP):
            await step()
        samples = []
        for _ in range(iterations):
            start = time.perf_counter_ns()
            await step()
            samples.append(time.perf_counter_ns() - start)
        return statistics.median(samples) / 1000

    return asyncio.run(main())


def _pair(bare: float, wrapped: float) -> dict[str, float]:
    # Rounded to 0.1 us: a median of thousands of samples on a shared machine says no more.
    return {
        "bare_us": round(bare, 1),
        "with_agentledger_us": round(wrapped, 1),
        "overhead_us": round(wrapped - bare, 1),
    }


def langchain(agent: AgentLedger, iterations: int) -> dict[str, float]:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, BaseMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    from agentledger.producers.langchain import LedgerCallbackHandler

    class Instant(BaseChatModel):
        """Answers at once, with usage, as ChatOpenAI would for gpt-4o-mini."""

        @property
        def _llm_type(self) -> str:
            return "instant"

        def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
            return {"ls_provider": "openai", "ls_model_name": "gpt-4o-mini"}

        def _generate(
            self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **_: Any
        ) -> ChatResult:
            usage = {"input_tokens": 1200, "output_tokens": 300, "total_tokens": 1500}
            message = AIMessage(content="ok", usage_metadata=usage)
            return ChatResult(generations=[ChatGeneration(message=message)])

    class Nothing(BaseCallbackHandler):
        """A handler that does nothing: what LangChain's dispatch of one handler costs."""

    model = Instant()
    handler = LedgerCallbackHandler(agent)
    bare = _median_us(lambda: model.invoke("hi"), iterations)
    nothing = _median_us(lambda: model.invoke("hi", config={"callbacks": [Nothing()]}), iterations)
    wrapped = _median_us(lambda: model.invoke("hi", config={"callbacks": [handler]}), iterations)
    return _pair(bare, wrapped) | {
        "with_a_no_op_handler_us": round(nothing, 1),
        "overhead_beyond_a_no_op_handler_us": round(wrapped - nothing, 1),
    }


def openai_agents(agent: AgentLedger, iterations: int) -> dict[str, float]:
    from agents import ModelResponse, ModelSettings, Usage
    from agents.models.interface import Model, ModelProvider

    from agentledger.producers.openai_agents import LedgerModelProvider

    response = ModelResponse(
        output=[],
        usage=Usage(requests=1, input_tokens=1200, output_tokens=300, total_tokens=1500),
        response_id=None,
    )

    class Instant(Model):
        async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
            return response

        def stream_response(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

    class Provider(ModelProvider):
        def get_model(self, model_name: str | None) -> Model:
            return Instant()

    kwargs: dict[str, Any] = {
        "system_instructions": None,
        "input": "hi",
        "model_settings": ModelSettings(),
        "tools": [],
        "output_schema": None,
        "handoffs": [],
        "tracing": None,
        "previous_response_id": None,
        "conversation_id": None,
        "prompt": None,
    }
    bare_model = Instant()
    wrapped_model = LedgerModelProvider(agent, Provider()).get_model("gpt-4o-mini")
    bare = _amedian_us(lambda: bare_model.get_response(**kwargs), iterations)
    wrapped = _amedian_us(lambda: wrapped_model.get_response(**kwargs), iterations)
    return _pair(bare, wrapped)


def pydantic_ai(agent: AgentLedger, iterations: int) -> dict[str, float]:
    from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart
    from pydantic_ai.models import Model, ModelRequestParameters
    from pydantic_ai.usage import RequestUsage

    from agentledger.producers.pydantic_ai import LedgerModel

    answer = ModelResponse(
        parts=[TextPart("ok")],
        usage=RequestUsage(input_tokens=1200, output_tokens=300),
        model_name="gpt-4o-mini",
    )

    class Instant(Model):
        async def request(self, *args: Any, **kwargs: Any) -> ModelResponse:
            return answer

        @property
        def model_name(self) -> str:
            return "gpt-4o-mini"

        @property
        def system(self) -> str:
            return "openai"

    messages: list[Any] = [ModelRequest.user_text_prompt("hi")]
    params = ModelRequestParameters()
    bare_model = Instant()
    wrapped_model = LedgerModel(Instant(), agent)
    bare = _amedian_us(lambda: bare_model.request(messages, None, params), iterations)
    wrapped = _amedian_us(lambda: wrapped_model.request(messages, None, params), iterations)
    return _pair(bare, wrapped)


def measure(home: str, iterations: int = 5_000) -> dict[str, Any]:
    settings = Settings(
        home=home,  # type: ignore[arg-type]
        topic_prefix="bench.",
        control_key=SecretStr("bench-control-key-0123456789"),
    )
    result: dict[str, Any] = {
        "iterations": iterations,
        "load_average_1m": round(os.getloadavg()[0], 1),
    }
    for name, run in (
        ("langchain", langchain),
        ("openai_agents", openai_agents),
        ("pydantic_ai", pydantic_ai),
    ):
        transport = InMemoryTransport()
        ledger = Ledger(settings, transport=transport, start_control_listener=False)
        try:
            result[name] = run(ledger.agent(f"bench-{name}", pool="bench"), iterations)
            # Every wrapped call was recorded (warm-up included), nothing else.
            assert len(transport.messages) == WARMUP + iterations, name
        finally:
            ledger.close()
    return result


def main() -> int:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 5_000
    with tempfile.TemporaryDirectory(prefix="agentledger-p8-") as tmp:
        result = measure(str(Path(tmp) / "home"), iterations)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
