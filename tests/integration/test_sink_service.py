"""`python -m agentledger.sinks` as a real process, against the real broker and real chDB."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from agentledger.config import Settings
from agentledger.review.query import QueryClient, QueryError
from agentledger.schemas import (
    Alert,
    AlertKind,
    CallEvent,
    CallStatus,
    ControlAction,
    ControlCommand,
    InvalidMessage,
    format_usd,
    sign_command,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z


class SinkProcess:
    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        module: str = "agentledger.sinks",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.module = module  # another entry point of run_sink (test_sink_migration.py)
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_")}
        assert self.settings.api_token is not None
        env.update(
            {
                "AGENTLEDGER_KAFKA": self.settings.kafka,
                "AGENTLEDGER_TOPIC_PREFIX": self.settings.topic_prefix,
                "AGENTLEDGER_HOME": str(self.settings.home),
                "AGENTLEDGER_API_TOKEN": self.settings.api_token.get_secret_value(),
                "AGENTLEDGER_SINK_PORT": str(self.settings.sink_port),
                "AGENTLEDGER_SINK_BATCH_MS": "200",
                "AGENTLEDGER_CONTROL_KEY": self.settings.control_key_bytes().decode(),
                "PYTHONUNBUFFERED": "1",
                **self.extra_env,
            }
        )
        return env

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                start_new_session=True,
            )
        wait_for(
            lambda: self.health() if self.alive() else self.fail("exited during start"),
            "sink healthy",
            timeout_s=60,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def fail(self, why: str) -> None:
        raise AssertionError(f"sink {why}; log:\n{self.log_path.read_text()[-3000:]}")

    def health(self) -> dict[str, object] | None:
        url = f"http://127.0.0.1:{self.settings.sink_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body: dict[str, object] = json.loads(response.read())
                return body
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def wait_for(check: Callable[[], T | None], what: str, timeout_s: float = 60) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value is not None and value is not False:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture
def sink(stack_settings: Settings, tmp_path: Path) -> Iterator[SinkProcess]:
    process = SinkProcess(stack_settings, tmp_path / "sink.log")
    try:
        yield process
    finally:
        process.kill()


def make_events(n: int, start: int = 0) -> list[CallEvent]:
    # Costs chosen so that a float sum would not be exact.
    return [
        CallEvent(
            event_id=uuid.uuid4(),
            event_time_ms=BASE_MS + i * 1000,
            agent_id=f"agent-{i % 5}",
            workflow_id="wf-int",
            provider="openai",
            requested_model="gpt-4o",
            used_model="gpt-4o" if i % 3 else "gpt-4o-mini",
            input_tokens=100 + i,
            output_tokens=10 + i,
            cost_nano_usd=1_000_000_007 * (i + 1) + 123_456_789_012_345,
            latency_ms=50 + i,
            attempt=1 + i % 2,
            status=CallStatus.OK if i % 7 else CallStatus.ERROR,
        )
        for i in range(start, start + n)
    ]


def produce(settings: Settings, payloads: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka, "linger.ms": 5})
    for key, value in payloads:
        producer.produce(settings.topics.calls, key=key, value=value)
    assert producer.flush(30) == 0


def produce_events(settings: Settings, events: list[CallEvent]) -> None:
    produce(settings, [(e.agent_id.encode(), e.model_dump_json().encode()) for e in events])


def totals(client: QueryClient) -> tuple[int, int, int]:
    result = client.query(
        "SELECT count(), uniqExact(event_id), sum(toInt128(cost_nano_usd)) FROM calls"
    )
    count, unique, cost = result.rows[0]
    return int(count), int(unique), int(cost)


def wait_for_totals(client: QueryClient, expected: tuple[int, int, int]) -> None:
    last: list[tuple[int, int, int]] = []

    def check() -> bool:
        last[:] = [totals(client)]
        return last[0] == expected

    try:
        wait_for(check, f"totals {expected}", timeout_s=60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {last}") from None


def test_calls_land_exactly_once_and_garbage_goes_to_the_dlq(sink: SinkProcess) -> None:
    settings = sink.settings
    sink.start()
    client = QueryClient.from_settings(settings)

    first = make_events(300)
    produce_events(settings, first)
    expected_cost = sum(e.cost_nano_usd for e in first)
    wait_for_totals(client, (300, 300, expected_cost))
    wait_for(lambda: (sink.health() or {}).get("lag") == 0, "lag 0 in /health", timeout_s=20)

    # One row per call with every field, read back exactly.
    sample = first[17]
    row = client.query(
        "SELECT agent_id, toUnixTimestamp64Milli(event_time), cost_nano_usd, status, attempt, "
        "input_tokens, _topic FROM calls WHERE event_id = {id:UUID}",
        {"id": str(sample.event_id)},
    )
    assert row.rows == [
        [
            sample.agent_id,
            sample.event_time_ms,
            sample.cost_nano_usd,
            sample.status.value,
            sample.attempt,
            sample.input_tokens,
            settings.topics.calls,
        ]
    ]

    # Garbage and a schema-invalid record go to the dlq; the sink keeps consuming.
    produce(
        settings,
        [
            (b"junk", b"\x00\x01 not json at all"),
            (b"bad", json.dumps({"agent_id": "x", "latency_ms": -1}).encode()),
        ],
    )
    more = make_events(50, start=300)
    produce_events(settings, more)
    expected_cost += sum(e.cost_nano_usd for e in more)
    wait_for_totals(client, (350, 350, expected_cost))
    dead = read_dlq(settings, 2)
    assert {d.component for d in dead} == {"sink"}
    assert {d.topic for d in dead} == {settings.topics.calls}
    payloads = {d.payload(): d.reason for d in dead}
    assert "Invalid JSON" in payloads[b"\x00\x01 not json at all"]
    assert "latency_ms" in next(r for p, r in payloads.items() if p.startswith(b"{"))
    assert sink.alive()

    # The query API is read-only.
    for sql in ("INSERT INTO calls (agent_id) VALUES ('evil')", "DROP TABLE calls"):
        with pytest.raises(QueryError, match="403"):
            client.query(sql)
    assert totals(client)[0] == 350

    # kill -9, then pretend no offset was ever committed: the restarted sink re-reads every
    # record with batch boundaries unlike the first run's, and must still store none twice.
    sink.kill()
    rewind_group(settings)
    sink.start()
    health = wait_for(lambda: _replayed(sink, 352), "replay of all records", timeout_s=60)
    assert health["rows"] == 350
    assert totals(client) == (350, 350, expected_cost)
    third = make_events(20, start=400)
    produce_events(settings, third)
    wait_for_totals(client, (370, 370, expected_cost + sum(e.cost_nano_usd for e in third)))


def _replayed(sink: SinkProcess, records: int) -> dict[str, object] | None:
    health = sink.health()
    if health is None:
        return None
    # 350 stored rows are skipped; the 2 invalid ones go to the dlq again (at-least-once).
    skipped = health.get("rows_skipped_replayed")
    invalid = health.get("invalid")
    if isinstance(skipped, int) and isinstance(invalid, int) and skipped + invalid >= records:
        return health
    return None


def read_dlq(settings: Settings, at_least: int) -> list[InvalidMessage]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka,
            "group.id": f"dlq-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.topics.dlq])
    found: list[InvalidMessage] = []
    try:
        deadline = time.monotonic() + 30
        while len(found) < at_least and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                found.append(InvalidMessage.model_validate_json(msg.value() or b""))
    finally:
        consumer.close()
    assert len(found) >= at_least, found
    return found


def rewind_group(settings: Settings) -> None:
    """Commit offset 0 for every partition of the calls topic in the sink's group."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka,
            "group.id": f"{settings.topic_prefix}sink",
            "enable.auto.commit": False,
        }
    )
    try:
        metadata = consumer.list_topics(settings.topics.calls, timeout=10)
        partitions = metadata.topics[settings.topics.calls].partitions
        committed = consumer.committed(
            [TopicPartition(settings.topics.calls, p) for p in partitions], timeout=10
        )
        assert sum(max(tp.offset, 0) for tp in committed) == 352, committed
        rewound = [TopicPartition(settings.topics.calls, p, 0) for p in partitions]

        def commit() -> bool:
            # Refused (UNKNOWN_MEMBER_ID) until the broker expires the killed member.
            try:
                consumer.commit(offsets=rewound, asynchronous=False)
            except KafkaException:
                return False
            return True

        wait_for(commit, "the killed sink's group membership to expire", timeout_s=40)
    finally:
        consumer.close()


