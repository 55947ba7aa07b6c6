"""The OpenAI and Anthropic wrappers, through the real SDK packages, against a loopback fake
of each HTTP API (never the internet): sync, async and streaming."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agentledger.producers import BudgetExceeded
from agentledger.producers.sdk import instrument_anthropic, instrument_openai
from agentledger.schemas import CallStatus, ControlAction
from tests.unit.test_producer_ledger import Harness

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

OPENAI_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1000},
    "completion_tokens_details": {"reasoning_tokens": 100},
}


def openai_completion(model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "finish_reason": "stop",
            }
        ],
        "usage": OPENAI_USAGE,
    }


def openai_tool_completion(model: str, tool: str, n: int, args: str = "{}") -> dict[str, Any]:
    """A chat completion asking for a call of ``tool`` with ``args`` (JSON)."""
    call = {"id": f"call_{n}", "type": "function", "function": {"name": tool, "arguments": args}}
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": None, "tool_calls": [call]},
        "finish_reason": "tool_calls",
    }
    return openai_completion(model) | {"choices": [choice]}


def openai_tool_response(model: str, tool: str, n: int, args: str = "{}") -> dict[str, Any]:
    """A Responses API response asking for a call of ``tool`` with ``args`` (JSON)."""
    item = {
        "type": "function_call",
        "id": f"fc_{n}",
        "call_id": f"call_{n}",
        "name": tool,
        "arguments": args,
        "status": "completed",
    }
    return openai_response(model) | {"output": [item]}


def openai_chunks(model: str, with_usage: bool) -> list[dict[str, Any]]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
        for w in ("hel", "lo")
    ]
    if with_usage:
        chunks.append({**base, "choices": [], "usage": OPENAI_USAGE})
    return chunks


ANTHROPIC_USAGE = {
    "input_tokens": 200,
    "cache_read_input_tokens": 1000,
    "cache_creation_input_tokens": 0,
    "output_tokens": 40,
}


def anthropic_message(model: str) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "hello"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": ANTHROPIC_USAGE,
    }


RESPONSES_USAGE = {
    "input_tokens": 1200,
    "input_tokens_details": {"cached_tokens": 1000},
    "output_tokens": 300,
    "output_tokens_details": {"reasoning_tokens": 100},
    "total_tokens": 1500,
}


def openai_response(model: str, status: str = "completed") -> dict[str, Any]:
    done = status != "in_progress"
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": status,
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "hello", "annotations": []}],
            }
        ]
        if done
        else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "error": {"code": "server_error", "message": "boom"} if status == "failed" else None,
        "usage": RESPONSES_USAGE if done else None,
    }


def openai_response_events(model: str, end: str) -> list[tuple[str, dict[str, Any]]]:
    delta = {"item_id": "msg_1", "output_index": 0, "content_index": 0, "logprobs": []}
    return [
        (
            "response.created",
            {
                "type": "response.created",
                "sequence_number": 0,
                "response": openai_response(model, "in_progress"),
            },
        ),
        *[
            (
                "response.output_text.delta",
                {"type": "response.output_text.delta", "sequence_number": i, "delta": w, **delta},
            )
            for i, w in ((1, "hel"), (2, "lo"))
        ],
        (
            f"response.{end}",
            {
                "type": f"response.{end}",
                "sequence_number": 3,
                "response": openai_response(model, end),
            },
        ),
    ]


TEXT_BLOCK = {"type": "text", "text": ""}
TEXT_DELTA = {"type": "text_delta", "text": "hello"}
RATE_LIMITED = {"error": {"type": "rate_limit_error", "message": "slow down"}}


def anthropic_events(model: str) -> list[tuple[str, dict[str, Any]]]:
    start = anthropic_message(model) | {
        "content": [],
        "stop_reason": None,
        "usage": {**ANTHROPIC_USAGE, "output_tokens": 1},
    }
    return [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "hello"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 40},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


class FakeApi:
    """Answers /v1/chat/completions and /v1/messages like the providers do."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_with: int | None = None
        self.response_end = "completed"
        # Framework tests: tool names to answer (non-streaming) requests with a call of, in
        # turn ("" for a text answer); then ``loop_tool`` for every request, if set; then text.
        self.tool_calls: list[str] = []
        self.loop_tool: str | None = None
        self.tool_args: dict[str, str] = {}  # a tool's JSON arguments, "{}" when not given
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append(body)
                if api.fail_with is not None:
                    kind = "rate_limit_error" if api.fail_with == 429 else "api_error"
                    self._json(api.fail_with, {"error": {"type": kind, "message": "failed"}})
                    return
                model = body.get("model", "gpt-4o-mini")  # a stored prompt names it
                tool = None if body.get("stream") else api.next_tool() or None
                args = api.tool_args.get(tool or "", "{}")
                n = len(api.requests)
                if tool is not None and self.path.endswith("/chat/completions"):
                    self._json(200, openai_tool_completion(model, tool, n, args))
                elif tool is not None and self.path.endswith("/responses"):
                    self._json(200, openai_tool_response(model, tool, n, args))
                elif self.path.endswith("/chat/completions"):
                    if body.get("stream"):
                        include = (body.get("stream_options") or {}).get("include_usage")
                        lines = [
                            f"data: {json.dumps(c)}\n\n"
                            for c in openai_chunks(model, bool(include))
                        ]
                        self._sse([*lines, "data: [DONE]\n\n"])
                    else:
                        self._json(200, openai_completion(model))
                elif self.path.endswith("/responses"):
                    if body.get("stream"):
                        events = openai_response_events(model, api.response_end)
                        self._sse([f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events])
                    else:
                        self._json(200, openai_response(model, api.response_end))
                elif self.path.endswith("/messages"):
                    if body.get("stream"):
                        self._sse(
                            [
                                f"event: {e}\ndata: {json.dumps(d)}\n\n"
                                for e, d in anthropic_events(model)
                            ]
                        )
                    else:
                        self._json(200, anthropic_message(model))
                else:
                    self._json(404, {"error": {"message": "no such path"}})

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _sse(self, parts: list[str]) -> None:
                data = "".join(parts).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def next_tool(self) -> str | None:
        with self._lock:
            if self.tool_calls:
                return self.tool_calls.pop(0)
            return self.loop_tool

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def oa(api: FakeApi, h: Harness, cls: Any = None) -> Any:
    client = (cls or openai.OpenAI)(api_key="test", base_url=f"{api.url}/v1", max_retries=0)
    return instrument_openai(client, h.ledger.agent("a", pool="p"))


