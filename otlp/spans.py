"""One OTLP span -> one CallEvent, priced as the shim prices, or the reason it is not one.

A span is a GenAI span when it carries an operation, provider or system attribute of the
GenAI conventions. Of those, only model calls (``model_operations``: chat, completions,
embeddings) become events: an ``invoke_agent`` span rolls up its children's usage, and counting
it too would bill the calls twice. A model-call span that cannot make a valid event (no model,
a token count that is not a non-negative integer, cached tokens above the input) is rejected
with a reason naming the attribute; the receiver reports it in ``partial_success`` and
dead-letters it.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from agentledger.producers.linear_price import LinearPrices
from agentledger.producers.pricing import Pricer
from agentledger.schemas import CallEvent, CallStatus

from .mapping import AttributeMapping

__all__ = [
    "Converted",
    "Ignored",
    "Rejected",
    "SpanConverter",
    "attributes",
    "span_event_id",
]

_MAX_TOKENS = 100_000_000
_NOT_ID = re.compile(r"[^A-Za-z0-9._:/@+\-]")
# Some instrumentations set error.type to the exception class itself, which the SDK exports
# as its repr: "<class 'openai.InternalServerError'>" is recorded as the class name.
_CLASS_REPR = re.compile(r"^<class '([^']+)'>$")
_GENAI_MARKERS = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.system")


@dataclass(frozen=True, slots=True)
class Converted:
    event: CallEvent


@dataclass(frozen=True, slots=True)
class Ignored:
    why: str
    """``not_genai`` or ``not_a_model_call``: the metric label"""


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str


Outcome = Converted | Ignored | Rejected


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "double_value":
        return value.double_value
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value
    return None


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP ``KeyValue`` pairs as a plain dict (a repeated key keeps its last value)."""
    found: dict[str, Any] = {}
    pair: KeyValue
    for pair in pairs:
        found[pair.key] = _value(pair.value)
    return found


def span_event_id(trace_id: bytes, span_id: bytes, event_time_ms: int) -> uuid.UUID:
    """The same id for every export of one span, so a retried export is stored once.

    It keeps the version 7 layout of the shim's ids (48 bits of event time first, so ids sort by
    time in ClickHouse), with the 74 "random" bits taken from SHA-256 of trace and span id.
    """
    digest = int.from_bytes(hashlib.sha256(trace_id + span_id).digest()[:10], "big")
    value = (
        (event_time_ms << 80)
        | (0x7 << 76)
        | ((digest >> 62) & 0xFFF) << 64
        | (0b10 << 62)
        | (digest & ((1 << 62) - 1))
    )
    return uuid.UUID(int=value)


