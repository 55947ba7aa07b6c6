"""A chat model wrapper through which a standing ROUTE changes the model LangChain calls.

A callback handler sees a request only after LangChain built it, so ``LedgerCallbackHandler``
alone cannot reroute. This wrapper reports the wrapped model's identity to the callbacks
(so the handler admits the call for the requested model), then sends the request through a
copy of the wrapped model set to the model the handler admitted the call with.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import ConfigDict, PrivateAttr

__all__ = ["RoutableChatModel"]

# Where LangChain's chat models keep their model name.
_MODEL_FIELDS = ("model_name", "model", "model_id")


class RoutableChatModel(BaseChatModel):
    """``inner`` with the model of each request chosen by the ledger's ROUTE."""

    inner: BaseChatModel
    model_config = ConfigDict(arbitrary_types_allowed=True)
    _copies: dict[str, BaseChatModel] = PrivateAttr(default_factory=dict)

    @property
    def _llm_type(self) -> str:
        return self.inner._llm_type

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return dict(self.inner._identifying_params)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        return self.inner._get_ls_params(stop=stop, **kwargs)

    def _model_field(self) -> str | None:
        fields = type(self.inner).model_fields
        for name in _MODEL_FIELDS:
            if name in fields and isinstance(getattr(self.inner, name, None), str):
                return name
        return None

    def _target(self, run_manager: Any) -> BaseChatModel:
        """The wrapped model, or a copy of it set to the model the handler admitted."""
        from .langchain import LedgerCallbackHandler

        if run_manager is None:
            return self.inner
        routed = None
        for handler in getattr(run_manager, "handlers", ()):
            if isinstance(handler, LedgerCallbackHandler):
                routed = handler.routed_model(run_manager.run_id)
                break
        field = self._model_field()
        if routed is None or field is None or getattr(self.inner, field) == routed:
            return self.inner
        found = self._copies.get(routed)
        if found is None:
            # A shallow copy shares the wrapped model's HTTP clients.
            found = self._copies[routed] = self.inner.model_copy(update={field: routed})
        return found

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        target = self._target(run_manager)
        return target._generate(messages, stop=stop, run_manager=run_manager, **kwargs)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        target = self._target(run_manager)
        return await target._agenerate(messages, stop=stop, run_manager=run_manager, **kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        target = self._target(run_manager)
        _ask_for_usage(target, kwargs)
        yield from target._stream(messages, stop=stop, run_manager=run_manager, **kwargs)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        target = self._target(run_manager)
        _ask_for_usage(target, kwargs)
        async for chunk in target._astream(messages, stop=stop, run_manager=run_manager, **kwargs):
            yield chunk

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable[Any, Any]:
        # The wrapped model formats the tools its provider's way; the binding stays on this
        # wrapper so that routing still applies.
        bound = self.inner.bind_tools(tools, **kwargs)
        return self.bind(**getattr(bound, "kwargs", {}))


def _ask_for_usage(model: BaseChatModel, kwargs: dict[str, Any]) -> None:
    # ChatOpenAI streams usage only when asked, and asks by itself only for the default
    # OpenAI endpoint; a caller's explicit choice stands.
    if "stream_usage" in type(model).model_fields and getattr(model, "stream_usage", 0) is None:
        kwargs.setdefault("stream_usage", True)
