"""The LiteLLM callback: fed LiteLLM's documented callback arguments directly, and (when the
``litellm`` package is installed) through ``litellm.completion`` / ``acompletion`` against the
loopback fake OpenAI API (never the internet): sync, async, streaming and failed calls."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from types import SimpleNamespace
from typing import Any

import pytest

from agentledger.producers.litellm_callback import LedgerCallback, litellm_callback
from agentledger.schemas import CallEvent, CallStatus
from tests.unit.test_producer_ledger import T0, Harness
from tests.unit.test_producer_sdk import MSGS, FakeApi

START = dt.datetime.fromtimestamp(T0 / 1000, tz=dt.UTC)
END = START + dt.timedelta(milliseconds=1234)


def payload(**extra: Any) -> dict[str, Any]:
    # The fields of litellm.types.utils.StandardLoggingPayload the callback reads.
    return {
        "id": "call-1",
        "model": "gpt-4o",
        "custom_llm_provider": "openai",
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "startTime": T0 / 1000,
        "endTime": T0 / 1000 + 1.234,
        "status": "success",
        "error_information": None,
    } | extra


def usage(cached: int, reasoning: int) -> SimpleNamespace:
    return SimpleNamespace(
        prompt_tokens=1200,
        completion_tokens=300,
        prompt_tokens_details=SimpleNamespace(cached_tokens=cached),
        completion_tokens_details=SimpleNamespace(reasoning_tokens=reasoning),
    )


def test_success_records_usage_times_and_details(h: Harness) -> None:
    callback = LedgerCallback(h.ledger.agent("a", pool="p"))
    kwargs = {"litellm_call_id": "call-1", "standard_logging_object": payload()}
    callback.log_success_event(kwargs, SimpleNamespace(usage=usage(1000, 100)), START, END)
    (event,) = h.events()
    assert (event.provider, event.requested_model, event.used_model) == ("openai",) + (
        "gpt-4o",
    ) * 2
    assert (event.input_tokens, event.cached_input_tokens) == (1200, 1000)
    assert (event.output_tokens, event.reasoning_tokens) == (300, 100)
    assert (event.event_time_ms, event.latency_ms) == (T0, 1234)
    assert (event.pool, event.status, event.priced) == ("p", CallStatus.OK, True)
    assert event.cost_nano_usd > 0


def test_sync_and_async_hooks_of_one_call_record_it_once(h: Harness) -> None:
    # LiteLLM reports a non-streaming acompletion to both log_success_event and
    # async_log_success_event.
    callback = LedgerCallback(h.ledger.agent("a"))
    kwargs = {"litellm_call_id": "call-1", "standard_logging_object": payload()}
    callback.log_success_event(kwargs, None, START, END)
    asyncio.run(callback.async_log_success_event(kwargs, None, START, END))
    other = {"litellm_call_id": "call-2", "standard_logging_object": payload(id="call-2")}
    asyncio.run(callback.async_log_success_event(other, None, START, END))
    assert [e.input_tokens for e in h.events()] == [1200, 1200]


class RateLimitError(Exception):
    status_code = 429


def test_failure_records_status_and_error_type(h: Harness) -> None:
    callback = LedgerCallback(h.ledger.agent("a"))
    info = {"error_code": "500", "error_class": "InternalServerError"}
    failed = payload(prompt_tokens=0, completion_tokens=0, status="failure")
    callback.log_failure_event(
        {
            "litellm_call_id": "c1",
            "exception": RateLimitError("slow down"),
            "standard_logging_object": failed,
        },
        None,
        START,
        END,
    )
    # Without the exception object, the payload's error information decides.
    callback.log_failure_event(
        {"litellm_call_id": "c2", "standard_logging_object": failed | {"error_information": info}},
        None,
        START,
        END,
    )
    first, second = h.events()
    assert (first.status, first.error_type) == (CallStatus.RATE_LIMITED, "RateLimitError")
    assert (second.status, second.error_type) == (CallStatus.ERROR, "InternalServerError")
    assert first.cost_nano_usd == second.cost_nano_usd == 0


def test_odd_names_are_recorded_not_dropped(h: Harness) -> None:
    callback = LedgerCallback(h.ledger.agent("a"))
    odd = payload(model="my model (v2)", custom_llm_provider=None)
    with pytest.warns(Warning, match="no price known"):
        callback.log_success_event({"standard_logging_object": odd}, None, START, END)
    (event,) = h.events()
    assert (event.provider, event.used_model, event.priced) == ("unknown", "my_model__v2_", False)


def test_the_current_task_is_recorded(h: Harness) -> None:
    agent = h.ledger.agent("a")
    with agent.task("summarize", task_id="t-1"):
        LedgerCallback(agent).log_success_event(
            {"standard_logging_object": payload()}, None, START, END
        )
    (event,) = h.events()
    assert (event.task_type, event.task_id) == ("summarize", "t-1")


def test_a_stop_does_not_lose_a_finished_call(h: Harness) -> None:
    h.publish("agent:a")
    LedgerCallback(h.ledger.agent("a")).log_success_event(
        {"standard_logging_object": payload()}, None, START, END
    )
    assert len(h.events()) == 1


# ---- through the real package ----------------------------------------------------------------

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the price map


def _litellm() -> Any:
    return pytest.importorskip("litellm")


def wait_events(h: Harness, n: int) -> list[CallEvent]:
    # LiteLLM runs a sync call's success hook on a worker thread.
    deadline = time.monotonic() + 10
    while len(h.transport.messages) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return h.events()


# LiteLLM's own code trips pydantic warnings (ReadOnly TypedDict items, deprecated instance
# attributes), which warnings-as-errors would turn into failed requests; not ours to fix.
third_party_warnings = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning"
)


@pytest.fixture
def llm(h: Harness) -> Any:
    litellm = _litellm()
    callback = litellm_callback(h.ledger.agent("a", pool="p"))
    litellm.callbacks.append(callback)
    yield litellm
    # LiteLLM copies callbacks into its own lists on the first call.
    for name in ("callbacks", "success_callback", "failure_callback"):
        for hooks in (getattr(litellm, name), getattr(litellm, f"_async_{name}", [])):
            while callback in hooks:
                hooks.remove(callback)


@third_party_warnings
def test_litellm_completion_sync_and_streaming(llm: Any, api: FakeApi, h: Harness) -> None:
    h.clock.now = int(time.time() * 1000)
    common = {"api_base": f"{api.url}/v1", "api_key": "test", "messages": MSGS}
    response = llm.completion(model="openai/gpt-4o", **common)
    assert response.choices[0].message.content == "hello"
    (event,) = wait_events(h, 1)
    assert (event.provider, event.used_model) == ("openai", "gpt-4o")
    assert (event.input_tokens, event.cached_input_tokens) == (1200, 1000)
    assert (event.output_tokens, event.reasoning_tokens) == (300, 100)
    stream = llm.completion(
        model="openai/gpt-4o", stream=True, stream_options={"include_usage": True}, **common
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "hello"
    _, streamed = wait_events(h, 2)
    assert (streamed.input_tokens, streamed.output_tokens) == (1200, 300)


@third_party_warnings
def test_litellm_acompletion_and_failure(llm: Any, api: FakeApi, h: Harness) -> None:
    common = {"api_base": f"{api.url}/v1", "api_key": "test", "messages": MSGS}

    async def settled(n: int) -> None:
        # LiteLLM hands async hooks to a logging worker on the running loop.
        deadline = time.monotonic() + 10
        while len(h.transport.messages) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def main() -> None:
        await llm.acompletion(model="openai/gpt-4o-mini", **common)
        await settled(1)
        api.fail_with = 429
        with pytest.raises(llm.RateLimitError):
            await llm.acompletion(model="openai/gpt-4o-mini", num_retries=0, **common)
        await settled(2)
        await asyncio.sleep(0.2)  # a second hook for the same call would land by now

    asyncio.run(main())
    ok, failed = h.events()
    assert (ok.used_model, ok.status, ok.input_tokens) == ("gpt-4o-mini", CallStatus.OK, 1200)
    assert (failed.status, failed.error_type) == (CallStatus.RATE_LIMITED, "RateLimitError")
