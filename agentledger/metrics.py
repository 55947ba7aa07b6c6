"""What every service's ``GET /metrics`` shares: the Prometheus text rendering and its bearer
check.

Each service keeps its own ``CollectorRegistry`` (never prometheus-client's global one), so two
services in one process (the tests run several) never see each other's series. prometheus-client
is imported here only, and lazily by the services that serve metrics; the shim imports it only
when its exporter is switched on.
"""

from __future__ import annotations

import hmac
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agentledger.config import Settings

__all__ = ["CONTENT_TYPE", "MetricsServer", "metrics_authorized", "metrics_listener", "render"]

log = logging.getLogger(__name__)

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


class MetricsServer:
    """A ``GET /metrics`` server on its own thread, for a process with no HTTP API of its own
    (the shim's opt-in exporter). Loopback by default; bearer token unless metrics_open."""

    def __init__(
        self, registry: CollectorRegistry, settings: Settings, host: str, port: int
    ) -> None:
        registry_ = registry

        class Handler(BaseHTTPRequestHandler):
            server_version = "agentledger-metrics"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s " + format, self.address_string(), *args)

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self._reply(404, b"GET /metrics\n", "text/plain")
                elif not metrics_authorized(settings, self.headers.get("Authorization")):
                    self._reply(
                        401, b"missing or wrong 'Authorization: Bearer <api token>'\n", "text/plain"
                    )
                else:
                    self._reply(200, render(registry_), CONTENT_TYPE)

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="agentledger-metrics", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


def metrics_listener(settings: Settings, registry: CollectorRegistry) -> MetricsServer | None:
    """The extra ``metrics_host:metrics_port`` listener a service starts when configured: the
    services' own APIs bind loopback, where a Prometheus in another pod cannot scrape them. It
    serves nothing but /metrics, with the same bearer token rule."""
    if settings.metrics_port is None:
        return None
    server = MetricsServer(registry, settings, settings.metrics_host, settings.metrics_port)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, server.port)
    return server