def an(api: FakeApi, h: Harness, cls: Any = None) -> Any:
    client = (cls or anthropic.Anthropic)(api_key="test", base_url=api.url, max_retries=0)
    return instrument_anthropic(client, h.ledger.agent("a", pool="p"))


MSGS = [{"role": "user", "content": "hi"}]


def assert_openai_event(h: Harness, model: str = "gpt-4o-mini") -> None:
    (event,) = h.events()
    assert (event.provider, event.requested_model, event.used_model) == ("openai", "gpt-4o", model)
    assert (event.input_tokens, event.output_tokens) == (1200, 300)
    assert (event.cached_input_tokens, event.reasoning_tokens) == (1000, 100)
    assert event.priced and event.cost_nano_usd > 0


def test_openai_sync_records_usage_and_applies_route(api: FakeApi, h: Harness) -> None:
    h.publish("pool:p", ControlAction.ROUTE, params={"from": "gpt-4o", "to": "gpt-4o-mini"})
    response = oa(api, h).chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=500)
    assert response.choices[0].message.content == "hello"
    assert api.requests[0]["model"] == "gpt-4o-mini"  # the routed model was sent
    assert_openai_event(h)


def test_openai_streaming_asks_for_usage_and_records_the_final_chunk(
    api: FakeApi, h: Harness
) -> None:
    h.publish("pool:p", ControlAction.ROUTE, params={"from": "gpt-4o", "to": "gpt-4o-mini"})
    stream = oa(api, h).chat.completions.create(model="gpt-4o", messages=MSGS, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "hello"
    assert api.requests[0]["stream_options"] == {"include_usage": True}
    assert_openai_event(h)


def test_openai_async_and_async_streaming(api: FakeApi, h: Harness) -> None:
    h.publish("pool:p", ControlAction.ROUTE, params={"from": "gpt-4o", "to": "gpt-4o-mini"})

    async def main() -> str:
        client = oa(api, h, openai.AsyncOpenAI)
        await client.chat.completions.create(model="gpt-4o", messages=MSGS)
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MSGS, stream=True, stream_options={"include_usage": False}
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await client.close()
        return "".join(parts)

    assert asyncio.run(main()) == "hello"
    # The caller's explicit include_usage=False is respected: that call records no tokens.
    assert api.requests[1]["stream_options"] == {"include_usage": False}
    first, second = h.events()
    assert (first.input_tokens, first.output_tokens, first.used_model) == (1200, 300, "gpt-4o-mini")
    assert (second.input_tokens, second.output_tokens) == (0, 0)


def test_openai_failure_is_recorded_with_status_and_error_type(api: FakeApi, h: Harness) -> None:
    api.fail_with = 429
    with pytest.raises(openai.RateLimitError):
        oa(api, h).chat.completions.create(model="gpt-4o", messages=MSGS)
    (event,) = h.events()
    assert event.status is CallStatus.RATE_LIMITED
    assert event.error_type == "RateLimitError"


def test_stop_refuses_before_any_request(api: FakeApi, h: Harness) -> None:
    h.publish("pool:p")
    with pytest.raises(BudgetExceeded):
        oa(api, h).chat.completions.create(model="gpt-4o", messages=MSGS)
    with pytest.raises(BudgetExceeded):
        an(api, h).messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSGS)
    assert api.requests == []
    assert h.events() == []


