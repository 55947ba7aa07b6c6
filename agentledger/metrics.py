"""What every service's ``GET /metrics`` shares: the Prometheus text rendering and its bearer
check.

Each service keeps its own ``CollectorRegistry`` (never prometheus-client's global one), so two
services in one process (the tests run several) never see each other's series. prometheus-client
is imported here only, and lazily by the services that serve metrics; the shim imports it only
when its exporter is switched on.
"""

from __future__ import annotations

import hmac

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agentledger.config import Settings

__all__ = ["CONTENT_TYPE", "metrics_authorized", "render"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""``text/plain; version=0.0.4``: the text format every Prometheus version scrapes."""


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def metrics_authorized(settings: Settings, header: str | None) -> bool:
    """The scrape carries ``Authorization: Bearer <api token>``, or metrics are open."""
    if settings.metrics_open:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    token = settings.api_token_value().encode()
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token)
