"""The OTLP receiver without a broker: span mapping, decoding (protobuf, JSON, gzip), the OTLP
statuses, partial success and dead letters, event ids, the mapping file, and the HTTP server's
token rules."""

from __future__ import annotations

import base64
import gzip
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from genai_prices import Usage, calc_price
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.otlp import (
    AttributeMapping,
    MappingError,
    OtlpServer,
    Receiver,
    SpanConverter,
    load_mapping,
    span_event_id,
)
from agentledger.otlp.mapping import DEFAULT_PROVIDERS
from agentledger.producers import InMemoryTransport
from agentledger.schemas import CallEvent, CallStatus, InvalidMessage, Topics, usd_to_nano
from tests.conftest import free_port
from tests.unit.test_producer_ledger import Harness

START_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
TOPICS = Topics("otlp.")
PROTOBUF = "application/x-protobuf"


def kv(key: str, value: object) -> KeyValue:
    if isinstance(value, bool):
        any_value = AnyValue(bool_value=value)
    elif isinstance(value, int):
        any_value = AnyValue(int_value=value)
    elif isinstance(value, float):
        any_value = AnyValue(double_value=value)
    else:
        any_value = AnyValue(string_value=str(value))
    return KeyValue(key=key, value=any_value)


def chat_span(n: int = 1, **attrs: object) -> Span:
    values: dict[str, object] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.usage.input_tokens": 1200,
        "gen_ai.usage.output_tokens": 300,
    }
    values.update(attrs)
    return Span(
        trace_id=bytes([n]) * 16,
        span_id=bytes([n]) * 8,
        name=f"chat {n}",
        start_time_unix_nano=START_NS + n * 1_000_000,
        end_time_unix_nano=START_NS + n * 1_000_000 + 250_000_000,
        attributes=[kv(k, v) for k, v in values.items() if v is not None],
    )


def export_request(spans: list[Span], service: str = "research-svc") -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(kv("service.name", service))
    resource_spans.scope_spans.add().spans.extend(spans)
    return request


def price_nano(provider: str, model: str, inp: int, out: int, cached: int = 0) -> int:
    usage = Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=cached)
    return usd_to_nano(calc_price(usage, model_ref=model, provider_id=provider).total_price)


@pytest.fixture
def transport() -> InMemoryTransport:
    return InMemoryTransport()


@pytest.fixture
def receiver(transport: InMemoryTransport) -> Receiver:
    return Receiver(SpanConverter(AttributeMapping()), transport, TOPICS, clock=lambda: 1)


def calls(transport: InMemoryTransport) -> list[CallEvent]:
    return [
        CallEvent.model_validate_json(value)
        for topic, _key, value in transport.messages
        if topic == TOPICS.calls
    ]


def dead_letters(transport: InMemoryTransport) -> list[InvalidMessage]:
    return [
        InvalidMessage.model_validate_json(value)
        for topic, _key, value in transport.messages
        if topic == TOPICS.dlq
    ]


def test_a_chat_span_becomes_a_call_priced_like_the_shim(
    receiver: Receiver, transport: InMemoryTransport
) -> None:
    span = chat_span(
        1,
        **{
            "gen_ai.usage.cache_read.input_tokens": 1000,
            "gen_ai.agent.name": "Research Agent",
            "gen_ai.conversation.id": "conv-7",
        },
    )
    reply = receiver.export(export_request([span]).SerializeToString(), PROTOBUF, None)
    assert reply.status == 200
    assert reply.content_type == PROTOBUF
    response = ExportTraceServiceResponse.FromString(reply.body)
    assert not response.HasField("partial_success")
    [event] = calls(transport)
    assert event.event_id == span_event_id(span.trace_id, span.span_id, event.event_time_ms)
    assert event.event_time_ms == START_NS // 1_000_000 + 1
    assert event.latency_ms == 250
    assert event.agent_id == "Research_Agent"  # made an identifier: the space becomes _
    assert event.pool == "research-svc"  # service.name
    assert event.workflow_id == "conv-7"
    assert (event.provider, event.requested_model, event.used_model) == (
        "openai",
        "gpt-4o",
        "gpt-4o-2024-08-06",
    )
    assert (event.input_tokens, event.output_tokens, event.cached_input_tokens) == (1200, 300, 1000)
    assert event.cost_nano_usd == price_nano("openai", "gpt-4o-2024-08-06", 1200, 300, 1000)
    assert event.priced and event.status is CallStatus.OK
    assert transport.messages[0][1] == b"Research_Agent"  # keyed by agent id