def assert_anthropic_event(h: Harness) -> None:
    (event,) = h.events()
    assert (event.provider, event.used_model) == ("anthropic", "claude-haiku-4-5")
    assert (event.input_tokens, event.cached_input_tokens, event.output_tokens) == (1200, 1000, 40)
    assert event.priced and event.cost_nano_usd > 0


def test_anthropic_sync(api: FakeApi, h: Harness) -> None:
    message = an(api, h).messages.create(model="claude-haiku-4-5", max_tokens=100, messages=MSGS)
    assert message.content[0].text == "hello"
    assert_anthropic_event(h)


def test_anthropic_streaming(api: FakeApi, h: Harness) -> None:
    stream = an(api, h).messages.create(
        model="claude-haiku-4-5", max_tokens=100, messages=MSGS, stream=True
    )
    kinds = [event.type for event in stream]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert_anthropic_event(h)


def test_anthropic_async_and_async_streaming(api: FakeApi, h: Harness) -> None:
    async def main() -> None:
        client = an(api, h, anthropic.AsyncAnthropic)
        await client.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=MSGS)
        stream = await client.messages.create(
            model="claude-haiku-4-5", max_tokens=100, messages=MSGS, stream=True
        )
        async for _event in stream:
            pass
        await client.close()

    asyncio.run(main())
    events = h.events()
    assert len(events) == 2
    for event in events:
        assert (event.input_tokens, event.cached_input_tokens, event.output_tokens) == (
            1200,
            1000,
            40,
        )


def test_openai_responses_sync_records_cached_and_reasoning_tokens(
    api: FakeApi, h: Harness
) -> None:
    h.publish("pool:p", ControlAction.ROUTE, params={"from": "gpt-4o", "to": "gpt-4o-mini"})
    response = oa(api, h).responses.create(model="gpt-4o", input="hi", max_output_tokens=500)
    assert response.output_text == "hello"
    assert api.requests[0]["model"] == "gpt-4o-mini"
    assert_openai_event(h)


def test_openai_responses_streaming_records_the_completed_event(api: FakeApi, h: Harness) -> None:
    h.publish("pool:p", ControlAction.ROUTE, params={"from": "gpt-4o", "to": "gpt-4o-mini"})
    stream = oa(api, h).responses.create(model="gpt-4o", input="hi", stream=True)
    kinds = []
    text = ""
    for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            assert h.events() == []  # the call ends with the stream, not before
            text += event.delta
    assert text == "hello"
    assert kinds[-1] == "response.completed"
    assert "stream_options" not in api.requests[0]
    assert_openai_event(h)