def _identifier(value: Any) -> str | None:
    """An attribute value as a CallEvent identifier: characters outside the identifier set
    become ``_`` ("Research Agent" -> "Research_Agent"), cut to 200 characters."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, bytes):
        value = value.hex()
    text = _NOT_ID.sub("_", str(value))[:200]
    return text or None


def _tokens(key: str, value: Any) -> int | str:
    """The count, or the problem with it (the message names the attribute)."""
    if isinstance(value, bool):
        count = None
    elif isinstance(value, int):
        count = value
    elif isinstance(value, float | str):
        integral = value.is_integer() if isinstance(value, float) else value.isdigit()
        count = int(value) if integral else None
    else:
        count = None
    if count is None or not 0 <= count <= _MAX_TOKENS:
        return f"{key} must be an integer from 0 to {_MAX_TOKENS:,}, got {value!r}"
    return count


def _status(span: Span, error_type: str | None) -> CallStatus:
    if span.status.code != Status.STATUS_CODE_ERROR and error_type is None:
        return CallStatus.OK
    lowered = (error_type or "").lower()
    if "timeout" in lowered or "timedout" in lowered:
        return CallStatus.TIMEOUT
    if "ratelimit" in lowered.replace("_", "") or lowered == "429":
        return CallStatus.RATE_LIMITED
    return CallStatus.ERROR


class SpanConverter:
    """Thread-safe: the pricer and its caches are."""

    def __init__(self, mapping: AttributeMapping, pricer: Pricer | None = None) -> None:
        self.mapping = mapping
        self._pricer = pricer or Pricer()
        self._linear = LinearPrices(self._pricer)
        self._operations = frozenset(mapping.model_operations)

    def convert(self, span: Span, resource: dict[str, Any]) -> Outcome:
        attrs = attributes(span.attributes)
        if not any(marker in attrs for marker in _GENAI_MARKERS):
            return Ignored("not_genai")
        m = self.mapping
        found = m.lookup(m.operation, attrs, resource)
        if found is not None and found[1] not in self._operations:
            return Ignored("not_a_model_call")
        if len(span.trace_id) != 16 or len(span.span_id) != 8:
            return Rejected(
                f"span {span.name!r}: trace_id must be 16 bytes and span_id 8 bytes, got "
                f"{len(span.trace_id)} and {len(span.span_id)}"
            )
        start_ms = span.start_time_unix_nano // 1_000_000
        end_ms = span.end_time_unix_nano // 1_000_000
        if not 0 < start_ms < 1 << 48:
            return Rejected(f"span {span.name!r}: start_time_unix_nano is not a valid time")

        def ident(sources: list[str]) -> str | None:
            hit = m.lookup(sources, attrs, resource)
            return None if hit is None else _identifier(hit[1])

        provider_raw = ident(m.provider)
        requested = ident(m.requested_model)
        used = ident(m.used_model)
        if requested is None and used is None:
            return Rejected(
                f"span {span.name!r}: no model: expected one of "
                f"{', '.join(m.requested_model + m.used_model)}"
            )
        requested = requested or used
        used = used or requested
        assert requested is not None and used is not None
        if provider_raw is None:
            return Rejected(
                f"span {span.name!r}: no provider: expected one of {', '.join(m.provider)}"
            )
        provider = m.providers.get(provider_raw, provider_raw)
        counts: dict[str, int] = {}
        for field in ("input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"):
            hit = m.lookup(getattr(m, field), attrs, resource)
            if hit is None:
                counts[field] = 0
                continue
            parsed = _tokens(hit[0], hit[1])
            if isinstance(parsed, str):
                return Rejected(f"span {span.name!r}: {parsed}")
            counts[field] = parsed
        inp, out = counts["input_tokens"], counts["output_tokens"]
        cached, reasoning = counts["cached_input_tokens"], counts["reasoning_tokens"]
        if not m.input_includes_cached:
            inp += cached
        if cached > inp:
            return Rejected(
                f"span {span.name!r}: cached input tokens ({cached}) exceed the input tokens "
                f"({inp}); if this instrumentation counts input without the cached tokens, set "
                "input_includes_cached: false in the mapping"
            )
        if reasoning > out:
            return Rejected(
                f"span {span.name!r}: reasoning tokens ({reasoning}) exceed the output tokens "
                f"({out})"
            )
        hit = m.lookup(m.error_type, attrs, resource)
        error_type = None if hit is None else _CLASS_REPR.sub(r"\1", str(hit[1]))[:200]
        status = _status(span, error_type)
        if status is not CallStatus.OK and error_type is None:
            error_type = (span.status.message or "error")[:200]
        version: str | None
        rates = self._linear.rates(provider, used)
        if rates is not None:
            cost, priced, version = self._linear.cost(rates, inp, out, cached), True, rates.version
        else:
            price = self._pricer.price(
                provider,
                used,
                input_tokens=inp,
                output_tokens=out,
                cached_input_tokens=cached,
                at_ms=start_ms,
            )
            cost, priced, version = price.cost_nano_usd, price.priced, price.pricing_version
        agent = ident(m.agent_id) or m.agent_id_fallback
        try:
            event = CallEvent(
                event_id=span_event_id(span.trace_id, span.span_id, start_ms),
                event_time_ms=start_ms,
                agent_id=agent,
                pool=ident(m.pool),
                workflow_id=ident(m.workflow_id),
                task_type=ident(m.task_type),
                task_id=ident(m.task_id),
                provider=provider,
                requested_model=requested,
                used_model=used,
                input_tokens=inp,
                output_tokens=out,
                cached_input_tokens=cached,
                reasoning_tokens=reasoning,
                cost_nano_usd=cost,
                priced=priced,
                pricing_version=version,
                latency_ms=max(end_ms - start_ms, 0),
                status=status,
                error_type=error_type,
            )
        except ValueError as exc:  # pydantic's ValidationError: a mapping that yields bad ids
            return Rejected(f"span {span.name!r}: not a valid CallEvent: {exc}")
        return Converted(event)
