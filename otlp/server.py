"""The receiver's HTTP server: POST /v1/traces (OTLP/HTTP), GET /health, GET /metrics.

Bound to 127.0.0.1 by default; bound anywhere else, /v1/traces needs ``Authorization: Bearer
<api token>`` (OTel exporters send it with ``OTEL_EXPORTER_OTLP_HEADERS``). /metrics needs the
token unless ``metrics_open``; /health carries no data and needs none.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agentledger.config import Settings
from agentledger.metrics import CONTENT_TYPE, metrics_authorized, render

from .decode import MAX_BODY_BYTES, encode_status, encoding_of
from .receiver import Receiver

__all__ = ["LOOPBACK", "OtlpServer"]

log = logging.getLogger(__name__)

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
TRACES_PATH = "/v1/traces"
_GRPC_UNAUTHENTICATED = 16


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # A burst of exporters connecting at once must not be refused by a short listen backlog.
    request_queue_size = 128


class OtlpServer:
    def __init__(self, receiver: Receiver, settings: Settings, *, port: int | None = None) -> None:
        self.receiver = receiver
        self.settings = settings
        self.host = settings.otlp_host
        self.requires_token = self.host not in LOOPBACK
        self._token = settings.api_token_value().encode()
        self._httpd = _Server(
            (self.host, settings.otlp_port if port is None else port), _make_handler(self)
        )
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="otlp-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def export_authorized(self, header: str | None) -> bool:
        if not self.requires_token:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), self._token)

    def health(self) -> dict[str, object]:
        return {"status": "ok", "bind": f"{self.host}:{self.port}", "path": TRACES_PATH}


def _make_handler(server: OtlpServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "agentledger-otlp"
        protocol_version = "HTTP/1.1"  # keep-alive: exporters reuse one connection

        def log_message(self, format: str, *args: Any) -> None:
            # Request lines only (never headers, so never the token), at debug level.
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if status == HTTPStatus.SERVICE_UNAVAILABLE:
                self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, body: dict[str, object]) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/health":
                self._json(HTTPStatus.OK, server.health())
            elif path == "/metrics":
                if not metrics_authorized(server.settings, self.headers.get("Authorization")):
                    self._json(
                        HTTPStatus.UNAUTHORIZED,
                        {"error": "missing or wrong 'Authorization: Bearer <api token>'"},
                    )
                    return
                self._send(HTTPStatus.OK, render(server.receiver.registry), CONTENT_TYPE)
            else:
                self._json(
                    HTTPStatus.NOT_FOUND,
                    {"error": f"POST {TRACES_PATH}, GET /health or GET /metrics"},
                )

        def do_POST(self) -> None:
            content_type = self.headers.get("Content-Type")
            encoding = encoding_of(content_type)
            ctype = encoding or "application/json"
            if self.path.split("?")[0] != TRACES_PATH:
                self._drain()
                self._json(HTTPStatus.NOT_FOUND, {"error": f"POST {TRACES_PATH}"})
                return
            if not server.export_authorized(self.headers.get("Authorization")):
                self._drain()
                message = "missing or wrong 'Authorization: Bearer <api token>'"
                self._send(
                    HTTPStatus.UNAUTHORIZED,
                    encode_status(_GRPC_UNAUTHENTICATED, message, encoding),
                    ctype,
                )
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self.close_connection = True
                message = f"Content-Length must be 0..{MAX_BODY_BYTES}"
                status = (
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE
                    if length > MAX_BODY_BYTES
                    else HTTPStatus.LENGTH_REQUIRED
                )
                self._send(status, encode_status(3, message, encoding), ctype)
                return
            body = self.rfile.read(length)
            reply = server.receiver.export(body, content_type, self.headers.get("Content-Encoding"))
            self._send(reply.status, reply.body, reply.content_type)

        def _drain(self) -> None:
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if 0 <= length <= MAX_BODY_BYTES:
                self.rfile.read(length)
            else:
                self.close_connection = True

    return Handler
