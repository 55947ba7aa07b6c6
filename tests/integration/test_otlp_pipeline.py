"""OpenTelemetry in, governance out, on the real broker with the real services as processes:
the real OTel SDK and its OTLP/HTTP exporter (and the official OpenAI instrumentation calling a
loopback fake of the OpenAI API) -> the receiver -> calls topic -> processor (budget alert, STOP
command) and sink (exact costs in ClickHouse); bad and duplicate exports."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from genai_prices import Usage, calc_price

from agentledger.budgets import apply_policies
from agentledger.config import Settings
from agentledger.deploy.stack import Stack
from agentledger.review.query import QueryClient
from agentledger.schemas import (
    Alert,
    BudgetPolicy,
    ControlAction,
    ControlCommand,
    InvalidMessage,
    PolicyFile,
    usd_to_nano,
)
from agentledger.stream_processors.client import fetch_state
from tests.integration.test_processor_worker import TopicReader

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace")
exporter_module = pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")

from opentelemetry.exporter.otlp.proto.http import Compression  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import Status, StatusCode  # noqa: E402

pytestmark = pytest.mark.integration

T = TypeVar("T")
# Real call sizes from the Azure conversation trace (first rows of azure_llm_trace_2023_conv.csv).
SIZES = [(374, 44), (396, 109), (879, 55), (91, 16), (91, 16), (2738, 232), (733, 178)]


def price_nano(model: str, inp: int, out: int) -> int:
    usage = Usage(input_tokens=inp, output_tokens=out)
    return usd_to_nano(calc_price(usage, model_ref=model, provider_id="openai").total_price)


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = 60.0) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout_s}s")


def tracing(settings: Settings, service: str) -> tuple[Any, Any, InMemorySpanExporter]:
    """A TracerProvider exporting to the receiver (gzip), also keeping every span in memory
    so the test can export the same spans again (an exporter's retry)."""
    resource = Resource.create({"service.name": service})
    provider = otel_sdk.TracerProvider(resource=resource)
    exporter = exporter_module.OTLPSpanExporter(
        endpoint=f"http://127.0.0.1:{settings.otlp_port}/v1/traces",
        compression=Compression.Gzip,
        timeout=30,
    )
    kept = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(SimpleSpanProcessor(kept))
    return provider, exporter, kept


def sink_totals(client: QueryClient, workflow: str) -> tuple[int, int]:
    count, cost = client.query(
        "SELECT count(), sum(toInt128(cost_nano_usd)) FROM calls WHERE workflow_id = {wf:String}",
        {"wf": workflow},
    ).rows[0]
    return int(count), int(cost or 0)


def day_spend(settings: Settings, scope: str) -> int:
    report = fetch_state(settings, scope)
    return sum(int(v) for k, v in report["buckets"].items() if k.startswith("day:"))


def post(url: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code


def test_sdk_spans_are_priced_stored_once_and_count_against_budgets(stack: Stack) -> None:
    settings = stack.settings
    limit = Decimal("0.01")
    apply_policies(
        settings, PolicyFile(budgets=[BudgetPolicy(scope="agent:otel-runaway", limit_usd=limit)])
    )
    alerts = TopicReader(settings.kafka, settings.topics.alerts, 3)
    control = TopicReader(settings.kafka, settings.topics.control, 3)
    dlq = TopicReader(settings.kafka, settings.topics.dlq, 1)
    provider, exporter, kept = tracing(settings, "otel-svc")
    tracer = provider.get_tracer("agentledger-test")
    expected = 0
    calls = 0
    try:
        # Spend until the runaway is past its limit, plus two more.
        while expected < usd_to_nano(limit) * 1.2:
            inp, out = SIZES[calls % len(SIZES)]
            chat = tracer.start_as_current_span(
                "chat gpt-4o",
                attributes={
                    "gen_ai.operation.name": "chat",
                    "gen_ai.system": "openai",
                    "gen_ai.request.model": "gpt-4o",
                    "gen_ai.agent.id": "otel-runaway",
                    "gen_ai.conversation.id": "wf-otel",
                    "gen_ai.usage.input_tokens": inp,
                    "gen_ai.usage.output_tokens": out,
                },
            )
            # A child span that is no GenAI span: counted, ignored.
            with chat, tracer.start_as_current_span("GET /tool", attributes={"http.method": "GET"}):
                pass
            expected += price_nano("gpt-4o", inp, out)
            calls += 1
        # A GenAI span the receiver must reject: reported in partial_success, dead-lettered.
        with tracer.start_as_current_span(
            "chat broken",
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.system": "openai",
                "gen_ai.request.model": "gpt-4o",
                "gen_ai.agent.id": "otel-runaway",
                "gen_ai.conversation.id": "wf-otel",
                "gen_ai.usage.input_tokens": -5,
            },
        ) as span:
            span.set_status(Status(StatusCode.ERROR, "broken"))

        # The exporter's retry of everything already sent: the same spans, the same event ids.
        finished = kept.get_finished_spans()
        assert exporter.export(finished) is SpanExportResult.SUCCESS

        # Bad exports are refused whole and change nothing.
        url = f"http://127.0.0.1:{settings.otlp_port}/v1/traces"
        assert post(url, b"\x0a\xff\xff", "application/x-protobuf") == 400
        assert post(url, b"{", "application/json") == 400
        assert post(url, b"<spans/>", "application/xml") == 415

        client = QueryClient.from_settings(settings)
        wait_for(
            "every call in ClickHouse",
            lambda: sink_totals(client, "wf-otel")[0] >= calls or None,
        )
        # Exact costs, each span once although exported twice.
        assert sink_totals(client, "wf-otel") == (calls, expected)
        rows = client.query(
            "SELECT DISTINCT agent_id, pool, provider, used_model, priced FROM calls "
            "WHERE workflow_id = {wf:String}",
            {"wf": "wf-otel"},
        ).rows
        assert [tuple(r) for r in rows] == [("otel-runaway", "otel-svc", "openai", "gpt-4o", True)]
        wait_for(
            "the processor's spend",
            lambda: day_spend(settings, "agent:otel-runaway") >= expected or None,
        )
        assert day_spend(settings, "agent:otel-runaway") == expected
        # Pools count in the processor's second hop, a moment after the agent.
        wait_for(
            "the pool's spend",
            lambda: day_spend(settings, "pool:otel-svc") >= expected or None,
        )
        assert day_spend(settings, "pool:otel-svc") == expected

        def crossing_alerts() -> list[Alert]:
            found = [Alert.model_validate_json(v) for _k, v, _ in alerts.poll()]
            return [a for a in found if a.scope == "agent:otel-runaway"]

        [alert] = wait_for("the budget alert", crossing_alerts)
        assert alert.scope == "agent:otel-runaway"

        def stops() -> list[ControlCommand]:
            found = [ControlCommand.model_validate_json(v) for _k, v, _ in control.poll()]
            # By command id, as a shim applies them: a command's fast copy and its
            # transaction's copy are one command (stream_processors/README.md).
            once = {c.command_id: c for c in found}
            return [
                c
                for c in once.values()
                if c.scope == "agent:otel-runaway" and c.action is ControlAction.STOP
            ]

        [stop] = wait_for("the STOP command", stops)
        assert stop.limit_nano_usd == usd_to_nano(limit)

        def rejected() -> list[InvalidMessage]:
            found = [InvalidMessage.model_validate_json(v) for _k, v, _ in dlq.poll()]
            return [m for m in found if m.component == "otlp"]

        letters = wait_for("the rejected span in the dlq", rejected)
        # Exported twice (the retry), dead-lettered twice; nothing of it reached the calls.
        assert len(letters) == 2
        assert all("gen_ai.usage.input_tokens must be an integer" in m.reason for m in letters)
    finally:
        provider.shutdown()
        alerts.close()
        control.close()
        dlq.close()


def test_openai_instrumentation_calls_are_recorded_and_alert(stack: Stack) -> None:
    openai = pytest.importorskip("openai")
    instrumentation = pytest.importorskip("opentelemetry.instrumentation.openai_v2")
    from tests.unit.test_producer_sdk import FakeApi

    settings = stack.settings
    limit = Decimal("0.005")
    apply_policies(
        settings, PolicyFile(budgets=[BudgetPolicy(scope="pool:chat-app", limit_usd=limit)])
    )
    alerts = TopicReader(settings.kafka, settings.topics.alerts, 3)
    api = FakeApi()
    provider, _exporter, _kept = tracing(settings, "chat-app")
    instrumentor = instrumentation.OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        client = openai.OpenAI(api_key="test", base_url=f"{api.url}/v1", max_retries=0)
        # The fake answers 1,200 prompt and 300 completion tokens. The instrumentation reports
        # no cached tokens for chat completions, so all 1,200 are billed at the input rate.
        per_call = price_nano("gpt-4o", 1200, 300)
        calls = 0
        while calls * per_call <= usd_to_nano(limit):
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
            calls += 1
        api.fail_with = 500
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
        assert len(api.requests) == calls + 1

        query = QueryClient.from_settings(settings)

        def rows() -> list[tuple[Any, ...]]:
            return [
                tuple(r)
                for r in query.query(
                    "SELECT status, input_tokens, output_tokens, cost_nano_usd, error_type "
                    "FROM calls WHERE pool = 'chat-app' ORDER BY event_time, status",
                ).rows
            ]

        wait_for("the instrumented calls in ClickHouse", lambda: len(rows()) > calls or None)
        found = rows()
        assert len(found) == calls + 1
        assert found.count(("ok", 1200, 300, per_call, None)) == calls
        [failed] = [r for r in found if r[0] != "ok"]
        assert failed[0] == "error" and failed[3] == 0
        assert failed[4] == "openai.InternalServerError"

        def pool_alerts() -> list[Alert]:
            found = [Alert.model_validate_json(v) for _k, v, _ in alerts.poll()]
            return [a for a in found if a.scope == "pool:chat-app"]

        assert wait_for("the pool's budget alert", pool_alerts)
        wait_for(
            "the pool's spend",
            lambda: day_spend(settings, "pool:chat-app") >= calls * per_call or None,
        )
        assert day_spend(settings, "pool:chat-app") == calls * per_call
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
        api.close()
        alerts.close()