def test_the_same_usage_costs_the_same_through_the_shim(
    receiver: Receiver, transport: InMemoryTransport, tmp_path: Path
) -> None:
    harness = Harness(tmp_path)
    agent = harness.ledger.agent("a")
    with agent.call(provider="anthropic", model="claude-3-5-haiku-latest") as call:
        call.record(input_tokens=5000, output_tokens=700, cached_input_tokens=4000)
    [shim_event] = harness.events()
    span = chat_span(
        2,
        **{
            "gen_ai.system": None,
            "gen_ai.provider.name": "anthropic",
            "gen_ai.request.model": "claude-3-5-haiku-latest",
            "gen_ai.response.model": None,
            "gen_ai.usage.input_tokens": 5000,
            "gen_ai.usage.output_tokens": 700,
            "gen_ai.usage.cache_read.input_tokens": 4000,
        },
    )
    assert receiver.export(export_request([span]).SerializeToString(), PROTOBUF, None).status == 200
    [event] = calls(transport)
    assert event.used_model == event.requested_model == "claude-3-5-haiku-latest"
    assert event.cost_nano_usd == shim_event.cost_nano_usd > 0
    assert event.pricing_version == shim_event.pricing_version


def test_json_and_gzip_give_the_same_events_and_retries_the_same_ids(
    receiver: Receiver, transport: InMemoryTransport
) -> None:
    request = export_request([chat_span(1), chat_span(2)])
    receiver.export(request.SerializeToString(), PROTOBUF, None)
    as_json = json_format.MessageToDict(request)
    # OTLP/JSON carries ids as hex, not as protobuf JSON's base64.
    for span in as_json["resourceSpans"][0]["scopeSpans"][0]["spans"]:
        for key in ("traceId", "spanId"):
            span[key] = base64.b64decode(span[key]).hex()
    body = json.dumps(as_json).encode()
    reply = receiver.export(body, "application/json; charset=utf-8", None)
    assert reply.status == 200 and reply.content_type == "application/json"
    assert json.loads(reply.body) == {}
    receiver.export(gzip.compress(body), "application/json", "gzip")
    receiver.export(gzip.compress(request.SerializeToString()), PROTOBUF, "gzip")
    events = calls(transport)
    assert len(events) == 8
    assert {e.event_id for e in events} == {events[0].event_id, events[1].event_id}
    assert events[0] != events[1]
    assert events[:2] == events[2:4] == events[4:6] == events[6:]


def test_non_genai_and_agent_spans_are_counted_and_ignored(
    receiver: Receiver, transport: InMemoryTransport
) -> None:
    http = Span(trace_id=b"\x09" * 16, span_id=b"\x09" * 8, name="GET /", attributes=[])
    http.attributes.append(kv("http.method", "GET"))
    agent = chat_span(3, **{"gen_ai.operation.name": "invoke_agent"})
    request = export_request([http, agent, chat_span(4)])
    reply = receiver.export(request.SerializeToString(), PROTOBUF, None)
    assert reply.status == 200
    assert len(calls(transport)) == 1
    assert spans_metric(receiver) == {
        "accepted": 1,
        "not_genai": 1,
        "not_a_model_call": 1,
        "rejected": 0,
    }


