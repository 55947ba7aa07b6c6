"""The deployment files are parsed and validated: the compose file against the compose-spec
JSON schema (vendored in check-jsonschema, Apache-2.0), every Kubernetes manifest against the
Kubernetes OpenAPI schemas shipped in kubernetes-validate (offline, strict: unknown fields fail).
Beyond the schemas, the pieces the deployment needs are checked to be there and consistent."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).parents[2] / "deploy"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
K8S_VERSION = "1.32.0"
IMAGE = "agentledger:dev"


def compose_schema() -> dict[str, Any]:
    # Read as data through the distribution's file list: importing check_jsonschema would load
    # its click CLI, which needs a newer click than faust allows.
    files = importlib.metadata.distribution("check-jsonschema").files or []
    path = next(f for f in files if str(f).endswith("builtin_schemas/vendor/compose-spec.json"))
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def compose_errors(document: Any) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(document)]


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    assert compose_errors(compose()) == []


def test_the_compose_schema_check_does_catch_a_bad_file() -> None:
    broken = copy.deepcopy(compose())
    broken["services"]["sink"]["enviroment"] = {"A": "b"}
    broken["services"]["processor"]["ports"] = "6066"
    errors = compose_errors(broken)
    assert any("enviroment" in e for e in errors), errors
    assert any("ports" in e for e in errors), errors


def test_compose_runs_every_piece_on_loopback_ports() -> None:
    services = compose()["services"]
    assert {"kafka-1", "kafka-2", "kafka-3", "clickhouse", "processor", "sink", "dashboard"} <= set(
        services
    )
    commands = {name: s.get("command", []) for name, s in services.items()}
    assert commands["processor"][-1] == "agentledger.stream_processors"
    assert commands["sink"][-1] == "agentledger.sinks"
    assert commands["dashboard"][-1] == "agentledger.dashboard"
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published)
    assert "127.0.0.1:6068:6068" in published
    # Workers that serve on 127.0.0.1 share the processor's network namespace.
    for name in ("processor-2", "sink", "dashboard"):
        assert services[name]["network_mode"] == "service:processor"


def test_compose_kafka_nodes_form_one_replicated_cluster() -> None:
    services = compose()["services"]
    nodes = [services[f"kafka-{i}"]["environment"] for i in (1, 2, 3)]
    assert [n["KAFKA_NODE_ID"] for n in nodes] == ["1", "2", "3"]
    assert len({n["CLUSTER_ID"] for n in nodes}) == 1
    assert {n["KAFKA_MIN_INSYNC_REPLICAS"] for n in nodes} == {"2"}
    assert {n["KAFKA_DEFAULT_REPLICATION_FACTOR"] for n in nodes} == {"3"}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, document)
        for path in MANIFESTS
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifest_is_valid(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert documents, f"{path} holds no resource"
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_the_kubernetes_check_does_catch_a_bad_manifest() -> None:
    deployment = next(d for _, d in manifests() if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_workers_scale_by_replicas_with_health_probes() -> None:
    deployments = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "Deployment"}
    for name in ("agentledger-processor", "agentledger-sink"):
        spec = deployments[name]["spec"]
        assert spec["replicas"] >= 2
        for container in spec["template"]["spec"]["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                command = " ".join(container[probe]["exec"]["command"])
                port = next(e["value"] for e in container["env"] if e["name"].endswith("_PORT"))
                assert f"http://127.0.0.1:{port}/health" in command
    console = deployments["agentledger-console"]["spec"]["template"]["spec"]["containers"]
    assert {c["name"] for c in console} == {"dashboard", "processor", "sink"}


def test_kafka_statefulset_is_three_nodes() -> None:
    kafka = next(
        d for _, d in manifests() if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "kafka"
    )
    assert kafka["spec"]["replicas"] == 3
    env = {
        e["name"]: e.get("value") for e in kafka["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].count("@") == 3
    assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"


SASL_OVERRIDE = DEPLOY / "compose" / "docker-compose.sasl.yml"


def merged_with_sasl() -> dict[str, Any]:
    """The compose file with the SASL override applied (environment maps merge per key)."""
    merged = compose()
    override: dict[str, Any] = yaml.safe_load(SASL_OVERRIDE.read_text())
    for name, service in override["services"].items():
        merged["services"][name]["environment"].update(service["environment"])
    return merged


def test_sasl_override_is_valid_alone_and_merged() -> None:
    assert compose_errors(yaml.safe_load(SASL_OVERRIDE.read_text())) == []
    assert compose_errors(merged_with_sasl()) == []


def test_sasl_override_gives_every_worker_settings_that_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agentledger.config import Settings

    services = merged_with_sasl()["services"]
    for name in ("topics", "processor", "processor-2", "sink", "dashboard"):
        for key, value in services[name]["environment"].items():
            # compose would substitute ${VAR:?...} from the environment
            monkeypatch.setenv(key, re.sub(r"\$\{[^}]*\}", "secret-from-env", str(value)))
        settings = Settings()
        assert settings.kafka_client_config()["security.protocol"] == "sasl_plaintext"
        assert settings.kafka_client_config()["sasl.username"] == "agentledger"
        assert settings.kafka.count(",") == 2
    brokers = [services[f"kafka-{i}"]["environment"] for i in (1, 2, 3)]
    assert {b["KAFKA_INTER_BROKER_LISTENER_NAME"] for b in brokers} == {"SASL_PLAINTEXT"}
    assert [b["KAFKA_ADVERTISED_LISTENERS"] for b in brokers] == [
        f"SASL_PLAINTEXT://kafka-{i}:9092" for i in (1, 2, 3)
    ]


def test_dockerfile_parses_and_runs_as_a_non_root_user() -> None:
    # The `dockerfile` package wraps Docker's own (Go) parser.
    import dockerfile

    commands = dockerfile.parse_file(str(DEPLOY / "Dockerfile"))
    by_cmd = {c.cmd: c for c in commands}
    assert commands[0].cmd == "FROM"
    assert by_cmd["USER"].value == ("10001",)
    assert "'.[all]'" in by_cmd["RUN"].value[0]
    assert by_cmd["CMD"].json and by_cmd["CMD"].value[-1] == "agentledger.stream_processors"
    # Every service the compose file and the manifests run is a module of this one image.
    modules = {
        s["command"][-1]
        for s in compose()["services"].values()
        if "command" in s and s.get("image") == IMAGE
    }
    for _, document in manifests():
        pod = document.get("spec", {}).get("template", {}).get("spec", {})
        modules |= {c["command"][-1] for c in pod.get("containers", []) if c["image"] == IMAGE}
    import importlib.util

    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
