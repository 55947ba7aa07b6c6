"""The processor's own aiokafka clients (beside faust's): the policies follower, its metadata
lookup and the stats follower. They take the same security settings (TLS, SASL) as faust and
the confluent clients, from :meth:`Settings.aiokafka_options`, so a secured cluster needs no
extra configuration for them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ClientOptions", "follower_consumer", "metadata_producer"]

#: Keyword arguments of aiokafka's clients: security_protocol, ssl_context, sasl_*.
ClientOptions = Mapping[str, object]


def follower_consumer(bootstrap: str, options: ClientOptions | None = None) -> Any:
    """A group-less consumer (manual assignment, nothing committed) that reads a compacted
    topic from its beginning. Not started: the caller starts and stops it."""
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # The data plane writes stats (and faust nothing these read) in transactions: an
        # aborted one must not be read.
        isolation_level="read_committed",
        **dict(options or {}),
    )


def metadata_producer(
    bootstrap: str, options: ClientOptions | None = None, *, timeout_ms: int = 30_000
) -> Any:
    """A producer used only for topic metadata (a group-less consumer knows only the topics
    it was assigned). Not started."""
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms, **dict(options or {})
    )
