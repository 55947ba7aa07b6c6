"""Alert webhook delivery against a real loopback HTTP server, and the dead-letter-rate alert."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from agentledger.schemas import Alert, AlertKind, Severity
from agentledger.stream_processors.dlq_rate import DLQ_ALERT_SCOPE, DlqRate
from agentledger.stream_processors.webhook import WebhookDelivery, slack_payload


def alert(n: int = 0) -> Alert:
    return Alert(
        kind=AlertKind.THRESHOLD,
        severity=Severity.CRITICAL,
        scope="agent:a",
        message=f"agent:a reached 100% ({n})",
        issued_at_ms=1,
    )


class Hook:
    """A loopback webhook that answers ``statuses`` in turn (then 200) and records bodies."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.bodies: list[dict[str, Any]] = []
        self.hits = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.bodies.append(json.loads(await request.read()))
        return web.Response(status=status, text="ok")

    async def __aenter__(self) -> Hook:
        app = web.Application()
        app.router.add_post("/hook/secret-token", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook/secret-token"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def drain(delivery: WebhookDelivery) -> None:
    task = asyncio.create_task(delivery.run())
    try:
        await asyncio.wait_for(delivery.queue.join(), timeout=20)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_delivery_retries_with_backoff_until_the_webhook_accepts() -> None:
    delays: list[float] = []

    async def no_wait(seconds: float) -> None:
        delays.append(seconds)

    async def scenario() -> tuple[Hook, WebhookDelivery]:
        async with Hook([500, 503, 429]) as hook:
            delivery = WebhookDelivery(hook.url, attempts=5, backoff_s=0.5, sleep=no_wait)
            assert delivery.offer(alert(1))
            await drain(delivery)
            return hook, delivery

    hook, delivery = asyncio.run(scenario())
    assert hook.hits == 4
    assert hook.bodies == [slack_payload(alert(1))]
    assert hook.bodies[0]["text"].startswith("[critical] threshold agent:a: agent:a reached")
    assert delays == [0.5, 1.0, 2.0]
    assert (delivery.stats.delivered, delivery.stats.retries, delivery.stats.failed) == (1, 3, 0)


def test_delivery_gives_up_after_its_attempts_and_does_not_retry_a_refusal() -> None:
    async def no_wait(seconds: float) -> None:
        return None

    async def scenario() -> tuple[Hook, WebhookDelivery]:
        async with Hook([500, 500, 404]) as hook:
            delivery = WebhookDelivery(hook.url, attempts=2, sleep=no_wait)
            delivery.offer(alert(1))  # 500, 500: gives up
            delivery.offer(alert(2))  # 404: refused, not retried
            delivery.offer(alert(3))  # 200
            await drain(delivery)
            return hook, delivery

    hook, delivery = asyncio.run(scenario())
    assert hook.hits == 4
    assert [b["text"][-3:] for b in hook.bodies] == ["(3)"]
    assert (delivery.stats.delivered, delivery.stats.failed) == (1, 2)


def test_a_full_queue_drops_and_counts_instead_of_waiting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> WebhookDelivery:
        delivery = WebhookDelivery("http://127.0.0.1:9/hook", queue_size=2)
        return delivery

    delivery = asyncio.run(scenario())
    assert [delivery.offer(alert(n)) for n in range(4)] == [True, True, False, False]
    assert delivery.stats.dropped == 2
    assert "queue full" in caplog.text and "9/hook" not in caplog.text


def test_an_unreachable_webhook_fails_after_retries() -> None:
    async def scenario() -> WebhookDelivery:
        async with Hook([]) as hook:
            url = hook.url
        delivery = WebhookDelivery(url, attempts=3, backoff_s=0.01)  # the server is gone
        delivery.offer(alert())
        await drain(delivery)
        return delivery

    delivery = asyncio.run(scenario())
    assert (delivery.stats.failed, delivery.stats.retries) == (1, 2)


@pytest.mark.parametrize("url", ["ftp://host/x", "not a url", "http://"])
def test_bad_urls_are_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(ValueError, match="must be http") as info:
        WebhookDelivery(url)
    assert "host/x" not in str(info.value)


def test_dlq_rate_alerts_once_per_cooldown_when_the_minute_holds_too_many() -> None:
    rate = DlqRate(max_per_window=3, window_ms=60_000, cooldown_ms=600_000)
    assert [rate.record(t * 1000, "bad") for t in (0, 45, 61, 90)] == [None] * 4
    raised = rate.record(100_000, "not a valid CallEvent")
    assert raised is not None and raised.kind is AlertKind.DLQ_RATE
    assert raised.scope == DLQ_ALERT_SCOPE and "not a valid CallEvent" in raised.message
    assert raised.details["total"] == 5
    assert rate.record(101_000, "bad") is None  # cooldown
    later = [rate.record(700_000 + t, "bad") for t in range(4)]
    assert [a is not None for a in later] == [False, False, False, True]


def test_dlq_rate_and_webhook_limits_come_from_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agentledger.config import Settings

    for name, value in {
        "DLQ_ALERT_MAX": "2",
        "DLQ_ALERT_WINDOW_S": "10",
        "DLQ_ALERT_COOLDOWN_S": "0",
        "ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook",
        "ALERT_WEBHOOK_QUEUE_SIZE": "7",
        "ALERT_WEBHOOK_ATTEMPTS": "3",
        "ALERT_WEBHOOK_BACKOFF_S": "0.25",
        "ALERT_WEBHOOK_MAX_BACKOFF_S": "4",
        "ALERT_WEBHOOK_TIMEOUT_S": "1.5",
    }.items():
        monkeypatch.setenv(f"AGENTLEDGER_{name}", value)
    settings = Settings()
    rate = DlqRate.from_settings(settings)
    assert (rate.max_per_window, rate.window_ms, rate.cooldown_ms) == (2, 10_000, 0)
    # Two in ten seconds are tolerated, the third raises, and with no cooldown so does the next.
    assert [rate.record(t, "bad") is not None for t in (0, 1_000, 2_000, 3_000)] == [
        False,
        False,
        True,
        True,
    ]
    assert rate.record(20_000, "bad") is None  # the window slid past the burst
    delivery = WebhookDelivery.from_settings(settings)
    assert delivery is not None
    assert delivery.queue.maxsize == 7
    assert (delivery.attempts, delivery.backoff_s, delivery.max_backoff_s) == (3, 0.25, 4.0)
    assert delivery.timeout_s == 1.5
    assert WebhookDelivery.from_settings(Settings(alert_webhook_url=None)) is None


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"dlq_alert_max": 0}, "dlq_alert_max"),
        ({"dlq_alert_window_s": 0}, "dlq_alert_window_s"),
        ({"dlq_alert_cooldown_s": -1}, "dlq_alert_cooldown_s"),
        ({"alert_webhook_queue_size": 0}, "alert_webhook_queue_size"),
        ({"alert_webhook_attempts": 0}, "alert_webhook_attempts"),
        ({"alert_webhook_backoff_s": 0}, "alert_webhook_backoff_s"),
        ({"alert_webhook_timeout_s": -1}, "alert_webhook_timeout_s"),
        ({"alert_webhook_backoff_s": 5, "alert_webhook_max_backoff_s": 1}, "max_backoff_s"),
    ],
)
def test_bad_alerting_settings_are_refused_naming_the_field(
    values: dict[str, object], field: str
) -> None:
    from pydantic import ValidationError

    from agentledger.config import Settings

    with pytest.raises(ValidationError, match=field):
        Settings(**values)  # type: ignore[arg-type]
