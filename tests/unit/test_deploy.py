"""Scale-out configuration without a broker: the cluster's node layout and properties, topic
replication, the workers `up` would start, and the Kafka/ClickHouse security settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr, ValidationError

from agentledger.cli import _parser, up_settings
from agentledger.config import Settings
from agentledger.deploy.kafka_broker import KafkaCluster
from agentledger.deploy.stack import Stack, StackError, default_processors, worker_ports
from agentledger.schemas.topic_specs import DEFAULT_CALLS_PARTITIONS, replication_for, topic_specs


def props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_a_three_node_cluster_has_distinct_ports_dirs_and_one_static_quorum(
    tmp_path: Path,
) -> None:
    cluster = KafkaCluster(tmp_path, size=3, port=19092, controller_port=19093)
    nodes = [props(b._properties()) for b in cluster.brokers]
    assert [n["node.id"] for n in nodes] == ["1", "2", "3"]
    assert [n["listeners"] for n in nodes] == [
        f"PLAINTEXT://127.0.0.1:{p},CONTROLLER://127.0.0.1:{p + 1}" for p in (19092, 19094, 19096)
    ]
    voters = "1@127.0.0.1:19093,2@127.0.0.1:19095,3@127.0.0.1:19097"
    assert {n["controller.quorum.voters"] for n in nodes} == {voters}
    assert len({n["log.dirs"] for n in nodes}) == 3
    for n in nodes:
        assert n["offsets.topic.replication.factor"] == "3"
        assert n["transaction.state.log.min.isr"] == "2"
        assert n["min.insync.replicas"] == "2"
    assert cluster.bootstrap == "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"
    # One cluster id for all nodes, kept across restarts of the stack.
    ids = {b.cluster_id for b in cluster.brokers}
    assert len(ids) == 1 and None not in ids
    again = KafkaCluster(tmp_path, size=3, port=19092, controller_port=19093)
    assert {b.cluster_id for b in again.brokers} == ids


def test_a_single_node_cluster_is_the_old_single_broker(tmp_path: Path) -> None:
    (broker,) = KafkaCluster(tmp_path, size=1, port=9092, controller_port=9093).brokers
    node = props(broker._properties())
    assert broker.state_dir == tmp_path
    assert node["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert node["offsets.topic.replication.factor"] == "1"
    assert node["min.insync.replicas"] == "1"


def test_overlapping_broker_and_controller_ports_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ports overlap"):
        KafkaCluster(tmp_path, size=3, port=9092, controller_port=9094)


@pytest.mark.parametrize(
    ("brokers", "expected"), [(1, (1, 1)), (2, (2, 2)), (3, (3, 2)), (5, (3, 2))]
)
def test_replication_follows_the_cluster_size(brokers: int, expected: tuple[int, int]) -> None:
    assert replication_for(brokers) == expected


def test_worker_ports_step_by_ten_and_stay_in_range() -> None:
    assert worker_ports(6066, 3) == [6066, 6076, 6086]
    with pytest.raises(ValueError, match="past port 65535"):
        worker_ports(65530, 2)


def test_stack_runs_n_processors_and_m_sinks_on_their_own_ports(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        processors=2,
        sinks=2,
        clickhouse=SecretStr("http://ch.example:8123"),
        processor_port=7000,
        sink_port=7001,
    )
    stack = Stack(settings, progress=lambda _m: None)
    singles = {"agentledger.dashboard", "agentledger.otlp"}
    workers = [s for s in stack.services if s.module not in singles]
    assert [(s.name, s.port, s.env_port) for s in workers] == [
        ("processor", 7000, "AGENTLEDGER_PROCESSOR_PORT"),
        ("processor-2", 7010, "AGENTLEDGER_PROCESSOR_PORT"),
        ("sink", 7001, "AGENTLEDGER_SINK_PORT"),
        ("sink-2", 7011, "AGENTLEDGER_SINK_PORT"),
    ]


def test_more_than_one_sink_on_embedded_chdb_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"2 sink workers need a ClickHouse server.*chDB"):
        Stack(Settings(home=tmp_path, sinks=2), progress=lambda _m: None)


def test_down_after_a_scaled_up_finds_every_node_and_worker(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    shape = {"kafka_brokers": 3, "processors": 2, "sinks": 1}
    (tmp_path / "run" / "stack.json").write_text(json.dumps(shape))
    stack = Stack(Settings(home=tmp_path), progress=lambda _m: None)
    assert len(stack.cluster.brokers) == 3
    names = [s.name for s in stack.services]
    assert names == ["processor", "processor-2", "sink", "dashboard", "otlp"]
    assert stack.bootstrap.count(",") == 2
    # Flags given explicitly win over the recorded shape.
    explicit = Stack(Settings(home=tmp_path, kafka_brokers=1), progress=lambda _m: None)
    assert len(explicit.cluster.brokers) == 1


def test_a_worker_process_is_not_told_to_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTLEDGER_PROCESSORS", "3")
    stack = Stack(Settings(home=tmp_path), progress=lambda _m: None)
    assert sum(s.module == "agentledger.stream_processors" for s in stack.services) == 3
    assert "AGENTLEDGER_PROCESSORS" not in stack.child_env()


def test_up_flags_parse_and_reject_nonsense(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["up", "--brokers", "3", "--processors", "2", "--sinks", "1"])
    assert (args.brokers, args.processors, args.sinks, args.partitions) == (3, 2, 1, None)
    with pytest.raises(SystemExit):
        _parser().parse_args(["up", "--brokers", "0"])
    assert "expected a whole number from 1 to 64, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("cores", "partitions", "expected"),
    [(2, 12, 2), (1, 12, 1), (0, 12, 1), (8, 6, 6), (128, 1024, 64)],
)
def test_default_processors_are_the_cores_within_the_partitions_and_the_bound(
    cores: int | None, partitions: int, expected: int
) -> None:
    assert default_processors(partitions, cores) == expected


def test_default_processors_ask_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert default_processors(12) == 3
    monkeypatch.setattr("os.cpu_count", lambda: None)  # the platform cannot tell
    assert default_processors(12) == 1


def _up(tmp_path: Path, *argv: str) -> Settings:
    return up_settings(Settings(home=tmp_path), _parser().parse_args(["up", *argv]))


def test_up_runs_one_processor_per_core_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTLEDGER_PROCESSORS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    fresh = _up(tmp_path)
    assert fresh.processors == 3
    stack = Stack(fresh, progress=lambda _m: None)
    assert [s.name for s in stack.services if s.module == "agentledger.stream_processors"] == [
        "processor",
        "processor-2",
        "processor-3",
    ]
    assert _up(tmp_path, "--processors", "1").processors == 1
    assert _up(tmp_path, "--partitions", "2").processors == 2  # no more than the partitions
    monkeypatch.setenv("AGENTLEDGER_PROCESSORS", "2")
    assert _up(tmp_path).processors == 2


def test_up_again_keeps_the_recorded_processor_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTLEDGER_PROCESSORS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    (tmp_path / "run").mkdir()
    shape = {"kafka_brokers": 3, "processors": 1, "sinks": 1}
    (tmp_path / "run" / "stack.json").write_text(json.dumps(shape))
    again = Stack(_up(tmp_path), progress=lambda _m: None)
    assert (again.settings.processors, again.settings.kafka_brokers) == (1, 3)
    assert (
        Stack(_up(tmp_path, "--processors", "2"), progress=lambda _m: None).settings.processors == 2
    )


def test_plaintext_kafka_needs_no_credentials() -> None:
    settings = Settings()
    assert settings.kafka_client_config() == {"security.protocol": "plaintext"}
    assert settings.faust_credentials() is None


def test_sasl_ssl_settings_become_librdkafka_and_faust_config(tmp_path: Path) -> None:
    settings = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc",
        kafka_sasl_password=SecretStr("s3cret"),
        kafka_ssl_ca_file=tmp_path / "ca.pem",
    )
    assert settings.kafka_client_config() == {
        "security.protocol": "sasl_ssl",
        "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "svc",
        "sasl.password": "s3cret",
        "ssl.ca.location": str(tmp_path / "ca.pem"),
    }
    assert "s3cret" not in repr(settings)


def test_faust_gets_sasl_credentials_with_tls() -> None:
    import faust

    settings = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="svc",
        kafka_sasl_password=SecretStr("s3cret"),
    )
    credentials = settings.faust_credentials()
    assert isinstance(credentials, faust.SASLCredentials)
    assert str(credentials.protocol.value) == "SASL_SSL"
    assert str(credentials.mechanism.value) == "SCRAM-SHA-256"


def test_sasl_without_a_password_names_the_missing_settings() -> None:
    with pytest.raises(ValidationError, match="AGENTLEDGER_KAFKA_SASL_PASSWORD"):
        Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="svc")


def test_clickhouse_credentials_and_tls_are_folded_into_the_dsn(tmp_path: Path) -> None:
    settings = Settings(
        clickhouse=SecretStr("https://ch.example:8443/ledger?compress=lz4"),
        clickhouse_username="writer",
        clickhouse_password=SecretStr("p@ss:word"),
        clickhouse_ca_file=tmp_path / "ca.pem",
    )
    parts = urlsplit(settings.clickhouse_dsn)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == (
        "https",
        "ch.example",
        8443,
        "/ledger",
    )
    assert (parts.username, parts.password) == ("writer", "p%40ss%3Aword")
    assert parse_qs(parts.query) == {"compress": ["lz4"], "ca_cert": [str(tmp_path / "ca.pem")]}
    assert "p@ss" not in repr(settings)


def test_clickhouse_dsn_keeps_its_own_credentials_when_settings_give_none() -> None:
    settings = Settings(clickhouse=SecretStr("http://u:pw@127.0.0.1:8123"))
    assert settings.clickhouse_dsn == "http://u:pw@127.0.0.1:8123"


def test_a_clickhouse_dsn_with_an_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match=r"chdb://<path> or http\(s\)://"):
        _ = Settings(clickhouse=SecretStr("tcp://ch:9000")).clickhouse_dsn


def test_a_cluster_name_needs_a_clickhouse_server() -> None:
    with pytest.raises(ValidationError, match="clickhouse_cluster needs a ClickHouse server"):
        Settings(clickhouse_cluster="agentledger")
    ok = Settings(clickhouse_cluster="agentledger", clickhouse=SecretStr("https://ch:8443"))
    assert ok.clickhouse_cluster == "agentledger"


def test_aiokafka_clients_accept_the_sasl_ssl_options() -> None:
    import asyncio
    import ssl

    from aiokafka import AIOKafkaConsumer

    settings = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc",
        kafka_sasl_password=SecretStr("s3cret"),
    )
    options = settings.aiokafka_options()
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert {k: v for k, v in options.items() if k != "ssl_context"} == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "s3cret",
    }

    async def build() -> None:
        # aiokafka checks the combination when the client is built, before any connection.
        consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", **options)  # type: ignore[arg-type]
        try:
            assert consumer._client._security_protocol == "SASL_SSL"
        finally:
            await consumer.stop()

    asyncio.run(build())
    assert Settings().aiokafka_options() == {"security_protocol": "PLAINTEXT"}


def test_only_a_bootstrap_matching_our_cluster_is_ours_to_run(tmp_path: Path) -> None:
    def manages(**values: object) -> bool:
        settings = Settings(home=tmp_path, **values)  # type: ignore[arg-type]
        return Stack(settings, progress=lambda _m: None).manages_kafka

    assert manages(kafka="127.0.0.1:9092")
    assert manages(kafka="127.0.0.1:9092", kafka_brokers=3)
    assert manages(kafka="127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096", kafka_brokers=3)
    # Two loopback brokers the user runs, or any remote host: not ours.
    assert not manages(kafka="127.0.0.1:9092,127.0.0.1:9094")
    assert not manages(kafka="kafka-1:9092", kafka_brokers=3)


def test_the_processor_and_the_sink_import_no_deploy_module() -> None:
    """The topic contracts live outside deploy/ so the services do not depend on it."""
    probe = (
        "import sys, agentledger.stream_processors.app, agentledger.sinks.service, "
        "agentledger.topic_admin; "
        "print(sorted(m for m in sys.modules if m.startswith('agentledger.deploy')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_a_new_calls_topic_has_room_for_twelve_workers_and_requests_follow_it() -> None:
    settings = Settings()
    assert settings.calls_partitions == DEFAULT_CALLS_PARTITIONS >= 12
    for specs in (topic_specs(settings.topics), topic_specs(settings.topics, 24)):
        sizes = {spec.name: spec.partitions for spec in specs}
        assert sizes[settings.topics.calls] >= 12
        assert sizes[settings.topics.allowance_requests] == sizes[settings.topics.calls]
