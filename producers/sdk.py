"""Automatic recording from the OpenAI and Anthropic Python SDKs.

``instrument_openai(client, agent)`` and ``instrument_anthropic(client, agent)`` replace the
client's ``chat.completions.create`` / ``responses.create`` / ``messages.create`` /
``messages.stream`` (sync or async client) with one that runs inside ``agent.call``: a STOP
refuses before the request, a ROUTE changes the model sent, usage is recorded from the response
(from the final chunk or event when streaming), and a failed request is recorded with its error
type. Neither SDK is imported here: the shim works without them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from agentledger.schemas import CallStatus

from .ledger import AgentLedger, CallRecorder
from .sdk_anthropic import install_message_stream
from .sdk_usage import AnthropicTally, fail, openai_chat_usage, openai_responses_usage

__all__ = ["instrument_anthropic", "instrument_openai"]


def _openai_chunk(call: CallRecorder, chunk: Any, _state: Any) -> None:
    usage = getattr(chunk, "usage", None)
    if usage is not None:
        openai_chat_usage(call, usage)


# The Responses API ends a stream with one of these; each carries the whole response, usage
# included.
_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _openai_response(call: CallRecorder, response: Any) -> None:
    openai_responses_usage(call, getattr(response, "usage", None))
    served = getattr(response, "model", None)
    if call.requested_model == UNNAMED_MODEL and isinstance(served, str):
        # A name the event cannot carry leaves it "unknown" (recorded unpriced).
        with contextlib.suppress(ValueError):
            call.record(
                input_tokens=call.input_tokens,
                output_tokens=call.output_tokens,
                cached_input_tokens=call.cached_input_tokens,
                reasoning_tokens=call.reasoning_tokens,
                used_model=served,
            )
    if getattr(response, "status", None) == "failed":
        # The request succeeded but the model run did not: a billed failure.
        call.status = CallStatus.ERROR
        code = getattr(getattr(response, "error", None), "code", None)
        call.error_type = code[:200] if isinstance(code, str) and code else "ResponseFailed"


def _openai_response_event(call: CallRecorder, event: Any, _state: Any) -> None:
    if getattr(event, "type", None) in _RESPONSE_ENDS:
        _openai_response(call, getattr(event, "response", None))


def _anthropic_event(call: CallRecorder, event: Any, tally: Any) -> None:
    kind = getattr(event, "type", None)
    if kind == "message_start":
        tally.take(getattr(getattr(event, "message", None), "usage", None))
    elif kind == "message_delta":
        tally.take(getattr(event, "usage", None))
        tally.record(call)


class _Stream:
    """Passes a sync SDK stream through, recording usage as it goes; the call ends when the
    stream is exhausted, fails or is closed."""

    def __init__(
        self, inner: Any, call: CallRecorder, on_item: Callable[..., None], state: Any
    ) -> None:
        self._inner = inner
        self._call = call
        self._on_item = on_item
        self._state = state
        self._open = True

    def _end(self, exc: BaseException | None) -> None:
        if self._open:
            self._open = False
            if exc is None:
                self._call.__exit__(None, None, None)
            else:
                fail(self._call, exc)

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self._inner:
                self._on_item(self._call, item, self._state)
                yield item
        except BaseException as exc:
            self._end(exc)
            raise
        self._end(None)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._end(None)

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _AsyncStream(_Stream):
    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
        try:
            async for item in self._inner:
                self._on_item(self._call, item, self._state)
                yield item
        except BaseException as exc:
            self._end(exc)
            raise
        self._end(None)

    async def aclose(self) -> None:
        try:
            await self._inner.close()
        finally:
            self._end(None)

    async def __aenter__(self) -> _AsyncStream:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


class _Spec:
    def __init__(
        self,
        provider: str,
        max_tokens: Callable[[dict[str, Any]], int | None],
        prepare_stream: Callable[[dict[str, Any]], None],
        record: Callable[[CallRecorder, Any], None],
        on_item: Callable[..., None],
        new_state: Callable[[], Any],
    ) -> None:
        self.provider = provider
        self.max_tokens = max_tokens
        self.prepare_stream = prepare_stream
        self.record = record
        self.on_item = on_item
        self.new_state = new_state


def _openai_stream_options(kwargs: dict[str, Any]) -> None:
    # Usage comes only in a final chunk, and only when asked for.
    options = dict(kwargs.get("stream_options") or {})
    options.setdefault("include_usage", True)
    kwargs["stream_options"] = options


def _anthropic_record(call: CallRecorder, response: Any) -> None:
    tally = AnthropicTally()
    tally.take(getattr(response, "usage", None))
    tally.record(call)


_OPENAI = _Spec(
    "openai",
    lambda kw: kw.get("max_completion_tokens") or kw.get("max_tokens"),
    _openai_stream_options,
    lambda call, response: openai_chat_usage(call, getattr(response, "usage", None)),
    _openai_chunk,
    lambda: None,
)
_OPENAI_RESPONSES = _Spec(
    "openai",
    lambda kw: kw.get("max_output_tokens"),
    lambda kw: None,  # a Responses stream always ends with the whole response
    _openai_response,
    _openai_response_event,
    lambda: None,
)
_ANTHROPIC = _Spec(
    "anthropic",
    lambda kw: kw.get("max_tokens"),
    lambda kw: None,
    _anthropic_record,
    _anthropic_event,
    AnthropicTally,
)


# The requested model of a call that names none (a Responses call from a stored prompt); the
# response says which model served it.
UNNAMED_MODEL = "unknown"


def _begin(spec: _Spec, agent: AgentLedger, kwargs: dict[str, Any]) -> CallRecorder:
    model = kwargs.get("model")
    if model is None:
        model = UNNAMED_MODEL
    elif not isinstance(model, str):
        raise ValueError(f"model must be given as a string keyword argument, got {model!r}")
    limit = spec.max_tokens(kwargs)
    call = agent.call(
        provider=spec.provider, model=model, max_tokens=limit if isinstance(limit, int) else None
    )
    return call


def _prepare(spec: _Spec, call: CallRecorder, kwargs: dict[str, Any]) -> bool:
    """Point the request at the call's model and ready a stream; True when it streams."""
    if isinstance(kwargs.get("model"), str):  # a ROUTE cannot name what was not asked
        kwargs["model"] = call.model
    streaming = bool(kwargs.get("stream"))
    if streaming:
        spec.prepare_stream(kwargs)
    return streaming