def spans_metric(receiver: Receiver) -> dict[str, float]:
    from prometheus_client import generate_latest

    text = generate_latest(receiver.registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name == "agentledger_otlp_spans":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    found[sample.labels["outcome"]] = sample.value
    return found


@pytest.mark.parametrize(
    ("attrs", "problem"),
    [
        ({"gen_ai.request.model": None, "gen_ai.response.model": None}, "no model"),
        ({"gen_ai.system": None, "gen_ai.provider.name": None}, "no provider"),
        ({"gen_ai.usage.input_tokens": "lots"}, "gen_ai.usage.input_tokens must be an integer"),
        ({"gen_ai.usage.output_tokens": -3}, "gen_ai.usage.output_tokens must be an integer"),
        ({"gen_ai.usage.cache_read.input_tokens": 5000}, "input_includes_cached: false"),
    ],
)
def test_a_bad_genai_span_is_rejected_in_partial_success_and_dead_lettered(
    receiver: Receiver, transport: InMemoryTransport, attrs: dict[str, Any], problem: str
) -> None:
    if "gen_ai.provider.name" in attrs:
        attrs = {**attrs, "gen_ai.operation.name": "chat"}
    bad = chat_span(5, **attrs)
    if "gen_ai.provider.name" in attrs:
        # Still a GenAI span (it has an operation), only without a provider.
        del bad.attributes[:]
        bad.attributes.extend(
            [kv("gen_ai.operation.name", "chat"), kv("gen_ai.request.model", "gpt-4o")]
        )
    request = export_request([chat_span(1), bad])
    reply = receiver.export(request.SerializeToString(), PROTOBUF, None)
    assert reply.status == 200
    response = ExportTraceServiceResponse.FromString(reply.body)
    assert response.partial_success.rejected_spans == 1
    assert problem in response.partial_success.error_message
    assert len(calls(transport)) == 1  # the valid span of the same request is kept
    [letter] = dead_letters(transport)
    assert letter.component == "otlp" and problem in letter.reason
    assert Span.FromString(letter.payload()).name == "chat 5"


def test_error_spans_are_recorded_with_their_status(
    receiver: Receiver, transport: InMemoryTransport
) -> None:
    failed = chat_span(6, **{"error.type": "RateLimitError", "gen_ai.usage.output_tokens": 0})
    failed.status.code = Status.STATUS_CODE_ERROR
    timed_out = chat_span(7)
    timed_out.status.code = Status.STATUS_CODE_ERROR
    timed_out.status.message = "request timed out"
    timed_out.attributes.append(kv("error.type", "APITimeoutError"))
    other = chat_span(8)
    other.status.code = Status.STATUS_CODE_ERROR
    other.status.message = "boom"
    receiver.export(export_request([failed, timed_out, other]).SerializeToString(), PROTOBUF, None)
    statuses = [(e.status, e.error_type) for e in calls(transport)]
    assert statuses == [
        (CallStatus.RATE_LIMITED, "RateLimitError"),
        (CallStatus.TIMEOUT, "APITimeoutError"),
        (CallStatus.ERROR, "boom"),
    ]


@pytest.mark.parametrize(
    ("body", "content_type", "encoding", "status"),
    [
        (b"\xff\xff\xff", PROTOBUF, None, 400),
        (b"{not json", "application/json", None, 400),
        (b"[]", "application/json", None, 400),
        (b'{"resourceSpans": 7}', "application/json", None, 400),
        (
            b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz"}]}]}]}',
            "application/json",
            None,
            400,
        ),
        (b"hello", "text/plain", None, 415),
        (b"", None, None, 415),
        (b"x", PROTOBUF, "br", 415),
        (b"not gzip", PROTOBUF, "gzip", 400),
        (gzip.compress(b"\x00" * 100)[:20], PROTOBUF, "gzip", 400),
    ],
)
def test_undecodable_requests_get_the_otlp_status_and_send_nothing(
    receiver: Receiver,
    transport: InMemoryTransport,
    body: bytes,
    content_type: str | None,
    encoding: str | None,
    status: int,
) -> None:
    reply = receiver.export(body, content_type, encoding)
    assert reply.status == status
    assert transport.messages == []
    if reply.content_type == "application/json":
        assert json.loads(reply.body)["message"]


def test_a_gzip_bomb_is_refused(receiver: Receiver) -> None:
    bomb = gzip.compress(b"\x00" * (17 << 20))
    assert receiver.export(bomb, PROTOBUF, "gzip").status == 413


def test_unknown_json_fields_are_ignored(receiver: Receiver, transport: InMemoryTransport) -> None:
    body = json.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {
                        "attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]
                    },
                    "futureField": 1,
                    "scopeSpans": [
                        {
                            "spans": [
                                {
                                    "traceId": "0af7651916cd43dd8448eb211c80319c",
                                    "spanId": "b7ad6b7169203331",
                                    "name": "chat gpt-4o-mini",
                                    "startTimeUnixNano": str(START_NS),
                                    "endTimeUnixNano": str(START_NS + 10**9),
                                    "attributes": [
                                        {
                                            "key": "gen_ai.operation.name",
                                            "value": {"stringValue": "chat"},
                                        },
                                        {
                                            "key": "gen_ai.provider.name",
                                            "value": {"stringValue": "openai"},
                                        },
                                        {
                                            "key": "gen_ai.request.model",
                                            "value": {"stringValue": "gpt-4o-mini"},
                                        },
                                        {
                                            "key": "gen_ai.usage.input_tokens",
                                            "value": {"intValue": "100"},
                                        },
                                        {
                                            "key": "gen_ai.usage.output_tokens",
                                            "value": {"intValue": 20},
                                        },
                                    ],
                                    "newSpanField": {"x": 1},
                                }
                            ]
                        }
                    ],
                }
            ]
        }
    ).encode()
    assert receiver.export(body, "application/json", None).status == 200
    [event] = calls(transport)
    assert (event.agent_id, event.pool, event.latency_ms) == ("svc", "svc", 1000)
    assert event.cost_nano_usd == price_nano("openai", "gpt-4o-mini", 100, 20)
    assert event.event_id == span_event_id(
        bytes.fromhex("0af7651916cd43dd8448eb211c80319c"),
        bytes.fromhex("b7ad6b7169203331"),
        START_NS // 1_000_000,
    )