def test_sigterm_stops_cleanly(sink: SinkProcess) -> None:
    sink.start()
    produce_events(sink.settings, make_events(10))
    client = QueryClient.from_settings(sink.settings)
    wait_for(lambda: totals(client)[0] == 10, "10 rows")
    assert sink.proc is not None
    started = time.monotonic()
    sink.proc.send_signal(signal.SIGTERM)
    assert sink.proc.wait(timeout=30) == 0
    assert time.monotonic() - started < 30
    assert "Traceback" not in sink.log_path.read_text()
    # chDB was closed: a new process can open the same path and sees the same rows.
    sink.start()
    assert totals(client)[0] == 10


def test_spool_replay_control_commands_and_alerts(sink: SinkProcess) -> None:
    settings = sink.settings
    sink.start()
    client = QueryClient.from_settings(settings)
    events = make_events(40)
    produce_events(settings, events)
    # A spool replay: the same events again, at new offsets (and keys, so other partitions).
    produce(settings, [(b"replay", e.model_dump_json().encode()) for e in events[:15]])
    fresh = make_events(5, start=40)
    produce_events(settings, fresh)
    expected_cost = sum(e.cost_nano_usd for e in events + fresh)
    wait_for_totals(client, (45, 45, expected_cost))
    wait_for(lambda: (sink.health() or {}).get("duplicates_skipped") == 15, "15 duplicates skipped")
    day = client.query("SELECT sum(calls), sum(cost_nano_usd) FROM calls_by_day")
    assert day.rows == [[45, expected_cost]]

    signed = sign_command(
        ControlCommand(
            scope="agent:agent-1", action=ControlAction.STOP, reason="r", issued_at_ms=BASE_MS
        ),
        settings.control_key_bytes(),
    )
    # Signed, then changed (a forgery carries its own id: a copy under the genuine command's id
    # would be dropped as a repeat of it, see sinks/README.md).
    forged = signed.model_copy(
        update={"reason": "changed after signing", "command_id": uuid.uuid4()}
    )
    alert = Alert(kind=AlertKind.THRESHOLD, scope="agent:agent-1", message="80%", issued_at_ms=1)
    producer = Producer({"bootstrap.servers": settings.kafka})
    for topic, key, payload in [
        (settings.topics.control, b"agent:agent-1", signed.model_dump_json().encode()),
        (settings.topics.control, b"agent:agent-2", forged.model_dump_json().encode()),
        (settings.topics.control, b"agent:agent-3", b"not a command"),
        (settings.topics.alerts, b"agent:agent-1", alert.model_dump_json().encode()),
        (settings.topics.alerts, b"agent:agent-1", alert.model_dump_json().encode()),
    ]:
        producer.produce(topic, key=key, value=payload)
    assert producer.flush(30) == 0

    def audit() -> list[list[object]] | None:
        rows = client.query("SELECT reason, verified FROM control_commands ORDER BY reason").rows
        return rows if len(rows) == 2 else None

    assert wait_for(audit, "two control commands stored") == [
        ["changed after signing", False],
        ["r", True],
    ]
    wait_for(lambda: client.query("SELECT count() FROM alerts").rows == [[1]], "one alert stored")
    dead = read_dlq(settings, 1)
    assert [(d.topic, d.reason.startswith("not a valid ControlCommand")) for d in dead] == [
        (settings.topics.control, True)
    ]


