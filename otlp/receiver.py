"""The receiver's request logic, apart from the HTTP plumbing: decode an export, turn its GenAI
spans into CallEvents, send them through the shim's transport (Kafka with the durable spool),
and answer as OTLP/HTTP says.

- 200 with an empty ``ExportTraceServiceResponse``: every span accepted or ignored.
- 200 with ``partial_success``: some GenAI spans were rejected (count and the first reasons);
  they are dead-lettered, and the client must not retry them.
- 400 undecodable, 413 too large, 415 unsupported content type or encoding: nothing was sent.
- 503 (retryable): the events were not all confirmed by Kafka, nor spooled, within
  ``flush_timeout_s``. A retry is safe, since event ids come from trace and span ids.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from agentledger.producers.transport import EventTransport
from agentledger.schemas import InvalidMessage, Topics

from .decode import RequestError, decode_request, encode_response, encode_status
from .spans import Converted, Ignored, Rejected, SpanConverter, attributes

__all__ = ["Receiver", "ReceiverMetrics", "Reply"]

log = logging.getLogger(__name__)

_GRPC_INVALID_ARGUMENT = 3
_GRPC_UNAVAILABLE = 14
_MAX_REASONS = 5


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str


class ReceiverMetrics:
    """Counted once per request, not per span (the counts are summed first)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "agentledger_otlp_requests",
            "OTLP export requests by HTTP status",
            ["code"],
            registry=registry,
        )
        self.spans = Counter(
            "agentledger_otlp_spans",
            "spans received, by outcome: accepted (a CallEvent), ignored (not_genai, "
            "not_a_model_call) or rejected",
            ["outcome"],
            registry=registry,
        )
        self.events = Counter(
            "agentledger_events_processed",
            "CallEvents produced to the calls topic",
            registry=registry,
        )
        self.seconds = Histogram(
            "agentledger_otlp_request_seconds",
            "time to handle one export, decode to Kafka confirmation",
            registry=registry,
        )
        for outcome in ("accepted", "not_genai", "not_a_model_call", "rejected"):
            self.spans.labels(outcome)


class Receiver:
    def __init__(
        self,
        converter: SpanConverter,
        transport: EventTransport,
        topics: Topics,
        *,
        registry: CollectorRegistry | None = None,
        flush_timeout_s: float = 5.0,
        clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.converter = converter
        self.transport = transport
        self.topics = topics
        self.flush_timeout_s = flush_timeout_s
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        self.metrics = ReceiverMetrics(self.registry)
        # Flushes of concurrent requests would each wait for all queued messages anyway.
        self._flush_lock = threading.Lock()

    def export(self, body: bytes, content_type: str | None, content_encoding: str | None) -> Reply:
        started = time.perf_counter()
        try:
            reply = self._export(body, content_type, content_encoding)
        finally:
            self.metrics.seconds.observe(time.perf_counter() - started)
        self.metrics.requests.labels(str(reply.status)).inc()
        return reply

    def _export(self, body: bytes, content_type: str | None, content_encoding: str | None) -> Reply:
        try:
            request, encoding = decode_request(body, content_type, content_encoding)
        except RequestError as exc:
            log.info("otlp: refused an export: %s", exc)
            ctype = content_type if content_type else "application/json"
            encoding_guess = "application/x-protobuf" if "protobuf" in ctype else None
            return Reply(
                exc.status,
                encode_status(_GRPC_INVALID_ARGUMENT, exc.message, encoding_guess),
                encoding_guess or "application/json",
            )
        counts = {"accepted": 0, "not_genai": 0, "not_a_model_call": 0, "rejected": 0}
        reasons: list[str] = []
        calls_topic = self.topics.calls
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    outcome = self.converter.convert(span, resource)
                    if isinstance(outcome, Converted):
                        event = outcome.event
                        self.transport.send(
                            calls_topic,
                            event.agent_id.encode(),
                            event.model_dump_json().encode(),
                        )
                        counts["accepted"] += 1
                    elif isinstance(outcome, Ignored):
                        counts[outcome.why] += 1
                    else:
                        counts["rejected"] += 1
                        if len(reasons) < _MAX_REASONS:
                            reasons.append(outcome.reason)
                        self._dead_letter(outcome, span.SerializeToString())
        for outcome_name, count in counts.items():
            if count:
                self.metrics.spans.labels(outcome_name).inc(count)
        if counts["accepted"] or counts["rejected"]:
            with self._flush_lock:
                left = self.transport.flush(self.flush_timeout_s)
            if left:
                message = (
                    f"{left} messages not yet confirmed by Kafka after {self.flush_timeout_s}s; "
                    "retry (event ids are derived from trace and span ids, so a retry is stored "
                    "once)"
                )
                log.warning("otlp: %s", message)
                return Reply(503, encode_status(_GRPC_UNAVAILABLE, message, encoding), encoding)
            self.metrics.events.inc(counts["accepted"])
        message = ""
        if counts["rejected"]:
            more = counts["rejected"] - len(reasons)
            message = "; ".join(reasons) + (f"; and {more} more" if more > 0 else "")
        return Reply(200, encode_response(counts["rejected"], message, encoding), encoding)

    def _dead_letter(self, outcome: Rejected, span_bytes: bytes) -> None:
        message = InvalidMessage.from_raw(
            topic="otlp:/v1/traces",
            partition=0,
            offset=0,
            reason=outcome.reason,
            component="otlp",
            detected_at_ms=max(self.clock(), 0),
            key=None,
            payload=span_bytes,
        )
        self.transport.send(self.topics.dlq, b"otlp:/v1/traces", message.model_dump_json().encode())
