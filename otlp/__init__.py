"""The OTLP/HTTP receiver: OpenTelemetry GenAI spans in, CallEvents on the calls topic out.

Apps already instrumented with OpenTelemetry (opentelemetry-instrumentation-openai-v2,
OpenLLMetry, framework instrumentations) are recorded without code changes and priced exactly
like the shim prices. They are governed by alerts, webhooks and the dashboard: no shim runs in
their process to refuse a call. Needs ``agentledger[otlp]``.
"""

from .decode import RequestError, decode_request, encode_response
from .mapping import DEFAULT_PROVIDERS, AttributeMapping, MappingError, load_mapping
from .receiver import Receiver, ReceiverMetrics, Reply
from .server import OtlpServer
from .service import build_receiver, run_receiver
from .spans import Converted, Ignored, Rejected, SpanConverter, span_event_id

__all__ = [
    "DEFAULT_PROVIDERS",
    "AttributeMapping",
    "Converted",
    "Ignored",
    "MappingError",
    "OtlpServer",
    "Receiver",
    "ReceiverMetrics",
    "Rejected",
    "Reply",
    "RequestError",
    "SpanConverter",
    "build_receiver",
    "decode_request",
    "encode_response",
    "load_mapping",
    "run_receiver",
    "span_event_id",
]
