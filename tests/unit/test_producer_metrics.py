"""The shim's opt-in Prometheus exporter: a scrape (with the bearer token) parsed with
prometheus-client's parser follows the ledger's calls, refusals and control verification."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentledger.producers import BudgetExceeded
from agentledger.producers.metrics import serve_metrics
from agentledger.schemas import ControlAction
from tests.conftest import free_port
from tests.unit.test_producer_ledger import Harness


def scrape(port: int, token: str | None) -> tuple[int, dict[tuple[str, str], float]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, {}
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[(sample.name, label)] = sample.value
    return 200, found


def test_the_exporter_follows_calls_refusals_and_commands(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    token = h.settings.api_token_value()
    server = serve_metrics(h.ledger, port=free_port())
    try:
        assert scrape(server.port, None)[0] == 401
        assert scrape(server.port, "wrong")[0] == 401
        status, before = scrape(server.port, token)
        assert status == 200
        assert before[("agentledger_shim_calls_total", "")] == 0
        agent = h.ledger.agent("a")
        for _ in range(3):
            with agent.call(provider="openai", model="gpt-4o") as call:
                call.record(input_tokens=10, output_tokens=5)
        h.publish("agent:a", ControlAction.STOP)
        with pytest.raises(BudgetExceeded), agent.call(provider="openai", model="gpt-4o"):
            pass
        _, after = scrape(server.port, token)
        assert after[("agentledger_shim_calls_total", "")] == 3
        assert after[("agentledger_shim_refusals_total", "reason=stop")] == 1
        assert after[("agentledger_shim_refusals_total", "reason=local_reservation")] == 0
        assert after[("agentledger_shim_control_commands_total", "outcome=accepted")] == 1
        assert after[("agentledger_shim_spooled_events_total", "")] == 0
    finally:
        server.close()


def test_metrics_open_needs_no_token(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.ledger.settings = h.settings.model_copy(update={"metrics_open": True})
    server = serve_metrics(h.ledger, port=free_port())
    try:
        assert scrape(server.port, None)[0] == 200
    finally:
        server.close()


def test_the_extra_metrics_listener_serves_a_registry_only_when_configured(
    tmp_path: Path,
) -> None:
    from prometheus_client import CollectorRegistry, Counter

    from agentledger.metrics import metrics_listener

    h = Harness(tmp_path)
    registry = CollectorRegistry()
    Counter("agentledger_probe", "a probe", registry=registry).inc(3)
    assert metrics_listener(h.settings, registry) is None  # AGENTLEDGER_METRICS_PORT unset
    settings = h.settings.model_copy(update={"metrics_port": free_port()})
    server = metrics_listener(settings, registry)
    assert server is not None
    try:
        token = settings.api_token_value()
        assert scrape(server.port, None)[0] == 401
        status, found = scrape(server.port, token)
        assert status == 200 and found[("agentledger_probe_total", "")] == 3
    finally:
        server.close()
