"""Recording for Anthropic's ``client.messages.stream(...)`` helper (sync and async).

The helper does not go through ``messages.create``: it returns a manager whose ``with`` block
sends the request. So the wrapper returns a manager of its own, which enters ``agent.call``
(a STOP refuses before the request, a ROUTE changes the model sent), enters the SDK's manager,
and records the usage of the message snapshot the SDK accumulated when the block ends, however
much of the stream was read.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

from .ledger import AgentLedger
from .sdk_usage import AnthropicTally, fail

__all__ = ["install_message_stream"]


class _Manager:
    def __init__(
        self,
        original: Callable[..., Any],
        agent: AgentLedger,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        model = kwargs.get("model")
        if not isinstance(model, str):
            raise ValueError(f"model must be given as a string keyword argument, got {model!r}")
        limit = kwargs.get("max_tokens")
        self._call = agent.call(
            provider="anthropic",
            model=model,
            max_tokens=limit if isinstance(limit, int) and not isinstance(limit, bool) else None,
        )
        self._original = original
        self._args = args
        self._kwargs = kwargs
        self._inner: Any = None
        self._stream: Any = None

    def _open(self) -> Any:
        self._kwargs["model"] = self._call.model
        return self._original(*self._args, **self._kwargs)

    def _finish(self, exc: BaseException | None) -> None:
        # The SDK keeps the accumulated message behind a private accessor; without it (an SDK
        # that renamed it) the call is still recorded, with zero tokens.
        snapshot = getattr(self._stream, "_current_snapshot_or_none", None)
        message = snapshot() if callable(snapshot) else None
        tally = AnthropicTally()
        tally.take(getattr(message, "usage", None))
        tally.record(self._call)
        if exc is None:
            self._call.__exit__(None, None, None)
        else:
            fail(self._call, exc)


class _SyncManager(_Manager):
    def __enter__(self) -> Any:
        self._call.__enter__()
        try:
            self._inner = self._open()
            self._stream = self._inner.__enter__()
        except BaseException as exc:
            fail(self._call, exc)
            raise
        return self._stream

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._inner.__exit__(exc_type, exc, tb)
        finally:
            self._finish(exc)


class _AsyncManager(_Manager):
    async def __aenter__(self) -> Any:
        await self._call._enter_async()
        try:
            self._inner = self._open()
            self._stream = await self._inner.__aenter__()
        except BaseException as exc:
            fail(self._call, exc)
            raise
        return self._stream

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._inner.__aexit__(exc_type, exc, tb)
        finally:
            self._finish(exc)


def install_message_stream(resource: Any, agent: AgentLedger) -> None:
    """Replace ``resource.stream`` (``client.messages``) with a recording one."""
    original = getattr(resource, "stream", None)
    if original is None:  # an SDK without the helper
        return
    manager = _AsyncManager if type(resource).__name__.startswith("Async") else _SyncManager

    def stream(*args: Any, **kwargs: Any) -> _Manager:
        return manager(original, agent, args, kwargs)

    resource.stream = stream
