"""Settings shared by the CLI, the local stack and the services, read from AGENTLEDGER_* env vars.

This module imports only pydantic-settings and the schemas, so the shim may use it too.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentledger.schemas import Topics
from agentledger.schemas.topic_specs import DEFAULT_CALLS_PARTITIONS

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
    # -- OTLP receiver and Prometheus metrics (otlp/README.md, README "Metrics") ------------
    otlp_port: int = Field(default=4318, ge=1, le=65535, description="OTLP/HTTP receiver port")
    otlp_host: str = Field(
        default="127.0.0.1",
        description="address the OTLP receiver binds; anything but loopback requires the API "
        "token as a bearer header on /v1/traces",
    )
    otlp_mapping: Path | None = Field(
        default=None,
        description="YAML file overriding the receiver's span-attribute mapping "
        "(otlp/README.md has the defaults)",
    )
    otlp_flush_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="how long an export waits for its events to reach Kafka (or the spool) "
        "before answering 503, which OTLP exporters retry",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="also serve GET /metrics on this port of metrics_host (for a scraper that "
        "cannot reach loopback: another container or pod); default: only on the service's own "
        "loopback API port",
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="address of the metrics_port listener"
    )
    metrics_open: bool = Field(
        default=False,
        description="serve /metrics without the bearer token (for a scraper on a trusted network)",
    )
    alert_webhook_url: SecretStr | None = Field(
        default=None,
        description="http(s) URL the processor POSTs alerts to as Slack-compatible JSON "
        '{"text": ...}; secret because webhook URLs embed their token',
    )
    # -- processor alerting (stream_processors/README.md "Dead-letter rate", "Webhook") -------
    dlq_alert_max: int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        description="dead letters one processor worker may write within dlq_alert_window_s "
        "before a dlq_rate alert",
    )
    dlq_alert_window_s: int = Field(
        default=60, ge=1, le=86_400, description="the sliding window of dlq_alert_max, seconds"
    )
    dlq_alert_cooldown_s: int = Field(
        default=600,
        ge=0,
        le=86_400,
        description="at most one dlq_rate alert per this many seconds while the rate stays high",
    )
    alert_webhook_queue_size: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="alerts waiting for the webhook; when full, new ones are dropped (counted, "
        "logged, still on the alerts topic)",
    )
    alert_webhook_attempts: int = Field(
        default=5, ge=1, le=100, description="POST attempts per alert, the first included"
    )
    alert_webhook_backoff_s: float = Field(
        default=0.5,
        gt=0,
        le=3600,
        description="wait before the second attempt, doubling per attempt",
    )
    alert_webhook_max_backoff_s: float = Field(
        default=30.0, gt=0, le=3600, description="the longest wait between two attempts"
    )
    alert_webhook_timeout_s: float = Field(
        default=5.0, gt=0, le=600, description="timeout of one POST, seconds"
    )
    kafka_jars: Path | None = Field(
        default=None, description="folder of Kafka broker jars; default: fetched by mvn"
    )
    kafka_heap: str = "512m"
    # -- scale-out (deploy/README.md "From one machine to a cluster") -------------------------
    kafka_brokers: int = Field(
        default=1,
        ge=1,
        le=9,
        description="brokers of the local KRaft cluster `up` runs (each broker also a "
        "controller); broker i listens on kafka_port+2i, its controller on +1",
    )
    calls_partitions: int = Field(
        default=DEFAULT_CALLS_PARTITIONS, ge=1, le=1024, description="partitions of calls"
    )
    processors: int = Field(default=1, ge=1, le=64, description="processor workers `up` runs")
    sinks: int = Field(default=1, ge=1, le=64, description="sink workers `up` runs")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="log level of the processor and sink workers"
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_file: Path | None = Field(default=None, description="CA bundle (PEM)")
    kafka_ssl_cert_file: Path | None = Field(default=None, description="client cert (PEM)")
    kafka_ssl_key_file: Path | None = Field(default=None, description="client key (PEM)")
    clickhouse_username: str | None = Field(
        default=None, description="ClickHouse user; overrides the DSN's"
    )
    clickhouse_password: SecretStr | None = None
    clickhouse_ca_file: Path | None = Field(
        default=None, description="CA bundle (PEM) for an https:// ClickHouse"
    )
    clickhouse_verify: bool = Field(default=True, description="verify the server certificate")
    clickhouse_cluster: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_]+$",
        description="ClickHouse cluster name: Replicated engines, ON CLUSTER DDL, *_all "
        "Distributed tables for reads",
    )
    # -- supervision of the local stack (deploy/README.md "Supervision") ----------------------
    allowance_ttl_s: float = Field(
        # Renewed at half of it: a caller making a call every 200 ms then asks once per ~150
        # calls, and a dead process's allowance comes back within a minute.
        default=60.0,
        gt=0,
        le=3600,
        description="unused allowance of a silent shim process is reclaimed after this long",
    )
    supervise_every_s: float = Field(
        default=5.0, gt=0, le=600, description="seconds between two supervisor checks"
    )
    supervise_grace_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="a running component whose /health fails this long is restarted",
    )
    supervise_start_grace_s: float = Field(
        default=180.0,
        gt=0,
        le=3600,
        description="how long a (re)started component may take to become healthy",
    )
    supervise_backoff_max_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="the longest wait between two restarts of one component (doubling from 2 s)",
    )

    @model_validator(mode="after")
    def _check_scale_out(self) -> Settings:
        sasl = self.kafka_security_protocol.startswith("SASL")
        if sasl and (self.kafka_sasl_username is None or self.kafka_sasl_password is None):
            raise ValueError(
                f"kafka_security_protocol={self.kafka_security_protocol} needs "
                "AGENTLEDGER_KAFKA_SASL_USERNAME and AGENTLEDGER_KAFKA_SASL_PASSWORD"
            )
        if self.alert_webhook_max_backoff_s < self.alert_webhook_backoff_s:
            raise ValueError(
                f"alert_webhook_max_backoff_s ({self.alert_webhook_max_backoff_s}) must be at "
                f"least alert_webhook_backoff_s ({self.alert_webhook_backoff_s})"
            )
        if self.clickhouse_cluster is not None and self.embedded_clickhouse:
            raise ValueError(
                "clickhouse_cluster needs a ClickHouse server: set AGENTLEDGER_CLICKHOUSE to an "
                "http(s):// DSN (embedded chDB is a single node)"
            )
        return self

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def kafka_port(self) -> int:
        first = self.kafka.split(",")[0]
        return int(first.rsplit(":", 1)[1])

    @property
    def clickhouse_dsn(self) -> str:
        """The DSN the sink opens; credentials and TLS options from settings are folded in
        (clickhouse-connect reads user, password and query options such as ca_cert from it)."""
        if self.clickhouse is None:
            return f"chdb://{(self.home / 'clickhouse').resolve()}"
        dsn = self.clickhouse.get_secret_value()
        if dsn.startswith("chdb:"):
            return dsn
        parts = urlsplit(dsn)
        if parts.scheme not in {"http", "https"}:
            raise ValueError(
                "AGENTLEDGER_CLICKHOUSE must be chdb://<path> or http(s)://[user:pass@]host:port"
                f"[/db], got scheme {parts.scheme!r}"
            )
        user = self.clickhouse_username or parts.username
        password = (
            self.clickhouse_password.get_secret_value()
            if self.clickhouse_password is not None
            else parts.password
        )
        netloc = parts.hostname or "localhost"
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        if user is not None:
            auth = quote(user, safe="")
            if password is not None:
                auth += ":" + quote(password, safe="")
            netloc = f"{auth}@{netloc}"
        query = parts.query
        extra: dict[str, str] = {}
        if self.clickhouse_ca_file is not None:
            extra["ca_cert"] = str(self.clickhouse_ca_file)
        if not self.clickhouse_verify:
            extra["verify"] = "false"
        if extra:
            query = "&".join(q for q in (query, urlencode(extra)) if q)
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))

    @property
    def embedded_clickhouse(self) -> bool:
        return self.clickhouse_dsn.startswith("chdb://")

    def kafka_client_config(self) -> dict[str, str]:
        """librdkafka (confluent-kafka) security settings; merge into every client's config."""
        config = {"security.protocol": self.kafka_security_protocol.lower()}
        if self.kafka_security_protocol.startswith("SASL"):
            assert self.kafka_sasl_username is not None  # checked by the validator
            assert self.kafka_sasl_password is not None
            config["sasl.mechanisms"] = self.kafka_sasl_mechanism
            config["sasl.username"] = self.kafka_sasl_username
            config["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_security_protocol.endswith("SSL"):
            for key, path in (
                ("ssl.ca.location", self.kafka_ssl_ca_file),
                ("ssl.certificate.location", self.kafka_ssl_cert_file),
                ("ssl.key.location", self.kafka_ssl_key_file),
            ):
                if path is not None:
                    config[key] = str(path)
        return config

    def aiokafka_options(self) -> dict[str, object]:
        """The same security settings as keyword arguments of aiokafka's clients (the
        processor's own AIOKafkaProducer/Consumer besides faust)."""
        options: dict[str, object] = {"security_protocol": self.kafka_security_protocol}
        credentials = self.faust_credentials()
        context = getattr(credentials, "ssl_context", None) or getattr(credentials, "context", None)
        if context is not None:
            options["ssl_context"] = context
        if self.kafka_security_protocol.startswith("SASL"):
            assert self.kafka_sasl_password is not None
            options["sasl_mechanism"] = self.kafka_sasl_mechanism
            options["sasl_plain_username"] = self.kafka_sasl_username
            options["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        return options

    def faust_credentials(self) -> object | None:
        """faust's ``broker_credentials`` for the same settings (None: plaintext). Imports
        faust lazily: this module must stay importable by the shim, which has no faust."""
        if self.kafka_security_protocol == "PLAINTEXT":
            return None
        import ssl

        import faust

        context: ssl.SSLContext | None = None
        if self.kafka_security_protocol.endswith("SSL"):
            context = ssl.create_default_context(
                purpose=ssl.Purpose.SERVER_AUTH,
                cafile=str(self.kafka_ssl_ca_file) if self.kafka_ssl_ca_file else None,
            )
            if self.kafka_ssl_cert_file is not None:
                context.load_cert_chain(
                    str(self.kafka_ssl_cert_file),
                    str(self.kafka_ssl_key_file) if self.kafka_ssl_key_file else None,
                )
        if self.kafka_security_protocol == "SSL":
            return faust.SSLCredentials(context)
        assert self.kafka_sasl_username is not None
        assert self.kafka_sasl_password is not None
        username = self.kafka_sasl_username
        password = self.kafka_sasl_password.get_secret_value()
        if self.kafka_sasl_mechanism == "PLAIN":
            return faust.SASLCredentials(username=username, password=password, ssl_context=context)
        return faust.SASLCredentials(
            username=username,
            password=password,
            ssl_context=context,
            mechanism=self.kafka_sasl_mechanism,
        )

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
