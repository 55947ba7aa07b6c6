"""Policy v3 on the real broker, through a worker subprocess: a zoned day, a rolling window and a
workflow run (each with its RESUME where it can be waited for), the pool concurrency cap, the
spawn-explosion, burn-rate and forecast detectors, the dead-letter-rate alert, and alerts
delivered to a loopback webhook that fails its first attempts."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from zoneinfo import ZoneInfo

import pytest

import tests.integration.test_processor_thresholds as thresholds
import tests.integration.test_processor_worker as base
from agentledger.cli import main as cli
from agentledger.config import Settings
from agentledger.producers import BudgetExceeded, Ledger
from agentledger.schemas import (
    Alert,
    AlertKind,
    BudgetPolicy,
    CallEvent,
    ControlAction,
    ControlCommand,
    verify_command,
)
from agentledger.stream_processors.periods import DAY_MS

pytestmark = pytest.mark.integration

workers = base.workers
readers = base.readers
Worker = base.Worker
TopicReader = base.TopicReader
alerts_reader = thresholds.alerts_reader
alerts_for = thresholds.alerts_for

USD = 1_000_000_000


def call(
    agent: str,
    cost: int,
    *,
    at_ms: int | None = None,
    latency_ms: int = 100,
    **fields: Any,
) -> bytes:
    return (
        CallEvent(
            event_time_ms=base.now_ms() if at_ms is None else at_ms,
            agent_id=agent,
            provider="openai",
            requested_model="gpt-4o",
            used_model="gpt-4o",
            cost_nano_usd=cost,
            latency_ms=latency_ms,
            **fields,
        )
        .model_dump_json()
        .encode()
    )


def actions(reader: TopicReader, scope: str, key: bytes) -> list[ControlCommand]:
    found = [command for command, _ in base.commands(reader, scope)]
    for command in found:
        verify_command(command, key)
    return found


def cli_spend(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *args: str,
) -> list[str]:
    """``agentledger spend ARGS`` as an operator runs it against the live worker."""
    for name, value in {
        "AGENTLEDGER_HOME": str(settings.home),
        "AGENTLEDGER_API_TOKEN": settings.api_token_value(),
        "AGENTLEDGER_PROCESSOR_PORT": str(settings.processor_port),
    }.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert cli(["spend", *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_zoned_rolling_and_run_periods_and_the_detectors(
    stack_settings: Settings,
    workers: Callable[[], Worker],
    readers: tuple[TopicReader, TopicReader],
    alerts_reader: TopicReader,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = stack_settings
    control, _ = readers
    key = settings.control_key_bytes()
    base.avoid_midnight()
    producer = base.make_producer(settings)
    zone = "Pacific/Kiritimati"  # UTC+14: its day never matches the UTC day
    policies = [
        {"scope": "agent:zoned", "period": "day", "timezone": zone, "limit_usd": "0.01"},
        {"scope": "agent:roller", "period": "rolling", "window": "1m", "limit_usd": "0.01"},
        {"scope": "workflow:run-1", "period": "run", "idle": "4s", "limit_usd": "0.01"},
        {"scope": "pool:gpu", "max_concurrency": 2},
        {"scope": "workflow:fanout", "spawn": {"max_children": 2, "action": "stop"}},
        {
            "scope": "agent:burner",
            "burn_rate": {
                "window": "10s",
                "baseline": "60s",
                "factor": 3,
                "min_usd": "0.001",
            },
        },
        {
            "scope": "agent:retrier",
            "retry_loop": {
                "max_retry_cost_percent": 40,
                "min_spend_usd": "0.001",
                "action": "refuse_new_work",
            },
        },
        {
            "scope": "agent:forecaster",
            "period": "day",
            "limit_usd": "1",
            "thresholds": [{"at_percent": 100, "action": "stop"}],
            "forecast": {"min_elapsed_percent": 0},
        },
    ]
    for raw in policies:
        base.publish_policy(producer, settings, BudgetPolicy.model_validate(raw))
    worker = workers()
    worker.wait_ready()
    calls = settings.topics.calls

    def send(agent: str, value: bytes) -> None:
        base.send(producer, calls, agent.encode(), value)

    # Zoned day: STOP over the Kiritimati day, from its local midnight to the next.
    send("zoned", call("zoned", 10_000_000))
    (stop,) = base.wait_for("the zoned STOP", lambda: actions(control, "agent:zoned", key))
    local = datetime.fromtimestamp(stop.issued_at_ms / 1000, tz=ZoneInfo(zone))
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    assert stop.action is ControlAction.STOP
    assert stop.period_start_ms == int(midnight.timestamp()) * 1000
    assert stop.until_ms == stop.period_start_ms + DAY_MS  # Kiritimati keeps no DST
    out = cli_spend(settings, monkeypatch, capsys, "agent:zoned", "--period", "day")
    assert out[3].startswith(f"day ({zone})")
    assert out[3].split()[-4:] == ["0.010000000", "0.01", "100.00", "agent:zoned"]

    # Rolling 1m window: spend from 50 s ago stops the agent until it slides out, then RESUME.
    send("roller", call("roller", 10_000_000, at_ms=base.now_ms() - 50_000))
    stop = base.wait_for("the rolling STOP", lambda: actions(control, "agent:roller", key))[0]
    assert stop.action is ControlAction.STOP and stop.period_start_ms is None
    assert stop.until_ms is not None and stop.until_ms - base.now_ms() < 12_000
    # `agentledger spend --period` shows the window as the live state holds it (its spend
    # may already be sliding out, so only the window and the policy are checked here).
    out = cli_spend(settings, monkeypatch, capsys, "agent:roller", "--period", "60s")
    assert len(out) == 5 and out[3].split()[0] == "rolling:1m"
    window = out[3].split()
    assert (window[-3], window[-1]) == ("0.01", "agent:roller")
    base.wait_for(
        "the rolling RESUME", lambda: len(actions(control, "agent:roller", key)) >= 2 or None
    )
    commands = actions(control, "agent:roller", key)
    assert [c.action for c in commands] == [ControlAction.STOP, ControlAction.RESUME]

    # Workflow run: its spend adds up over the run; 4 s without events ends it: RESUME.
    send("w-a", call("w-a", 6_000_000, workflow_id="run-1"))
    send("w-b", call("w-b", 4_000_000, workflow_id="run-1"))
    stop = base.wait_for("the run STOP", lambda: actions(control, "workflow:run-1", key))[0]
    assert stop.action is ControlAction.STOP and "per-run budget" in stop.reason
    out = cli_spend(settings, monkeypatch, capsys, "workflow:run-1", "--period", "run")
    assert out[3].split()[0] == "run"
    assert out[3].split()[-4:] == ["0.010000000", "0.01", "100.00", "workflow:run-1"]
    base.wait_for(
        "the run RESUME", lambda: len(actions(control, "workflow:run-1", key)) >= 2 or None
    )
    assert actions(control, "workflow:run-1", key)[-1].action is ControlAction.RESUME

    # Pool concurrency: three 1.5 s calls that overlap; the cap is 2, so THROTTLE 2.
    start = base.now_ms() - 3_000
    for n, agent in enumerate(["g1", "g2", "g3"]):
        send(agent, call(agent, 1, at_ms=start + 100 * n, latency_ms=1_500, pool="gpu"))
    throttle = base.wait_for("the pool THROTTLE", lambda: actions(control, "pool:gpu", key))[0]
    assert throttle.action is ControlAction.THROTTLE and throttle.params == {"concurrency": 2}
    assert "3 calls in flight" in throttle.reason
    assert [a.kind for a in alerts_for(alerts_reader, "pool:gpu")] == [AlertKind.CAPACITY]
    assert worker.state("pool:gpu")["peak_in_flight"] == 3

    # Spawn explosion: a third child of one parent stops the subtree that parent spawned.
    send("root", call("root", 1, workflow_id="fanout"))
    for child in ("k1", "k2"):
        send(child, call(child, 1, workflow_id="fanout", parent_agent_id="root", spawn_depth=1))
    send("k3", call("k3", 1, workflow_id="fanout", parent_agent_id="root", spawn_depth=1))
    stop = base.wait_for("the spawn STOP", lambda: actions(control, "subtree:fanout|root", key))[0]
    assert stop.action is ControlAction.STOP and stop.until_ms is None
    assert "3 children of one parent" in stop.reason
    spawn_alert = base.wait_for(
        "the spawn alert", lambda: alerts_for(alerts_reader, "workflow:fanout")
    )
    assert [a.kind for a in spawn_alert] == [AlertKind.SPAWN_EXPLOSION]

    # Burn rate: a steady $0.001 every 10 s for a minute, then $0.01 at once.
    now = base.now_ms()
    for back in range(60_000, 10_000, -10_000):
        send("burner", call("burner", USD // 1000, at_ms=now - back))
    send("burner", call("burner", USD // 100))
    burn = base.wait_for("the burn-rate alert", lambda: alerts_for(alerts_reader, "agent:burner"))
    assert [a.kind for a in burn] == [AlertKind.BURN_RATE] and "3x or more" in burn[0].message

    # Retry cost share: the second attempt costs half of what the agent spent today.
    send("retrier", call("retrier", USD // 1000))
    send("retrier", call("retrier", USD // 1000, attempt=2, status="ok"))
    refused = base.wait_for(
        "the retry-share command", lambda: actions(control, "agent:retrier", key)
    )
    assert refused[0].action is ControlAction.REFUSE_NEW_WORK
    assert "retries cost $0.001 of $0.002" in refused[0].reason

    # Forecast: 99% of the day's budget spent already projects exhaustion before midnight.
    send("forecaster", call("forecaster", USD * 99 // 100))
    projected = base.wait_for(
        "the forecast alert", lambda: alerts_for(alerts_reader, "agent:forecaster")
    )
    assert [a.kind for a in projected] == [AlertKind.FORECAST]
    day = worker.state("agent:forecaster")["periods"][0]
    assert day["exhausts_before_end"] and day["exhausts_at_ms"] < day["end_ms"]
    assert day["burn_nano_usd_per_hour"] > 0


def test_a_spawn_explosion_stops_its_subtree_while_a_sibling_subtree_works(
    stack_settings: Settings,
    workers: Callable[[], Worker],
    readers: tuple[TopicReader, TopicReader],
    alerts_reader: TopicReader,
) -> None:
    settings = stack_settings
    control, _ = readers
    key = settings.control_key_bytes()
    producer = base.make_producer(settings)
    limits = {"scope": "workflow:tree", "spawn": {"max_children": 2, "action": "stop"}}
    base.publish_policy(producer, settings, BudgetPolicy.model_validate(limits))
    worker = workers()
    worker.wait_ready()
    ledger = Ledger(settings)  # the real shim: Kafka transport and control listener
    try:
        assert ledger.wait_for_control(30.0)
        root = ledger.agent("root", workflow="tree")
        exploding, sibling = root.spawn("lead-1"), root.spawn("lead-2")
        workers_1 = [exploding.spawn(f"w1-{n}") for n in range(3)]  # one over max_children
        workers_2 = [sibling.spawn("w2-0")]  # w2-new below makes 2: at the limit, not over
        for agent in (root, exploding, sibling, *workers_1, *workers_2):
            with agent.call(provider="openai", model="gpt-4o-mini") as made:
                made.record(input_tokens=100, output_tokens=10)
        assert ledger.transport.flush(10) == 0

        (stop,) = base.wait_for(
            "the subtree STOP", lambda: actions(control, "subtree:tree|lead-1", key)
        )
        assert stop.action is ControlAction.STOP and stop.until_ms is None
        assert "3 children of one parent (limit 2; agent lead-1)" in stop.reason

        def refused(agent: Any) -> bool:
            try:
                agent.check_budget()
            except BudgetExceeded as exc:
                return exc.scope == "subtree:tree|lead-1"
            return False

        base.wait_for("the shim to obey the subtree STOP", lambda: refused(workers_1[0]))
        # Every agent under lead-1, one spawned after the STOP too, is refused ...
        for agent in (*workers_1, workers_1[1].spawn("w1-1a"), exploding.spawn("w1-late")):
            with pytest.raises(BudgetExceeded), agent.call(provider="openai", model="gpt-4o"):
                pass
        # ... while lead-1 itself, its sibling's subtree and the root keep working.
        going = (root, exploding, sibling, *workers_2, sibling.spawn("w2-new"))
        for agent in going:
            with agent.call(provider="openai", model="gpt-4o-mini") as made:
                made.record(input_tokens=100, output_tokens=10)
        assert ledger.transport.flush(10) == 0
        assert actions(control, "workflow:tree", key) == []  # the workflow is not stopped
        (alert,) = base.wait_for(
            "the spawn alert", lambda: alerts_for(alerts_reader, "workflow:tree")
        )
        assert alert.kind is AlertKind.SPAWN_EXPLOSION
        assert alert.details["subtree"] == "subtree:tree|lead-1"
        # w2-new's call is counted (the sibling subtree still works); the refused made none.
        state = base.wait_for(
            "w2-new in the workflow's tree",
            lambda: (found := worker.state("workflow:tree"))["agents_seen"] == 8 and found,
        )
        assert state["stopped_subtrees"] == ["subtree:tree|lead-1"]
        assert len(actions(control, "subtree:tree|lead-1", key)) == 1  # published once
    finally:
        ledger.close()


class FlakyHook(BaseHTTPRequestHandler):
    """Answers 500 to the first ``failures`` POSTs, then 200, recording accepted bodies."""

    failures = 2
    hits = 0
    bodies: list[dict[str, Any]] = []  # shared by the server's threads
    lock = threading.Lock()

    def do_POST(self) -> None:  # http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.lock:
            FlakyHook.hits += 1
            failing = FlakyHook.hits <= FlakyHook.failures
            if not failing:
                FlakyHook.bodies.append(json.loads(body))
        self.send_response(500 if failing else 200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def flaky_hook() -> Iterator[str]:
    FlakyHook.hits = 0
    FlakyHook.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyHook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/T000/secret"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_alerts_reach_a_failing_webhook_and_a_high_dlq_rate_alerts(
    stack_settings: Settings,
    workers: Callable[[], Worker],
    readers: tuple[TopicReader, TopicReader],
    alerts_reader: TopicReader,
    flaky_hook: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = stack_settings
    _, dlq = readers
    monkeypatch.setenv("AGENTLEDGER_ALERT_WEBHOOK_URL", flaky_hook)  # the worker inherits it
    producer = base.make_producer(settings)
    policy = {"scope": "agent:a", "limit_usd": "0.01"}
    base.publish_policy(producer, settings, BudgetPolicy.model_validate(policy))
    worker = workers()
    worker.wait_ready()
    base.send(producer, settings.topics.calls, b"a", call("a", 10_000_000))
    (threshold,) = base.wait_for(
        "the threshold alert", lambda: alerts_for(alerts_reader, "agent:a")
    )
    # Two 500s, then delivered, with backoff 0.5 s + 1 s in between.
    base.wait_for("the webhook delivery", lambda: FlakyHook.bodies)
    assert FlakyHook.hits == 3
    assert FlakyHook.bodies == [{"text": f"[critical] threshold agent:a: {threshold.message}"}]
    assert "secret" not in worker.log()  # the URL embeds the webhook's token

    # 101 bad records within a minute: one dlq_rate alert, also delivered to the webhook.
    for n in range(101):
        producer.produce(settings.topics.calls, key=b"junk", value=b"not json %d" % n)
    assert producer.flush(10) == 0
    base.wait_for("101 dead letters", lambda: len(dlq.poll()) >= 101)
    (rate,) = base.wait_for(
        "the dlq rate alert", lambda: alerts_for(alerts_reader, "processor:dlq")
    )
    assert isinstance(rate, Alert) and rate.kind is AlertKind.DLQ_RATE
    base.wait_for("the webhook delivery of the dlq alert", lambda: len(FlakyHook.bodies) >= 2)
    assert FlakyHook.bodies[1]["text"].startswith("[warning] dlq_rate processor:dlq: more than")