def test_review_cli_reads_the_sink_and_writes_the_html_report(
    sink: SinkProcess, tmp_path: Path
) -> None:
    settings = sink.settings
    sink.start()
    events = make_events(60)
    produce_events(settings, events)
    client = QueryClient.from_settings(settings)
    expected_cost = sum(e.cost_nano_usd for e in events)
    wait_for_totals(client, (60, 60, expected_cost))
    report = tmp_path / "review.html"
    # The events are dated 2025-01-01: a window back to then, ranked by model.
    days = (time.time() * 1000 - BASE_MS) // 86_400_000 + 2
    done = subprocess.run(
        [
            *(sys.executable, "-m", "agentledger", "review", "--since", f"{int(days)}d"),
            *("--by", "model", "--html", str(report)),
        ],
        env=sink.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    total = format_usd(expected_cost)
    assert f"total: {total} over 60 calls" in done.stdout
    assert "top spenders by model" in done.stdout
    for model in ("gpt-4o", "gpt-4o-mini"):
        cost = sum(e.cost_nano_usd for e in events if e.used_model == model)
        amount = re.escape(format_usd(cost))
        assert re.search(rf"^{re.escape(model)}\s+{amount}\s", done.stdout, re.M)
    html = report.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html and "<script" not in html
    assert f"Total {total} over 60 calls" in html
