"""The processor's own aiokafka clients (policies and stats followers) take the security
settings that faust and the confluent clients take."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.stream_processors.kafka_clients import follower_consumer, metadata_producer


def sasl_ssl() -> Settings:
    return Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="processor",
        kafka_sasl_password=SecretStr("s3cret"),
    )


def built(make: Any, settings: Settings) -> dict[str, object]:
    """What aiokafka's client inside the built (never started) consumer or producer holds."""

    async def build() -> dict[str, object]:
        client = make("127.0.0.1:1", settings.aiokafka_options())
        try:
            # The consumer keeps its AIOKafkaClient as _client, the producer as client.
            inner = getattr(client, "_client", None) or client.client
            return {
                "protocol": inner._security_protocol,
                "mechanism": inner._sasl_mechanism,
                "username": inner._sasl_plain_username,
                "password": inner._sasl_plain_password,
                "ssl": inner._ssl_context,
            }
        finally:
            await client.stop()

    return asyncio.run(build())


def test_the_followers_consumer_and_metadata_producer_use_sasl_ssl() -> None:
    for make in (follower_consumer, metadata_producer):
        seen = built(make, sasl_ssl())
        assert isinstance(seen.pop("ssl"), ssl.SSLContext)
        assert seen == {
            "protocol": "SASL_SSL",
            "mechanism": "SCRAM-SHA-256",
            "username": "processor",
            "password": "s3cret",
        }


def test_plaintext_settings_build_plaintext_clients() -> None:
    for make in (follower_consumer, metadata_producer):
        seen = built(make, Settings())
        assert seen["protocol"] == "PLAINTEXT" and seen["ssl"] is None


def test_the_follower_reads_from_the_beginning_without_a_group() -> None:
    async def build() -> tuple[object, object, object]:
        consumer = follower_consumer("127.0.0.1:1", Settings().aiokafka_options())
        try:
            return consumer._group_id, consumer._enable_auto_commit, consumer._auto_offset_reset
        finally:
            await consumer.stop()

    assert asyncio.run(build()) == (None, False, "earliest")