def test_event_ids_are_version_7_ordered_by_time_and_distinct_per_span() -> None:
    first = span_event_id(b"\x01" * 16, b"\x01" * 8, 1000)
    assert first.version == 7 and first.int >> 80 == 1000
    assert first == span_event_id(b"\x01" * 16, b"\x01" * 8, 1000)
    assert first != span_event_id(b"\x01" * 16, b"\x02" * 8, 1000)
    assert first < span_event_id(b"\x00" * 16, b"\x00" * 8, 1001)


def test_the_mapping_file_overrides_fields_and_bad_files_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "mapping.yaml"
    path.write_text(
        "agent_id: [resource:service.instance.id, span:app.agent]\n"
        "pool: [app.team]\n"
        "task_type: [gen_ai.operation.name]\n"
        "input_includes_cached: false\n"
        "providers: {my.gateway: openai}\n"
    )
    mapping = load_mapping(path)
    assert mapping.workflow_id == AttributeMapping().workflow_id  # not given: the default
    transport = InMemoryTransport()
    receiver = Receiver(SpanConverter(mapping), transport, TOPICS)
    span = chat_span(
        1,
        **{
            "gen_ai.system": "my.gateway",
            "app.agent": "coder-2",
            "app.team": "platform",
            "gen_ai.usage.input_tokens": 200,
            "gen_ai.usage.cache_read.input_tokens": 1000,
        },
    )
    receiver.export(export_request([span]).SerializeToString(), PROTOBUF, None)
    [event] = calls(transport)
    assert (event.agent_id, event.pool, event.task_type) == ("coder-2", "platform", "chat")
    assert (event.provider, event.input_tokens, event.cached_input_tokens) == ("openai", 1200, 1000)
    assert event.cost_nano_usd == price_nano("openai", "gpt-4o-2024-08-06", 1200, 300, 1000)

    path.write_text("agent_id: [nowhere:service.name]\n")
    with pytest.raises(MappingError, match=r"mapping.yaml: agent_id: .*'span:<key>'"):
        load_mapping(path)
    path.write_text("agent: [x]\n")
    with pytest.raises(MappingError, match="agent: Extra inputs"):
        load_mapping(path)
    path.write_text("- a\n")
    with pytest.raises(MappingError, match="must be a mapping"):
        load_mapping(path)
    assert load_mapping(None) == AttributeMapping()
    assert DEFAULT_PROVIDERS["aws.bedrock"] == "aws"


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[OtlpServer] = []

    def make(host: str = "127.0.0.1", **overrides: object) -> tuple[OtlpServer, InMemoryTransport]:
        settings = Settings(
            home=tmp_path / "home",
            api_token=SecretStr("otlp-token"),
            otlp_host=host,
            otlp_port=free_port(),
            **overrides,  # type: ignore[arg-type]
        )
        transport = InMemoryTransport()
        server = OtlpServer(
            Receiver(SpanConverter(AttributeMapping()), transport, TOPICS), settings
        )
        server.start()
        started.append(server)
        return server, transport

    yield make
    for server in started:
        server.stop()


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def test_server_on_loopback_takes_exports_without_a_token_and_guards_metrics(
    server_factory: Any,
) -> None:
    server, transport = server_factory()
    base = f"http://127.0.0.1:{server.port}"
    body = export_request([chat_span(1)]).SerializeToString()
    assert post(f"{base}/v1/traces", body, {"Content-Type": PROTOBUF})[0] == 200
    assert len(calls(transport)) == 1
    assert post(f"{base}/v1/logs", body, {"Content-Type": PROTOBUF})[0] == 404
    status, text = post(f"{base}/v1/traces", b"x", {"Content-Type": "text/csv"})
    assert status == 415 and b"Content-Type must be" in text
    assert get(f"{base}/health")[0] == 200
    assert get(f"{base}/metrics")[0] == 401
    assert get(f"{base}/metrics", "wrong")[0] == 401
    status, text = get(f"{base}/metrics", "otlp-token")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    [accepted] = [
        s
        for s in families["agentledger_otlp_spans"].samples
        if s.labels.get("outcome") == "accepted" and s.name.endswith("_total")
    ]
    assert accepted.value == 1
    requests = {
        s.labels["code"]: s.value
        for s in families["agentledger_otlp_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests == {"200": 1, "415": 1}


def test_server_bound_elsewhere_requires_the_token(server_factory: Any) -> None:
    # 127.0.0.2 is loopback to the kernel, but not the default address: it stands for any
    # non-default bind here without opening a port to the network.
    server, transport = server_factory(host="127.0.0.2", metrics_open=True)
    assert server.requires_token
    url = f"http://127.0.0.2:{server.port}/v1/traces"
    body = export_request([chat_span(1)]).SerializeToString()
    status, _ = post(url, body, {"Content-Type": PROTOBUF})
    assert status == 401
    status, _ = post(url, body, {"Content-Type": PROTOBUF, "Authorization": "Bearer nope"})
    assert status == 401
    assert transport.messages == []
    headers = {"Content-Type": PROTOBUF, "Authorization": "Bearer otlp-token"}
    assert post(url, body, headers)[0] == 200
    assert len(calls(transport)) == 1
    assert get(f"http://127.0.0.2:{server.port}/metrics")[0] == 200  # metrics_open