def test_openai_responses_async_and_async_streaming(api: FakeApi, h: Harness) -> None:
    async def main() -> None:
        client = oa(api, h, openai.AsyncOpenAI)
        response = await client.responses.create(model="gpt-4o", input="hi")
        assert response.output_text == "hello"
        stream = await client.responses.create(model="gpt-4o", input="hi", stream=True)
        async for _event in stream:
            pass
        await client.close()

    asyncio.run(main())
    events = h.events()
    assert len(events) == 2
    for event in events:
        assert (event.input_tokens, event.cached_input_tokens) == (1200, 1000)
        assert (event.output_tokens, event.reasoning_tokens) == (300, 100)
        assert event.status is CallStatus.OK


def test_openai_responses_failed_run_is_a_billed_error(api: FakeApi, h: Harness) -> None:
    api.response_end = "failed"
    for _event in oa(api, h).responses.create(model="gpt-4o", input="hi", stream=True):
        pass
    (event,) = h.events()
    assert (event.status, event.error_type) == (CallStatus.ERROR, "server_error")
    assert event.output_tokens == 300 and event.cost_nano_usd > 0


@pytest.mark.parametrize(
    ("status", "expected", "error_type"),
    [
        (429, CallStatus.RATE_LIMITED, "RateLimitError"),
        (500, CallStatus.ERROR, "InternalServerError"),
    ],
)
def test_openai_responses_http_failure_is_recorded(
    api: FakeApi, h: Harness, status: int, expected: CallStatus, error_type: str
) -> None:
    api.fail_with = status
    with pytest.raises(openai.APIStatusError):
        oa(api, h).responses.create(model="gpt-4o", input="hi", stream=True)
    (event,) = h.events()
    assert (event.status, event.error_type, event.output_tokens) == (expected, error_type, 0)


def test_anthropic_messages_stream_helper(api: FakeApi, h: Harness) -> None:
    h.publish(
        "pool:p",
        ControlAction.ROUTE,
        params={"from": "claude-sonnet-4-5", "to": "claude-haiku-4-5"},
    )
    client = an(api, h)
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=100, messages=MSGS) as stream:
        assert "".join(stream.text_stream) == "hello"
        assert h.events() == []
    assert api.requests[0]["model"] == "claude-haiku-4-5"
    assert_anthropic_event(h)
    assert h.events()[0].requested_model == "claude-sonnet-4-5"


def test_anthropic_messages_stream_helper_async(api: FakeApi, h: Harness) -> None:
    async def main() -> str:
        client = an(api, h, anthropic.AsyncAnthropic)
        async with client.messages.stream(
            model="claude-haiku-4-5", max_tokens=100, messages=MSGS
        ) as stream:
            message = await stream.get_final_message()
        await client.close()
        return str(message.content[0].text)

    assert asyncio.run(main()) == "hello"
    assert_anthropic_event(h)


def test_anthropic_messages_stream_helper_refusal_and_failure(api: FakeApi, h: Harness) -> None:
    client = an(api, h)
    api.fail_with = 500
    with (
        pytest.raises(anthropic.InternalServerError),
        client.messages.stream(model="claude-haiku-4-5", max_tokens=10, messages=MSGS),
    ):
        pass
    (event,) = h.events()
    assert (event.status, event.error_type) == (CallStatus.ERROR, "InternalServerError")
    h.publish("pool:p")
    with (
        pytest.raises(BudgetExceeded),
        client.messages.stream(model="claude-haiku-4-5", max_tokens=10, messages=MSGS),
    ):
        pass
    assert len(api.requests) == 1  # the STOP refused before any request


def test_openai_responses_without_a_model_records_the_serving_one(api: FakeApi, h: Harness) -> None:
    # A Responses call from a stored prompt names no model; a ROUTE cannot apply, and the
    # response says which model served it.
    h.publish("pool:p", ControlAction.ROUTE, params={"from": "*", "to": "gpt-4o"})
    oa(api, h).responses.create(prompt={"id": "pmpt_1"}, input="hi")
    assert "model" not in api.requests[0]
    (event,) = h.events()
    assert (event.requested_model, event.used_model) == ("unknown", "gpt-4o-mini")
    assert event.priced and event.input_tokens == 1200
