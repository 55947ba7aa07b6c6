"""A LiteLLM callback that records every call LiteLLM makes to an agent's ledger.

```python
import litellm
from agentledger.producers import litellm_callback
litellm.callbacks = [litellm_callback(agent)]
```

LiteLLM's callbacks are process-wide: every LiteLLM call of the process is recorded to this one
agent (with the task current where the call ran), and LiteLLM ignores a second registration.
LiteLLM calls back after the request, so this callback records but cannot refuse: a STOP or
ROUTE is applied by running the call inside ``agent.call`` (or using ``agent.model_for``).
It reads LiteLLM's documented callback arguments: ``kwargs["standard_logging_object"]`` for
the provider, model, times, token totals and error class, and the response's ``usage`` for the
cached and reasoning tokens. LiteLLM is not imported until ``litellm_callback`` is called.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from agentledger.schemas import CallStatus

from .ledger import AgentLedger
from .sdk_usage import status_of, token_count

__all__ = ["LedgerCallback", "litellm_callback"]

log = logging.getLogger(__name__)

# LiteLLM reports a non-streaming async call to both the sync and the async hooks.
_SEEN_IDS = 4096
_NOT_ID = re.compile(r"[^A-Za-z0-9._:/@+\-]")


def _identifier(value: Any, fallback: str) -> str:
    """LiteLLM's provider or model name as an identifier the event accepts."""
    if not isinstance(value, str) or not value:
        return fallback
    return _NOT_ID.sub("_", value)[:200]


def _ms(value: Any) -> int | None:
    # LiteLLM passes datetimes to the hooks and epoch seconds in the payload.
    if isinstance(value, dt.datetime):
        stamp = value if value.tzinfo is not None else value.astimezone()
        return int(stamp.timestamp() * 1000)
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return int(value * 1000)
    return None


class LedgerCallback:
    """LiteLLM's ``CustomLogger`` hooks, recording to ``agent``; use ``litellm_callback`` to
    get an instance LiteLLM accepts."""

    def __init__(self, agent: AgentLedger, **kwargs: Any) -> None:
        # LiteLLM's callbacks are process-wide and it keeps one per class (and public str/int
        # attributes, of which this has none), so a second registration is dropped rather
        # than recording every call twice.
        self.agent = agent
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        super().__init__(**kwargs)

    def _first_time(self, call_id: Any) -> bool:
        if not isinstance(call_id, str) or not call_id:
            return True
        with self._lock:
            if call_id in self._seen:
                return False
            self._seen[call_id] = None
            if len(self._seen) > _SEEN_IDS:
                self._seen.popitem(last=False)
            return True

    def _record(
        self, kwargs: Mapping[str, Any], response: Any, start: Any, end: Any, failed: bool
    ) -> None:
        payload = kwargs.get("standard_logging_object")
        payload = payload if isinstance(payload, Mapping) else {}
        call_id = kwargs.get("litellm_call_id") or payload.get("id")
        if not self._first_time(call_id):
            return
        now = self.agent.ledger.clock()
        started = _ms(start) or _ms(payload.get("startTime")) or now
        ended = _ms(end) or _ms(payload.get("endTime")) or started
        model = _identifier(payload.get("model") or kwargs.get("model"), "unknown")
        provider = _identifier(
            payload.get("custom_llm_provider")
            or (kwargs.get("litellm_params") or {}).get("custom_llm_provider"),
            "unknown",
        )
        inp = token_count(payload.get("prompt_tokens"))
        out = token_count(payload.get("completion_tokens"))
        cached = reasoning = 0
        usage = getattr(response, "usage", None)
        if usage is not None:
            inp = token_count(getattr(usage, "prompt_tokens", None)) or inp
            out = token_count(getattr(usage, "completion_tokens", None)) or out
            details = getattr(usage, "prompt_tokens_details", None)
            cached = token_count(getattr(details, "cached_tokens", None))
            details = getattr(usage, "completion_tokens_details", None)
            reasoning = token_count(getattr(details, "reasoning_tokens", None))
        status, error_type = CallStatus.OK, None
        if failed:
            exc = kwargs.get("exception")
            info = payload.get("error_information") or {}
            code = info.get("error_code") if isinstance(info, Mapping) else None
            http = getattr(exc, "status_code", None)
            if not isinstance(http, int) and isinstance(code, str) and code.isdigit():
                http = int(code)
            status = status_of(exc if isinstance(exc, BaseException) else None, http)
            name = type(exc).__name__ if isinstance(exc, BaseException) else None
            error_type = (name or str(info.get("error_class") or "") or "LiteLLMError")[:200]
        try:
            self.agent.record_finished(
                provider=provider,
                model=model,
                started_ms=started,
                ended_ms=ended,
                input_tokens=inp,
                output_tokens=out,
                cached_input_tokens=min(cached, inp),
                reasoning_tokens=min(reasoning, out),
                status=status,
                error_type=error_type,
            )
        except ValueError as exc:
            # LiteLLM swallows a callback's exception; say what was wrong instead.
            log.warning("agentledger: LiteLLM call %s not recorded: %s", call_id, exc)

    def log_success_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._record(kwargs, response_obj, start_time, end_time, failed=False)

    def log_failure_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._record(kwargs, response_obj, start_time, end_time, failed=True)

    async def async_log_success_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._record(kwargs, response_obj, start_time, end_time, failed=False)

    async def async_log_failure_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._record(kwargs, response_obj, start_time, end_time, failed=True)


def litellm_callback(agent: AgentLedger) -> Any:
    """A ``litellm.integrations.custom_logger.CustomLogger`` recording every LiteLLM call
    (sync, async, streaming, failed) to ``agent``. Needs the ``litellm`` extra."""
    return _callback_class()(agent)


@lru_cache(maxsize=1)
def _callback_class() -> type[LedgerCallback]:
    # LiteLLM dispatches only to CustomLogger instances; built on first use so that
    # importing the shim never imports LiteLLM.
    from litellm.integrations.custom_logger import CustomLogger

    return type("AgentLedgerCallback", (LedgerCallback, CustomLogger), {})
