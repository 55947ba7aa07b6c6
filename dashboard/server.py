"""The dashboard's HTTP server (aiohttp, 127.0.0.1 only).

- ``GET /health``: liveness for `agentledger status` (no data, no token).
- ``GET /`` and ``/static/*``: the page and its assets, shipped in the package (no CDN). They
  carry no data, so they need no token; everything under /api does.
- ``POST /login`` (form field ``token``): checks the API token and sets an HttpOnly,
  SameSite=Strict session cookie derived from it, since EventSource cannot send headers.
- ``GET /api/snapshot``, ``GET /api/events`` (server-sent events: a snapshot whenever it
  changes, and at least every second), ``POST /api/control`` (operator command).
  Authorised by the cookie or by ``Authorization: Bearer <api token>``. A cookie-authorised
  POST must also come from the page's own origin (cross-site request forgery).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError

from agentledger.config import Settings
from agentledger.metrics import CONTENT_TYPE, metrics_authorized, metrics_listener, render

from .collector import Collector
from .metrics import DashboardMetrics
from .operator import operator_command, publish_command

__all__ = ["COOKIE", "PUSH_EVERY_S", "build_app", "serve"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "agentledger_dashboard"
PUSH_EVERY_S = 1.0  # a snapshot goes out at least this often, changed or not
CHECK_EVERY_S = 0.2  # how often a stream looks for a newer snapshot
MAX_CONTROL_BODY = 16 * 1024
_COLLECTOR = web.AppKey("collector", Collector)
_SETTINGS = web.AppKey("settings", Settings)
_METRICS = web.AppKey("metrics", DashboardMetrics)


def _session_value(token: str) -> str:
    # The cookie never holds the token itself, only a value derived from it.
    return hmac.new(token.encode(), b"agentledger-dashboard-session", hashlib.sha256).hexdigest()


def _authorized(request: web.Request, *, mutating: bool = False) -> bool:
    token = request.app[_SETTINGS].api_token_value()
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token.encode())
    cookie = request.cookies.get(COOKIE, "")
    if not hmac.compare_digest(cookie.encode(), _session_value(token).encode()):
        return False
    if mutating:
        origin = request.headers.get("Origin")
        return origin is not None and origin == f"{request.scheme}://{request.host}"
    return True


def _unauthorized() -> web.Response:
    return web.json_response(
        {
            "error": "missing or wrong API token: log in on the page, or send "
            "'Authorization: Bearer <api token>'"
        },
        status=401,
    )


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _index(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


async def _login(request: web.Request) -> web.Response:
    form = await request.post()
    given = form.get("token")
    token = request.app[_SETTINGS].api_token_value()
    if not isinstance(given, str) or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise web.HTTPSeeOther("/?login=failed")
    response = web.HTTPSeeOther("/")
    response.set_cookie(COOKIE, _session_value(token), httponly=True, samesite="Strict", path="/")
    raise response


async def _snapshot(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _unauthorized()
    _version, snapshot = request.app[_COLLECTOR].snapshot()
    return web.json_response(snapshot)


async def _events(request: web.Request) -> web.StreamResponse:
    if not _authorized(request):
        return _unauthorized()
    collector = request.app[_COLLECTOR]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    sent_version = -1
    sent_at = 0.0
    streams = request.app[_METRICS].streams
    streams.inc()
    try:
        while True:
            version, snapshot = collector.snapshot()
            if version != sent_version or loop.time() - sent_at >= PUSH_EVERY_S:
                data = json.dumps(snapshot, separators=(",", ":"))
                await response.write(f"event: snapshot\ndata: {data}\n\n".encode())
                sent_version, sent_at = version, loop.time()
            await asyncio.sleep(CHECK_EVERY_S)
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the page went away, or the server is stopping
    finally:
        streams.dec()
    return response


async def _metrics(request: web.Request) -> web.Response:
    if not metrics_authorized(request.app[_SETTINGS], request.headers.get("Authorization")):
        return _unauthorized()
    body = render(request.app[_METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _control(request: web.Request) -> web.Response:
    if not _authorized(request, mutating=True):
        return _unauthorized()
    if (request.content_length or 0) > MAX_CONTROL_BODY:
        return web.json_response({"error": "body too large"}, status=413)
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return web.json_response({"error": "body must be a JSON object"}, status=400)
    if not isinstance(body, dict):
        return web.json_response(
            {"error": 'body must be {"scope": ..., "action": "stop|throttle|resume"}'}, status=400
        )
    settings = request.app[_SETTINGS]
    collector = request.app[_COLLECTOR]
    counted = request.app[_METRICS].commands
    action = str(body.get("action", ""))
    label = action if action in ("stop", "throttle", "resume") else "other"
    concurrency = body.get("concurrency")
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int)
    ):
        return web.json_response({"error": "field 'concurrency' must be an integer"}, status=400)
    try:
        command = operator_command(
            scope=str(body.get("scope", "")),
            action=str(body.get("action", "")),
            now_ms=collector.clock(),
            key=settings.control_key_bytes(),
            operator=str(body.get("operator") or "dashboard"),
            reason=str(body["reason"]) if body.get("reason") else None,
            concurrency=concurrency,
        )
    except ValidationError as exc:
        counted.labels(label, "refused").inc()
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return web.json_response({"error": f"invalid command: {detail}"}, status=400)
    except ValueError as exc:
        counted.labels(label, "refused").inc()
        return web.json_response({"error": str(exc)}, status=400)
    try:
        await asyncio.get_running_loop().run_in_executor(None, publish_command, settings, command)
    except RuntimeError as exc:
        counted.labels(label, "failed").inc()
        return web.json_response({"error": str(exc)}, status=503)
    counted.labels(label, "published").inc()
    log.info("operator %s: %s %s", command.issuer, command.action.value, command.scope)
    return web.json_response(json.loads(command.model_dump_json()))


def build_app(settings: Settings, collector: Collector | None = None) -> web.Application:
    """The aiohttp application; it starts and stops its collector with itself."""
    app = web.Application(client_max_size=MAX_CONTROL_BODY)
    app[_SETTINGS] = settings
    app[_COLLECTOR] = collector = collector or Collector(settings)
    app[_METRICS] = DashboardMetrics(collector.snapshot, collector.clock)

    async def start_collector(app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, app[_COLLECTOR].start)

    async def stop_collector(app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, app[_COLLECTOR].stop)

    app.on_startup.append(start_collector)
    app.on_cleanup.append(stop_collector)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/", _index)
    app.router.add_post("/login", _login)
    app.router.add_get("/api/snapshot", _snapshot)
    app.router.add_get("/api/events", _events)
    app.router.add_post("/api/control", _control)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    return app


def serve(settings: Settings) -> None:
    """Run the dashboard on 127.0.0.1:<dashboard_port> until SIGINT/SIGTERM."""
    app = build_app(settings)
    metrics_listener(settings, app[_METRICS].registry)  # only with AGENTLEDGER_METRICS_PORT
    print(
        f"agentledger dashboard on http://127.0.0.1:{settings.dashboard_port}/ "
        "(log in with the API token)",
        flush=True,
    )
    web.run_app(
        app,
        host="127.0.0.1",
        port=settings.dashboard_port,
        print=None,
        shutdown_timeout=2.0,
        access_log=None,
    )
