"""Run the receiver from Settings: the shim's Kafka transport and spool, the mapping, the
HTTP server, until a signal."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from agentledger.config import Settings
from agentledger.metrics import metrics_listener
from agentledger.producers.spool import Spool
from agentledger.producers.transport import EventTransport, KafkaTransport

from .mapping import load_mapping
from .receiver import Receiver
from .server import OtlpServer
from .spans import SpanConverter

__all__ = ["build_receiver", "install_signal_handlers", "run_receiver"]

log = logging.getLogger(__name__)


def build_receiver(settings: Settings, transport: EventTransport | None = None) -> Receiver:
    mapping = load_mapping(settings.otlp_mapping)
    if transport is None:
        # The shim's transport: idempotent producer, acks=all, and the durable spool for an
        # outage (replayed in order with the same bytes, so the same event ids).
        # Typed as librdkafka config, not as KafkaTransport's own keyword arguments.
        client_config: dict[str, Any] = {
            **settings.kafka_client_config(),
            "client.id": "agentledger-otlp",
        }
        transport = KafkaTransport(
            settings.kafka, spool=Spool(settings.home / "spool"), **client_config
        )
    return Receiver(
        SpanConverter(mapping),
        transport,
        settings.topics,
        flush_timeout_s=settings.otlp_flush_timeout_s,
    )


def install_signal_handlers(stop: threading.Event) -> None:
    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("otlp: signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def run_receiver(settings: Settings, stop: threading.Event) -> int:
    receiver = build_receiver(settings)
    server = OtlpServer(receiver, settings)
    server.start()
    extra = metrics_listener(settings, receiver.registry)
    log.info(
        "otlp: receiving OTLP/HTTP traces on http://%s:%d/v1/traces (token %s)",
        server.host,
        server.port,
        "required" if server.requires_token else "not required on loopback",
    )
    try:
        stop.wait()
    finally:
        server.stop()
        if extra is not None:
            extra.close()
        receiver.transport.close()
    return 0
