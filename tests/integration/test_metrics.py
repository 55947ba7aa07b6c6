"""Every service's GET /metrics on the real stack, parsed with prometheus-client's own parser:
the values follow the test's traffic (shim calls, OTLP spans, a bad record, a budget crossing,
an operator command), and a scrape without the bearer token is refused."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from decimal import Decimal

import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

import tests.integration.test_otlp_pipeline as pipeline
from agentledger.budgets import apply_policies
from agentledger.deploy.stack import Stack
from agentledger.producers import Ledger
from agentledger.schemas import BudgetPolicy, PolicyFile
from tests.unit.test_otlp_receiver import chat_span, export_request

pytestmark = pytest.mark.integration

wait_for = pipeline.wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def fetch(url: str, token: str | None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def scrape(url: str, token: str) -> Samples:
    status, text = fetch(url, token)
    assert status == 200, text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_every_service_serves_metrics_that_follow_the_traffic(stack: Stack) -> None:
    settings = stack.settings
    token = settings.api_token_value()
    urls = {
        "processor": f"http://127.0.0.1:{settings.processor_port}/metrics",
        "sink": f"http://127.0.0.1:{settings.sink_port}/metrics",
        "dashboard": f"http://127.0.0.1:{settings.dashboard_port}/metrics",
        "otlp": f"http://127.0.0.1:{settings.otlp_port}/metrics",
    }
    for name, url in urls.items():
        assert fetch(url, None)[0] == 401, name
        assert fetch(url, "wrong")[0] == 401, name
    before = {name: scrape(url, token) for name, url in urls.items()}
    assert total(before["processor"], "agentledger_events_processed_total") == 0
    assert total(before["sink"], "agentledger_sink_rows_inserted_total") == 0

    apply_policies(
        settings,
        # On the OTLP-ingested agent (service.name): shim calls of a budgeted scope would need
        # allowances, which a $0.001 budget cannot grant a gpt-4o reservation.
        PolicyFile(budgets=[BudgetPolicy(scope="agent:research-svc", limit_usd=Decimal("0.001"))]),
    )
    ledger = Ledger(settings)
    try:
        agent = ledger.agent("m-runaway", workflow="wf-metrics")
        for _ in range(5):
            with agent.call(provider="openai", model="gpt-4o") as call:
                call.record(input_tokens=400, output_tokens=100)
        assert ledger.transport.flush(10) == 0
    finally:
        ledger.close()
    # Three spans through the receiver (one of them not a GenAI span).
    receiver_url = f"http://127.0.0.1:{settings.otlp_port}/v1/traces"
    spans = [chat_span(1), chat_span(2)]
    for span in spans:
        span.attributes.add(key="gen_ai.conversation.id").value.string_value = "wf-metrics"
        # Today, so the spend counts toward today's budget.
        span.start_time_unix_nano = time.time_ns()
        span.end_time_unix_nano = span.start_time_unix_nano + 250_000_000
    plain = chat_span(3)
    del plain.attributes[:]
    body = export_request([*spans, plain]).SerializeToString()
    request = urllib.request.Request(
        receiver_url,
        data=body,
        headers={"Content-Type": "application/x-protobuf"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    # One record no component can read.
    producer = Producer({"bootstrap.servers": settings.kafka})
    producer.produce(settings.topics.calls, b"not json", b"m-bad")
    assert producer.flush(10) == 0
    del producer
    # One operator command through the dashboard.
    command = urllib.request.Request(
        f"http://127.0.0.1:{settings.dashboard_port}/api/control",
        data=json.dumps({"scope": "agent:m-operated", "action": "stop"}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    with urllib.request.urlopen(command, timeout=30) as response:
        assert response.status == 200

    def settled(name: str, check: Callable[[Samples], bool]) -> Samples:
        last: list[Samples] = []

        def probe() -> Samples | None:
            samples = scrape(urls[name], token)
            last[:] = [samples]
            return samples if check(samples) else None

        try:
            return wait_for(f"the {name} metrics", probe)
        except AssertionError as exc:
            interesting = {k: v for k, v in last[0].items() if "bucket" not in k[0]}
            raise AssertionError(f"{exc}; last scrape: {interesting}") from None

    processor = settled(
        "processor",
        lambda s: (
            value(s, "agentledger_events_processed_total", topic=settings.topics.calls) >= 8
            and value(s, "agentledger_dlq_records_total", reason="invalid_event") >= 1
            and value(s, "agentledger_commands_published_total", action="stop") >= 1
        ),
    )
    # 5 shim calls, 2 OTLP calls and the bad record were delivered; one STOP was decided.
    assert value(processor, "agentledger_events_processed_total", topic=settings.topics.calls) == 8
    assert value(processor, "agentledger_dlq_records_total", reason="invalid_event") == 1
    assert value(processor, "agentledger_commands_published_total", action="stop") == 1
    assert value(processor, "agentledger_enforcement_latency_seconds_count") == 1
    assert value(processor, "agentledger_alerts_raised_total", kind="threshold") >= 1
    assert value(processor, "agentledger_last_batch_timestamp_seconds") > 0
    # The data plane refreshes the lag every few seconds; once it has, every calls partition
    # is listed and nothing is left to process.
    settled(
        "processor",
        lambda s: (
            sum(
                1
                for (n, labels), _ in s.items()
                if n == "agentledger_consumer_lag_records"
                and ("topic", settings.topics.calls) in labels
            )
            == settings.calls_partitions
            and total(s, "agentledger_consumer_lag_records") == 0
        ),
    )

    sink = settled(
        "sink",
        lambda s: (
            # The STOP and the alert come a moment after the calls: wait for every row.
            value(s, "agentledger_sink_rows_inserted_total") >= 10
            and value(s, "agentledger_dlq_records_total", reason="invalid_record") >= 1
        ),
    )
    # Every table the sink writes: 7 calls, 2 control commands (the processor's STOP and the
    # operator's) and 1 alert.
    assert value(sink, "agentledger_sink_rows_inserted_total") == 10
    assert value(sink, "agentledger_dlq_records_total", reason="invalid_record") == 1
    assert value(sink, "agentledger_sink_insert_seconds_count") >= 1
    assert value(sink, "agentledger_sink_retrying") == 0

    otlp = scrape(urls["otlp"], token)
    assert value(otlp, "agentledger_otlp_spans_total", outcome="accepted") == 2
    assert value(otlp, "agentledger_otlp_spans_total", outcome="not_genai") == 1
    assert value(otlp, "agentledger_events_processed_total") == 2
    assert value(otlp, "agentledger_otlp_requests_total", code="200") == 1

    dashboard = scrape(urls["dashboard"], token)
    assert (
        value(
            dashboard,
            "agentledger_dashboard_operator_commands_total",
            action="stop",
            outcome="published",
        )
        == 1
    )
    assert value(dashboard, "agentledger_dashboard_sse_clients") == 0
    assert value(dashboard, "agentledger_dashboard_snapshot_version") >= value(
        before["dashboard"], "agentledger_dashboard_snapshot_version"
    )