def _finish(spec: _Spec, call: CallRecorder, result: Any) -> Any:
    """Record a whole (not streamed) response's usage and close the call."""
    try:
        spec.record(call, result)
    finally:
        call.__exit__(None, None, None)
    return result


def _wrap_sync(spec: _Spec, agent: AgentLedger, original: Callable[..., Any]) -> Callable[..., Any]:
    def create(*args: Any, **kwargs: Any) -> Any:
        call = _begin(spec, agent, kwargs).__enter__()
        streaming = _prepare(spec, call, kwargs)
        try:
            result = original(*args, **kwargs)
        except BaseException as exc:
            fail(call, exc)
            raise
        if streaming:
            return _Stream(result, call, spec.on_item, spec.new_state())
        return _finish(spec, call, result)

    return create


def _wrap_async(
    spec: _Spec, agent: AgentLedger, original: Callable[..., Any]
) -> Callable[..., Any]:
    async def create(*args: Any, **kwargs: Any) -> Any:
        call = await _begin(spec, agent, kwargs)._enter_async()
        streaming = _prepare(spec, call, kwargs)
        try:
            result = await original(*args, **kwargs)
        except BaseException as exc:
            fail(call, exc)
            raise
        if streaming:
            return _AsyncStream(result, call, spec.on_item, spec.new_state())
        return _finish(spec, call, result)

    return create


def _install(spec: _Spec, resource: Any, agent: AgentLedger) -> None:

    original = resource.create
    # The SDKs wrap their methods in decorators that hide the coroutine function.
    is_async = type(resource).__name__.startswith("Async") or inspect.iscoroutinefunction(
        inspect.unwrap(original)
    )
    if is_async:
        resource.create = _wrap_async(spec, agent, original)
    else:
        resource.create = _wrap_sync(spec, agent, original)


def instrument_openai(client: Any, agent: AgentLedger) -> Any:
    """Record every ``client.chat.completions.create`` and ``client.responses.create``
    (OpenAI or AsyncOpenAI) to ``agent``; returns the client."""
    _install(_OPENAI, client.chat.completions, agent)
    responses = getattr(client, "responses", None)
    if responses is not None:  # older SDKs have no Responses API
        _install(_OPENAI_RESPONSES, responses, agent)
    return client


def instrument_anthropic(client: Any, agent: AgentLedger) -> Any:
    """Record every ``client.messages.create`` and ``client.messages.stream`` (Anthropic or
    AsyncAnthropic) to ``agent``; returns the client."""
    _install(_ANTHROPIC, client.messages, agent)
    install_message_stream(client.messages, agent)
    return client
