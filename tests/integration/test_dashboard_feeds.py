"""The dashboard's Kafka feeds on the real broker: the control topic read from the beginning
(newest verified command per scope, forged ones ignored), the alerts topic from its tail, and
`caught_up` set once what stood at start has been read."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from agentledger.config import Settings
from agentledger.dashboard.feeds import AlertLog, CommandBoard, TopicFeed
from agentledger.schemas import Alert, AlertKind, ControlAction, ControlCommand, sign_command
from tests.conftest import TEST_CONTROL_KEY

pytestmark = pytest.mark.integration

KEY = TEST_CONTROL_KEY.encode()


def command(scope: str, action: ControlAction, at: int, key: bytes = KEY) -> bytes:
    signed = sign_command(
        ControlCommand(scope=scope, action=action, reason=f"{action} at {at}", issued_at_ms=at),
        key,
    )
    return signed.model_dump_json().encode()


def alert(n: int) -> bytes:
    return (
        Alert(kind=AlertKind.THRESHOLD, scope="agent:a", message=f"alert {n}", issued_at_ms=n)
        .model_dump_json()
        .encode()
    )


def test_feeds_read_standing_commands_and_the_alerts_tail(stack_settings: Settings) -> None:
    settings = stack_settings
    now = time.time_ns() // 1_000_000
    producer = Producer({"bootstrap.servers": settings.kafka})
    for scope, value in [
        ("agent:a", command("agent:a", ControlAction.STOP, now)),
        ("agent:a", command("agent:a", ControlAction.RESUME, now - 10)),  # older: ignored
        ("pool:p", command("pool:p", ControlAction.STOP, now)),
        ("pool:p", command("pool:p", ControlAction.RESUME, now + 1, key=b"f" * 32)),  # forged
        ("workflow:w", command("workflow:w", ControlAction.STOP, now)),
        ("workflow:w", command("workflow:w", ControlAction.RESUME, now + 1)),
    ]:
        producer.produce(settings.topics.control, key=scope.encode(), value=value)
    for n in range(10):
        producer.produce(settings.topics.alerts, key=b"agent:a", value=alert(n))
    producer.produce(settings.topics.alerts, key=b"agent:a", value=b"not an alert")
    assert producer.flush(10) == 0

    board, alerts = CommandBoard(KEY), AlertLog(keep=50)
    feeds = [
        TopicFeed(settings.kafka, settings.topics.control, board.apply),
        TopicFeed(settings.kafka, settings.topics.alerts, alerts.apply, tail=4),
    ]
    for feed in feeds:
        feed.start()
    try:
        for feed in feeds:
            assert feed.caught_up.wait(30), f"{feed.topic} never caught up: {feed.last_error}"
        standing = board.standing(now + 2)
        assert {s: c.action for s, c in standing.items()} == {
            "agent:a": ControlAction.STOP,
            "pool:p": ControlAction.STOP,
        }
        assert board.rejected == 1
        # The tail of the alerts topic (its last 4 records per partition), newest first; the
        # malformed record is counted, not shown.
        shown = [a.message for a in alerts.latest()]
        assert shown == ["alert 9", "alert 8", "alert 7"] and alerts.rejected == 1

        # Live: a new command arrives after catching up.
        producer.produce(
            settings.topics.control,
            key=b"agent:a",
            value=command("agent:a", ControlAction.RESUME, now + 5),
        )
        assert producer.flush(10) == 0
        deadline = time.monotonic() + 20
        while "agent:a" in board.standing(now + 6) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "agent:a" not in board.standing(now + 6)
    finally:
        for feed in feeds:
            feed.stop()
