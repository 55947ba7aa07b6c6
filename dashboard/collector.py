"""Collector: polls the processor and ClickHouse, follows the control, alerts and pauses topics, and
keeps the latest snapshot with a version number that changes when its content does.

A source that fails is reported in the snapshot's ``health`` and retried on the next tick; the
rest of the view keeps updating.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agentledger.config import Settings
from agentledger.review.query import QueryClient, QueryError

from .feeds import AlertLog, CommandBoard, PauseBoard, TopicFeed
from .sources import History, fetch_history, fetch_scopes
from .view import RateTracker, build_snapshot

__all__ = ["Collector", "wall_clock_ms"]

log = logging.getLogger(__name__)

Clock = Callable[[], int]
LIVE_INTERVAL_S = 0.5  # the processor poll: the page must move within 1 s of a change
HISTORY_INTERVAL_S = 5.0  # ClickHouse: minute buckets do not need more
ALERTS_TAIL = 50


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Collector:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = wall_clock_ms,
        query_client: QueryClient | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._query = query_client
        self.board = CommandBoard(settings.control_key_bytes())
        self.alerts = AlertLog(keep=ALERTS_TAIL)
        self.pauses = PauseBoard()
        topics = settings.topics
        security = settings.kafka_client_config()  # TLS / SASL, as every other client
        self.feeds = [
            TopicFeed(settings.kafka, topics.control, self.board.apply, config=security),
            TopicFeed(
                settings.kafka, topics.alerts, self.alerts.apply, tail=ALERTS_TAIL, config=security
            ),
            TopicFeed(
                settings.kafka, topics.pauses, None, on_message=self.pauses.apply, config=security
            ),
        ]
        self.rates = RateTracker()
        # Written by the history thread, read by the live one (single assignments).
        self._history: History | None = None
        self._history_error: str | None = None
        self._lock = threading.Condition()
        self._snapshot: dict[str, Any] = {}
        self._digest = ""
        self.version = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for feed in self.feeds:
            feed.start()
        self.refresh()
        # History has its own thread: a slow ClickHouse must never hold up the live view.
        for target, name in ((self._run_live, "live"), (self._run_history, "history")):
            thread = threading.Thread(target=target, name=f"dashboard-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        for feed in self.feeds:
            feed.stop()
        if self._query is not None:
            self._query.close()

    def _run_live(self) -> None:
        while not self._stop.wait(LIVE_INTERVAL_S):
            self.refresh()

    def _run_history(self) -> None:
        while not self._stop.is_set():
            self.refresh_history()
            self._stop.wait(HISTORY_INTERVAL_S)

    # -- one tick --------------------------------------------------------------------------

    def _client(self) -> QueryClient:
        if self._query is None:
            self._query = QueryClient.from_settings(self.settings)
        return self._query

    def refresh_history(self) -> None:
        """Query ClickHouse once; the next snapshot carries the result (or the error)."""
        try:
            self._history = fetch_history(self._client(), self.clock())
            self._history_error = None
        except QueryError as exc:
            self._history_error = str(exc)[:300]

    def refresh(self) -> dict[str, Any]:
        """Poll the sources once and publish a new snapshot if anything changed."""
        now = self.clock()
        scopes: dict[str, Any] | None
        processor_error: str | None
        try:
            scopes = fetch_scopes(self.settings)
            processor_error = "; ".join(scopes["errors"]) or None
        except RuntimeError as exc:
            scopes, processor_error = None, str(exc)
        health: dict[str, str | None] = {
            "processor": processor_error,
            "history": self._history_error,
            **{f"topic {f.topic}": f.last_error for f in self.feeds},
        }
        snapshot = build_snapshot(
            now_ms=now,
            scopes_body=scopes,
            standing=self.board.standing(now),
            alerts=self.alerts.latest(),
            paused=self.pauses.live(now),
            history=self._history,
            rates=self.rates,
            health=health,
        )
        # The version moves only with the content, not with the clock.
        digest = json.dumps({k: v for k, v in snapshot.items() if k != "now_ms"}, sort_keys=True)
        with self._lock:
            self._snapshot = snapshot
            if digest != self._digest:
                self._digest = digest
                self.version += 1
                self._lock.notify_all()
        return snapshot

    def snapshot(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            return self.version, self._snapshot

    def wait_newer(self, version: int, timeout_s: float) -> tuple[int, dict[str, Any]]:
        """Block until the version differs from ``version`` or ``timeout_s`` passes."""
        with self._lock:
            self._lock.wait_for(lambda: self.version != version, timeout=timeout_s)
            return self.version, self._snapshot
