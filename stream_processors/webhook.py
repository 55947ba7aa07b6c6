"""Alert delivery to a webhook (Slack-compatible JSON ``{"text": ...}``), off the stream.

The stream hands alerts over with :meth:`WebhookDelivery.offer`, which never waits: a bounded
queue takes them, and a background task POSTs each one, retrying with exponential backoff.
When the queue is full the alert is dropped, counted and logged (it is still on the alerts
topic). A slow or dead webhook therefore never delays enforcement.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from agentledger.config import Settings
from agentledger.schemas import Alert

__all__ = ["WebhookDelivery", "WebhookStats", "slack_payload"]

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[Any]]


def slack_payload(alert: Alert) -> dict[str, str]:
    """The Slack incoming-webhook body for ``alert``."""
    return {"text": f"[{alert.severity.value}] {alert.kind.value} {alert.scope}: {alert.message}"}


@dataclass
class WebhookStats:
    delivered: int = 0
    dropped: int = 0  # the queue was full
    failed: int = 0  # every attempt failed, or the webhook refused the payload (4xx)
    retries: int = 0


class WebhookDelivery:
    """A bounded queue of alerts and the task that POSTs them."""

    def __init__(
        self,
        url: str,
        *,
        queue_size: int = 1000,
        attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        timeout_s: float = 5.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            # The URL is a secret (it embeds the webhook's token): name only its scheme.
            raise ValueError(
                f"alert webhook URL must be http(s)://host/..., got scheme {parts.scheme!r}"
            )
        if attempts < 1 or queue_size < 1:
            raise ValueError("attempts and queue_size must be at least 1")
        self._url = url
        self._host = parts.hostname or "?"
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self._sleep = sleep
        self.queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=queue_size)
        self.stats = WebhookStats()

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookDelivery | None:
        """Delivery to ``AGENTLEDGER_ALERT_WEBHOOK_URL`` with the ``ALERT_WEBHOOK_*`` limits,
        or None when no webhook is set."""
        url = settings.alert_webhook_url
        if url is None:
            return None
        return cls(
            url.get_secret_value(),
            queue_size=settings.alert_webhook_queue_size,
            attempts=settings.alert_webhook_attempts,
            backoff_s=settings.alert_webhook_backoff_s,
            max_backoff_s=settings.alert_webhook_max_backoff_s,
            timeout_s=settings.alert_webhook_timeout_s,
        )

    def offer(self, alert: Alert) -> bool:
        """Queue ``alert`` for delivery without waiting; False (counted, logged) when full."""
        try:
            self.queue.put_nowait(alert)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            log.warning(
                "alert webhook queue full (%d): dropped alert %s for %s (%d dropped so far)",
                self.queue.maxsize,
                alert.alert_id,
                alert.scope,
                self.stats.dropped,
            )
            return False
        return True

    async def run(self) -> None:
        """Deliver queued alerts one at a time, until cancelled."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                alert = await self.queue.get()
                try:
                    await self._deliver(session, alert)
                finally:
                    self.queue.task_done()

    async def _deliver(self, session: Any, alert: Alert) -> None:
        import aiohttp

        payload = slack_payload(alert)
        for attempt in range(1, self.attempts + 1):
            try:
                async with session.post(self._url, json=payload) as response:
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}"
            else:
                if 200 <= status < 300:
                    self.stats.delivered += 1
                    return
                if 400 <= status < 500 and status not in (408, 429):
                    self.stats.failed += 1
                    log.warning(
                        "alert webhook at %s refused alert %s with HTTP %d; not retried",
                        self._host,
                        alert.alert_id,
                        status,
                    )
                    return
                problem = f"HTTP {status}"
            if attempt == self.attempts:
                break
            self.stats.retries += 1
            delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
            log.info(
                "alert webhook at %s: attempt %d failed (%s); retrying in %.1fs",
                self._host,
                attempt,
                problem,
                delay,
            )
            await self._sleep(delay)
        self.stats.failed += 1
        log.warning(
            "alert webhook at %s: gave up on alert %s after %d attempts (%s)",
            self._host,
            alert.alert_id,
            self.attempts,
            problem,
        )
