"""Shared fixtures. Integration tests run against a real Kafka broker started here once per
session (or AGENTLEDGER_TEST_KAFKA), each test on its own topic prefix, so tests never see each
other's data."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings as hypothesis_settings
from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.deploy import KafkaBroker
from agentledger.schemas.topic_specs import topic_specs
from agentledger.topic_admin import ensure_topics

if TYPE_CHECKING:
    from tests.unit.test_producer_sdk import FakeApi

TEST_CONTROL_KEY = "test-control-key-0123456789abcdef"

# Hypothesis' per-example deadline is a timing assertion: on a loaded 2-core CI machine a
# correct example can take longer than 200 ms. Speed lives in the benchmarks.
hypothesis_settings.register_profile("agentledger", deadline=None)
hypothesis_settings.load_profile("agentledger")


def docker_reachable() -> bool:
    """A Docker engine answers on DOCKER_HOST (or the default unix socket)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return True  # a remote engine: let testcontainers try it
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(host.removeprefix("unix://"))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("AGENTLEDGER_TEST_KAFKA")
    if external:
        yield external
        return
    if shutil.which("java") is None and docker_reachable():
        # No JVM to run the Maven-fetched broker, but a Docker engine: use a container broker.
        # (Our build machines have Java and no Docker engine, so this branch runs only on
        # contributors' machines.)
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    broker = KafkaBroker(
        state_dir=tmp_path_factory.mktemp("kafka"),
        port=free_port(),
        controller_port=free_port(),
        jar_dir=Path(os.environ["AGENTLEDGER_KAFKA_JARS"])
        if "AGENTLEDGER_KAFKA_JARS" in os.environ
        else None,
    )
    broker.start(timeout_s=120)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def settings_factory(tmp_path: Path) -> SettingsFactory:
    """Settings isolated per test: own state dir, own topic prefix, a fixed control key."""

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "home": tmp_path / "home",
            "topic_prefix": f"t{uuid.uuid4().hex[:10]}.",
            "control_key": SecretStr(TEST_CONTROL_KEY),
            "api_token": SecretStr("test-api-token"),
            "processor_port": free_port(),
            "sink_port": free_port(),
            "dashboard_port": free_port(),
            "otlp_port": free_port(),
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def stack_settings(kafka_bootstrap: str, settings_factory: SettingsFactory) -> Settings:
    """Settings pointing at the session broker, with this test's topics created."""
    settings = settings_factory(kafka=kafka_bootstrap)
    ensure_topics(kafka_bootstrap, topic_specs(settings.topics))
    return settings


@pytest.fixture
def api() -> Iterator[FakeApi]:
    """The loopback fake of the OpenAI HTTP API (chat completions and responses)."""
    # Imported here: it pulls in the SDKs, which most tests do not need.
    from tests.unit.test_producer_sdk import FakeApi

    fake = FakeApi()
    yield fake
    fake.close()
