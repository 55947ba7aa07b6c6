"""Settings shared by the CLI, the local stack and the services, read from AGENTLEDGER_* env vars.

This module imports only pydantic-settings and the schemas, so the shim may use it too.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentledger.schemas import Topics

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTLEDGER_", extra="ignore")

    kafka: str = Field(default="127.0.0.1:9092", description="Kafka bootstrap servers")
    clickhouse: SecretStr | None = Field(
        default=None,
        description="ClickHouse DSN (http(s)://user:pass@host:port/db); default: embedded chDB "
        "at <home>/clickhouse. Secret because DSNs carry passwords.",
    )
    home: Path = Field(default=Path(".agentledger"), description="state dir: data, logs, pids")
    topic_prefix: str = Field(default="agentledger.", pattern=r"^[A-Za-z0-9._\-]*$")
    control_key: SecretStr | None = Field(
        default=None, description="HMAC key for control commands; default: <home>/control.key"
    )
    api_token: SecretStr | None = Field(
        default=None, description="bearer token of the local HTTP APIs; default: <home>/api.token"
    )
    kafka_controller_port: int = Field(default=9093, ge=1, le=65535)
    processor_port: int = Field(default=6066, ge=1, le=65535)
    sink_port: int = Field(default=6067, ge=1, le=65535)
    dashboard_port: int = Field(default=6068, ge=1, le=65535)
    kafka_jars: Path | None = Field(
        default=None, description="folder of Kafka broker jars; default: fetched by mvn"
    )
    kafka_heap: str = "512m"

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def kafka_port(self) -> int:
        first = self.kafka.split(",")[0]
        return int(first.rsplit(":", 1)[1])

    @property
    def clickhouse_dsn(self) -> str:
        if self.clickhouse is not None:
            return self.clickhouse.get_secret_value()
        return f"chdb://{(self.home / 'clickhouse').resolve()}"

    @property
    def embedded_clickhouse(self) -> bool:
        return self.clickhouse_dsn.startswith("chdb://")

    def _secret_file(self, name: str) -> bytes:
        """Read, or on first use create (mode 0600), a random secret in the state dir."""
        path = self.home / name
        if path.exists():
            return path.read_text().strip().encode()
        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        value = secrets.token_hex(32)
        with os.fdopen(fd, "w") as out:
            out.write(value + "\n")
        return value.encode()

    def control_key_bytes(self) -> bytes:
        if self.control_key is not None:
            return self.control_key.get_secret_value().encode()
        return self._secret_file("control.key")

    def api_token_value(self) -> str:
        if self.api_token is not None:
            return self.api_token.get_secret_value()
        return self._secret_file("api.token").decode()
