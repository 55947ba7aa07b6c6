"""The sink's HTTP API on 127.0.0.1: GET /health, and POST /query for read-only SQL.

It exists because only one process may open the embedded chDB path, and the sink is that
process; the CLI's `sql` and `review` go through it. Against a ClickHouse server it is harmless.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .database import ClickHouse, ClickHouseError

__all__ = ["MAX_BODY_BYTES", "READONLY_ERROR_CODE", "QueryServer"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
READONLY_ERROR_CODE = 164  # ClickHouse's READONLY


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class QueryServer:
    def __init__(
        self,
        database: ClickHouse,
        port: int,
        token: str,
        health_extra: Callable[[], dict[str, object]] = dict,
        host: str = "127.0.0.1",
        metrics: Callable[[], bytes] | None = None,
        metrics_open: bool = False,
    ) -> None:
        self.database = database
        # GET /metrics: the Prometheus text (sinks/metrics.py), bearer token unless open.
        self.metrics = metrics
        self.metrics_open = metrics_open
        self._token = token.encode()
        self._health_extra = health_extra
        handler = _make_handler(self)
        self._httpd = _Server((host, port), handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="sink-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- request logic, separate from the HTTP plumbing -----------------------------------

    def authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), self._token)

    def health(self) -> tuple[int, dict[str, object]]:
        body: dict[str, object] = dict(self._health_extra())
        try:
            result = self.database.readonly_query("SELECT count() FROM calls")
        except ClickHouseError as exc:
            body.update({"status": "error", "error": str(exc)[:500]})
            return HTTPStatus.SERVICE_UNAVAILABLE, body
        body.update({"status": "ok", "rows": int(result.rows[0][0])})
        return HTTPStatus.OK, body

    def query(self, raw: bytes) -> tuple[int, dict[str, object]]:
        try:
            request = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return HTTPStatus.BAD_REQUEST, {"error": f"body must be JSON: {exc}"}
        if not isinstance(request, dict):
            return HTTPStatus.BAD_REQUEST, {
                "error": 'body must be a JSON object {"sql": "...", "parameters": {...}}'
            }
        sql = request.get("sql")
        parameters = request.get("parameters")
        if not isinstance(sql, str) or not sql.strip():
            return HTTPStatus.BAD_REQUEST, {"error": "field 'sql' must be a non-empty string"}
        if parameters is not None and not isinstance(parameters, dict):
            return HTTPStatus.BAD_REQUEST, {
                "error": "field 'parameters' must be an object "
                "of {name: value} for {name:Type} placeholders"
            }
        try:
            result = self.database.readonly_query(sql, parameters)
        except ClickHouseError as exc:
            status = (
                HTTPStatus.FORBIDDEN if exc.code == READONLY_ERROR_CODE else HTTPStatus.BAD_REQUEST
            )
            return status, {"error": str(exc)[:4000], "code": exc.code}
        return HTTPStatus.OK, result.to_json()


def _make_handler(server: QueryServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "agentledger-sink"

        def log_message(self, format: str, *args: Any) -> None:
            # Request lines only (never headers, so never the token), at debug level.
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body, allow_nan=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/metrics" and server.metrics is not None:
                if not (
                    server.metrics_open or server.authorized(self.headers.get("Authorization"))
                ):
                    self._send(
                        HTTPStatus.UNAUTHORIZED,
                        {"error": "missing or wrong 'Authorization: Bearer <api token>'"},
                    )
                    return
                data = server.metrics()
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif self.path.split("?")[0] == "/health":
                self._send(*server.health())
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": "GET /health or POST /query"})

        def do_POST(self) -> None:
            if self.path.split("?")[0] != "/query":
                self._send(HTTPStatus.NOT_FOUND, {"error": "GET /health or POST /query"})
                return
            if not server.authorized(self.headers.get("Authorization")):
                self._send(
                    HTTPStatus.UNAUTHORIZED,
                    {"error": "missing or wrong 'Authorization: Bearer <api token>'"},
                )
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY_BYTES:
                self._send(
                    HTTPStatus.BAD_REQUEST, {"error": f"Content-Length must be 0..{MAX_BODY_BYTES}"}
                )
                return
            self._send(*server.query(self.rfile.read(length)))

    return Handler
