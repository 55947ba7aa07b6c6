"""The dashboard server's HTTP surface on loopback, with every source down (no broker, no
processor, no sink): token and cookie auth, cross-site POSTs, input errors naming the field,
SSE framing, and a snapshot that names the failing sources instead of failing itself."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.dashboard.server import COOKIE, build_app
from tests.conftest import TEST_CONTROL_KEY, free_port

TOKEN = "dashboard-unit-token"


def request(
    url: str,
    *,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def read_first_event(url: str, headers: dict[str, str]) -> tuple[str, dict[str, Any]]:
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as response:
        content_type = response.headers["Content-Type"]
        lines: list[str] = []
        while True:
            line = response.readline().decode()
            if line == "\n" and lines:
                break
            lines.append(line.rstrip("\n"))
    assert lines[0] == "event: snapshot"
    return content_type, json.loads(lines[1].removeprefix("data: "))


def test_api_auth_origin_checks_input_errors_and_sse(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        kafka=f"127.0.0.1:{free_port()}",
        processor_port=free_port(),
        sink_port=free_port(),
        dashboard_port=free_port(),
        api_token=SecretStr(TOKEN),
        control_key=SecretStr(TEST_CONTROL_KEY),
        topic_prefix="unit.",
    )
    base = f"http://127.0.0.1:{settings.dashboard_port}"
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    def checks() -> None:
        status, _h, body = request(base + "/health")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        status, _h, body = request(base + "/")
        assert status == 200 and b"agentledger" in body
        status, _h, body = request(base + "/static/app.js")
        assert status == 200 and b"EventSource" in body

        # No token, a wrong token, a wrong cookie: refused.
        assert request(base + "/api/snapshot")[0] == 401
        assert request(base + "/api/snapshot", headers={"Authorization": "Bearer x"})[0] == 401
        assert request(base + "/api/snapshot", headers={"Cookie": f"{COOKIE}=x"})[0] == 401

        # A wrong login goes back to the form; a right one sets a cookie that is not the token.
        status, headers, _b = request(base + "/login", data=b"token=nope")
        assert status == 303 and headers["Location"] == "/?login=failed"
        status, headers, _b = request(base + "/login", data=f"token={TOKEN}".encode())
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        session = {"Cookie": cookie.split(";")[0]}
        status, _h, body = request(base + "/api/snapshot", headers=session)
        assert status == 200
        snapshot = json.loads(body)
        deadline = time.monotonic() + 30
        while snapshot["health"]["history"] is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the history thread's first query has not failed yet
            snapshot = json.loads(request(base + "/api/snapshot", headers=session)[2])
        # Every source is down; the snapshot says which, and still answers.
        assert snapshot["scopes"] == []
        assert "processor not reachable" in snapshot["health"]["processor"]
        assert "sink is not running" in snapshot["health"]["history"]

        # A cookie-authorised POST needs the page's own Origin.
        command = json.dumps({"scope": "agent:a", "action": "stop"}).encode()
        json_type = {"Content-Type": "application/json"}
        cross = {**session, **json_type, "Origin": "http://evil.example"}
        assert request(base + "/api/control", data=command, headers=cross)[0] == 401
        assert (
            request(base + "/api/control", data=command, headers={**session, **json_type})[0] == 401
        )

        # Bad input is refused, naming the field, before anything is published.
        def control(body: object) -> tuple[int, str]:
            status, _h, raw = request(
                base + "/api/control",
                data=json.dumps(body).encode(),
                headers={**bearer, **json_type},
            )
            return status, json.loads(raw)["error"]

        status, error = control({"scope": "agents:a", "action": "stop"})
        assert status == 400 and "scope" in error
        status, error = control({"scope": "agent:a", "action": "explode"})
        assert status == 400 and "action must be one of stop, throttle, resume" in error
        status, error = control({"scope": "agent:a", "action": "throttle", "concurrency": "2"})
        assert status == 400 and "'concurrency' must be an integer" in error
        status, error = control(["not", "an", "object"])
        assert status == 400 and "body must be" in error

        content_type, event = read_first_event(base + "/api/events", bearer)
        assert content_type == "text/event-stream"
        assert set(event) >= {"now_ms", "scopes", "standing", "alerts", "series", "top_agents"}

    async def main() -> None:
        runner = web.AppRunner(build_app(settings))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", settings.dashboard_port)
        await site.start()
        try:
            await asyncio.to_thread(checks)
        finally:
            await runner.cleanup()

    asyncio.run(main())
