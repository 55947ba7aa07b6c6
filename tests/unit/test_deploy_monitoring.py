"""The monitoring files of deploy/ are parsed and cross-checked, as test_deploy_files.py does for
the others: alert rules and dashboard queries parse as PromQL (promql-parser, the Rust parser
the Prometheus ecosystem's tools use) and name only metrics the services really export; the
compose scrape config, the Kubernetes Services, ServiceMonitor and PrometheusRule agree with
the workers' metrics ports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import CollectorRegistry

from agentledger.dashboard.metrics import DashboardMetrics
from agentledger.otlp import ReceiverMetrics
from agentledger.producers.metrics import shim_registry
from agentledger.sinks.metrics import sink_registry
from agentledger.sinks.worker import SinkStats
from agentledger.stream_processors.metrics import ProcessorMetrics
from tests.unit.test_deploy_files import DEPLOY, compose, compose_errors, manifests
from tests.unit.test_producer_ledger import Harness

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yml"
BOARD = DEPLOY / "grafana" / "agentledger.json"
MONITORING = DEPLOY / "k8s" / "monitoring"
METRIC = re.compile(r"\bagentledger_[a-z_]+\b")
SEVERITIES = {"info", "warning", "critical"}


def exported_names(tmp_path: Path) -> set[str]:
    """Every series name the services can export (families and their samples)."""
    registries: list[CollectorRegistry] = [
        ProcessorMetrics().registry,
        sink_registry(SinkStats(last_commit_ms=1)),
        DashboardMetrics(lambda: (1, {"now_ms": 1}), lambda: 2).registry,
        shim_registry(Harness(tmp_path).ledger),
    ]
    receiver = CollectorRegistry()
    ReceiverMetrics(receiver)
    registries.append(receiver)
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
            if family.type == "counter":
                names.add(family.name + "_total")
            if family.type == "histogram":
                names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    return names


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def board() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(BOARD.read_text())
    return document


def board_exprs() -> list[str]:
    return [t["expr"] for p in board()["panels"] for t in p["targets"]]


def test_alert_rules_parse_and_cover_lag_dlq_latency_and_stalls() -> None:
    found = rules()
    names = [r["alert"] for r in found]
    assert len(set(names)) == len(names)
    for rule in found:
        promql_parser.parse(rule["expr"])
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule
        assert rule["labels"]["severity"] in SEVERITIES
        assert rule["annotations"]["summary"]
    exprs = {r["alert"]: r["expr"] for r in found}
    assert "agentledger_consumer_lag_records" in exprs["AgentledgerConsumerLagHigh"]
    assert "agentledger_dlq_records_total" in exprs["AgentledgerDlqRate"]
    assert (
        "agentledger_enforcement_latency_seconds_bucket"
        in exprs["AgentledgerEnforcementLatencyHigh"]
    )
    assert "agentledger_last_batch_timestamp_seconds" in exprs["AgentledgerWorkerStalled"]


def test_the_promql_check_does_catch_a_bad_expression() -> None:
    with pytest.raises(ValueError):
        promql_parser.parse("sum by (job (rate(agentledger_dlq_records_total[5m]))")


def test_rules_and_dashboard_name_only_exported_metrics(tmp_path: Path) -> None:
    exported = exported_names(tmp_path)
    used = {m for r in rules() for m in METRIC.findall(r["expr"])}
    used |= {m for e in board_exprs() for m in METRIC.findall(e)}
    assert used and used <= exported, sorted(used - exported)
    # The list, at least.
    for name in (
        "agentledger_events_processed_total",
        "agentledger_consumer_lag_records",
        "agentledger_dlq_records_total",
        "agentledger_commands_published_total",
        "agentledger_enforcement_latency_seconds_bucket",
        "agentledger_sink_rows_inserted_total",
        "agentledger_sink_insert_seconds_bucket",
        "agentledger_shim_calls_total",
        "agentledger_shim_refusals_total",
        "agentledger_shim_spooled_events_total",
        "agentledger_shim_control_commands_total",
    ):
        assert name in exported, name


def test_grafana_dashboard_is_well_formed() -> None:
    document = board()
    assert document["uid"] and document["schemaVersion"] >= 36
    ids = [p["id"] for p in document["panels"]]
    assert len(set(ids)) == len(ids)
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in document["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs)
        for target in panel["targets"]:
            # Grafana substitutes $__rate_interval before Prometheus sees the query.
            promql_parser.parse(target["expr"].replace("$__rate_interval", "1m"))
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24


def test_compose_scrapes_every_worker_with_the_token_and_loads_rules_and_board() -> None:
    document = compose()
    assert compose_errors(document) == []
    services = document["services"]
    ports = {
        name: service["environment"]["AGENTLEDGER_METRICS_PORT"]
        for name, service in services.items()
        if "AGENTLEDGER_METRICS_PORT" in service.get("environment", {})
    }
    assert set(ports) == {"processor", "processor-2", "sink", "dashboard", "otlp"}
    assert len(set(ports.values())) == len(ports)  # one network namespace
    scrape = yaml.safe_load(SCRAPE.read_text())
    targets = {
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    assert targets == {f"processor:{port}" for port in ports.values()}
    secret = "/run/secrets/agentledger_api_token"
    assert all(j["authorization"]["credentials_file"] == secret for j in scrape["scrape_configs"])
    assert document["secrets"]["agentledger_api_token"]["environment"] == "AGENTLEDGER_API_TOKEN"
    prometheus = services["prometheus"]
    assert "agentledger_api_token" in prometheus["secrets"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"] if ":/" in v}
    compose_dir = DEPLOY / "compose"
    assert (compose_dir / mounts["/etc/prometheus/prometheus.yml"]).resolve() == SCRAPE
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert (compose_dir / mounts["/etc/prometheus/alerts.yml"]).resolve() == ALERTS
    grafana = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert (compose_dir / grafana["/var/lib/grafana/dashboards"]).resolve() == BOARD.parent
    provider = yaml.safe_load((BOARD.parent / "provisioning" / "dashboards.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((BOARD.parent / "provisioning" / "datasources.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    otlp = services["otlp"]
    assert otlp["command"][-1] == "agentledger.otlp"
    # Bound beyond loopback, so the receiver requires the API token.
    assert otlp["environment"]["AGENTLEDGER_OTLP_HOST"] == "0.0.0.0"


def crds() -> list[dict[str, Any]]:
    return [
        d
        for path in sorted(MONITORING.glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]


def test_prometheusrule_holds_the_same_rules() -> None:
    [rule] = [d for d in crds() if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())


def test_servicemonitor_reaches_every_metrics_port_of_every_worker() -> None:
    [monitor] = [d for d in crds() if d["kind"] == "ServiceMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoints = {e["port"] for e in monitor["spec"]["endpoints"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["bearerTokenSecret"] == {
            "name": "agentledger",
            "key": "AGENTLEDGER_API_TOKEN",
        }
    resources = [d for _, d in manifests()]
    services = [
        d
        for d in resources
        if d["kind"] == "Service" and selector.items() <= d["metadata"].get("labels", {}).items()
    ]
    deployments = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]: d
        for d in resources
        if d["kind"] == "Deployment"
    }
    scraped: set[str] = set()
    for service in services:
        pod = deployments[service["spec"]["selector"]["app.kubernetes.io/name"]]
        containers = pod["spec"]["template"]["spec"]["containers"]
        named = {p["name"]: (c, p) for c in containers for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            if port["name"] not in endpoints:
                continue
            container, container_port = named[port["targetPort"]]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["AGENTLEDGER_METRICS_HOST"] == "0.0.0.0"
            assert int(env["AGENTLEDGER_METRICS_PORT"]) == container_port["containerPort"]
            scraped.add(f"{pod['metadata']['name']}/{container['name']}")
    assert scraped == {
        "agentledger-processor/processor",
        "agentledger-sink/sink",
        "agentledger-console/dashboard",
        "agentledger-console/processor",
        "agentledger-console/sink",
        "agentledger-otlp/otlp",
    }
