"""Usage and failure mapping shared by the SDK wrappers and the LiteLLM callback.

Everything is read by attribute name, so neither SDK has to be importable.
"""

from __future__ import annotations

from typing import Any

from agentledger.schemas import CallStatus

from .ledger import CallRecorder

__all__ = [
    "AnthropicTally",
    "fail",
    "openai_chat_usage",
    "openai_responses_usage",
    "status_of",
    "token_count",
]


def status_of(exc: BaseException | None, http_status: int | None = None) -> CallStatus:
    """``rate_limited``, ``timeout`` or ``error`` for a failed request."""
    # By class name, so the SDKs need not be importable: openai.RateLimitError,
    # anthropic.APITimeoutError, litellm.Timeout, ...
    name = type(exc).__name__ if exc is not None else ""
    if "RateLimit" in name or http_status == 429:
        return CallStatus.RATE_LIMITED
    if "Timeout" in name or http_status in (408, 504):
        return CallStatus.TIMEOUT
    return CallStatus.ERROR


def fail(call: CallRecorder, exc: BaseException) -> None:
    """End ``call`` as failed by ``exc`` (the event records its status and class name)."""
    call.status = status_of(exc, getattr(exc, "status_code", None))
    call.__exit__(type(exc), exc, exc.__traceback__)


def token_count(value: Any) -> int:
    """A token count from an SDK object, 0 when it is missing or not an int."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _record(call: CallRecorder, inp: int, out: int, cached: int, reasoning: int) -> None:
    # Providers report the cached and reasoning parts inside the totals; a provider bug that
    # breaks that must not make record() raise inside the agent.
    call.record(
        input_tokens=inp,
        output_tokens=out,
        cached_input_tokens=min(cached, inp),
        reasoning_tokens=min(reasoning, out),
    )


def openai_chat_usage(call: CallRecorder, usage: Any) -> None:
    """Chat completions usage: prompt/completion tokens with their details."""
    if usage is None:
        return
    prompt = getattr(usage, "prompt_tokens_details", None)
    completion = getattr(usage, "completion_tokens_details", None)
    _record(
        call,
        token_count(getattr(usage, "prompt_tokens", 0)),
        token_count(getattr(usage, "completion_tokens", 0)),
        token_count(getattr(prompt, "cached_tokens", 0)),
        token_count(getattr(completion, "reasoning_tokens", 0)),
    )


def openai_responses_usage(call: CallRecorder, usage: Any) -> None:
    """Responses API usage: input/output tokens with their details."""
    if usage is None:
        return
    inp = getattr(usage, "input_tokens_details", None)
    out = getattr(usage, "output_tokens_details", None)
    _record(
        call,
        token_count(getattr(usage, "input_tokens", 0)),
        token_count(getattr(usage, "output_tokens", 0)),
        token_count(getattr(inp, "cached_tokens", 0)),
        token_count(getattr(out, "reasoning_tokens", 0)),
    )


class AnthropicTally:
    """Usage gathered from an Anthropic message or its stream events."""

    def __init__(self) -> None:
        self.input = self.cache_read = self.cache_write = self.output = 0

    def take(self, usage: Any) -> None:
        if usage is None:
            return
        # message_start carries the input side, message_delta the cumulative output.
        self.input = token_count(getattr(usage, "input_tokens", None)) or self.input
        self.cache_read = (
            token_count(getattr(usage, "cache_read_input_tokens", None)) or self.cache_read
        )
        self.cache_write = (
            token_count(getattr(usage, "cache_creation_input_tokens", None)) or self.cache_write
        )
        self.output = token_count(getattr(usage, "output_tokens", None)) or self.output

    def record(self, call: CallRecorder) -> None:
        # Anthropic's input_tokens excludes cache reads and writes; ours is the whole prompt.
        total = self.input + self.cache_read + self.cache_write
        call.record(
            input_tokens=total, output_tokens=self.output, cached_input_tokens=self.cache_read
        )
