"""The shim with its broker stopped: ``close()`` returns promptly and keeps every event in the
spool, and the next process replays a spool at start, in order, without sending anything of its
own. Each test stops and restarts a PRIVATE broker (not the session one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from agentledger.config import Settings
from agentledger.deploy import KafkaBroker
from agentledger.producers import KafkaTransport, Ledger, Spool
from agentledger.schemas import CallEvent
from agentledger.schemas.topic_specs import topic_specs
from agentledger.topic_admin import ensure_topics
from tests.conftest import TEST_CONTROL_KEY, SettingsFactory
from tests.integration.test_producer_spool import private_broker, read_event_ids

__all__ = ["private_broker"]


def spooled_event_ids(root: Path) -> list[str]:
    """The event ids on disk under a spool root, segment by segment, in file order."""
    reader = Spool(root / "reader")
    ids: list[str] = []
    for segment in sorted(root.glob("*/*.jsonl")):
        records, _ = reader.load(segment)
        ids += [str(CallEvent.model_validate_json(value).event_id) for _, _, value in records]
    return ids


def emit(ledger: Ledger, agent_id: str, n: int) -> list[str]:
    agent = ledger.agent(agent_id, pool="outage")
    ids: list[str] = []
    for _ in range(n):
        with agent.call(provider="openai", model="gpt-4o-mini") as call:
            call.record(input_tokens=100, output_tokens=10)
        assert call.event is not None
        ids.append(str(call.event.event_id))
    return ids


def first_occurrences(ids: list[str], wanted: set[str]) -> list[str]:
    """``ids`` filtered to ``wanted``, each once where it first came (a retried replay may
    repeat some, with the same event id)."""
    seen: set[str] = set()
    order: list[str] = []
    for event_id in ids:
        if event_id in wanted and event_id not in seen:
            seen.add(event_id)
            order.append(event_id)
    return order


def wait_replayed(transport: KafkaTransport, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while transport.stats.replayed < n:
        assert time.monotonic() < deadline, (
            f"replayed {transport.stats.replayed} of {n} in {timeout_s:.0f}s: {transport.stats}"
        )
        time.sleep(0.1)


def test_close_with_the_broker_stopped_is_prompt_and_spools_what_is_left(
    private_broker: KafkaBroker, settings_factory: SettingsFactory
) -> None:
    settings: Settings = settings_factory(kafka=private_broker.bootstrap)
    ensure_topics(settings.kafka, topic_specs(settings.topics))
    ledger = Ledger(settings)  # the default transport: Kafka with a spool under home
    ledger.wait_for_control(30.0)  # the control listener runs too, as in an agent
    before = emit(ledger, "closer", 50)
    assert ledger.transport.flush(30.0) == 0
    private_broker.stop(timeout_s=30)
    during = emit(ledger, "closer", 100)
    started = time.monotonic()
    ledger.close()
    took = time.monotonic() - started
    transport = ledger.transport
    assert isinstance(transport, KafkaTransport)
    assert transport.stats.dropped == 0
    # Every event sent while the broker was down is on disk, none twice.
    on_disk = spooled_event_ids(settings.home / "spool")
    assert sorted(on_disk) == sorted(during)
    # The project's generous bound for "never blocked" (timings live in the print below).
    assert took < 5.0
    print(
        f"\nclose() with the broker stopped: {took:.3f}s, {transport.stats.spooled} spooled "
        f"({transport.stats.sent} had reached librdkafka's queue first)"
    )

    private_broker.start(timeout_s=120)
    heir = Ledger(settings, start_control_listener=False)  # sends nothing of its own
    heir_transport = heir.transport
    assert isinstance(heir_transport, KafkaTransport)
    wait_replayed(heir_transport, len(during), 90.0)
    heir.close()
    assert heir_transport.stats.sent == 0
    got = read_event_ids(settings.kafka, settings.topics.calls, len(before) + len(during), 60.0)
    assert set(got) == set(before) | set(during)
    assert not spooled_event_ids(settings.home / "spool")


CHILD = textwrap.dedent(
    """
    import sys, time
    from agentledger.producers import Ledger

    ledger = Ledger.from_env(start_control_listener=False)
    agent = ledger.agent("orphan-1", pool="outage")
    transport = ledger.transport
    with agent.call(provider="openai", model="gpt-4o-mini") as call:  # finds the broker down
        call.record(input_tokens=1, output_tokens=1)
    deadline = time.monotonic() + 60
    while not transport.spooling:  # from here on every send goes to the spool
        assert time.monotonic() < deadline, "the outage was never noticed"
        transport.flush(0.05)
    for _ in range(int(sys.argv[1])):
        with agent.call(provider="openai", model="gpt-4o-mini") as call:
            call.record(input_tokens=100, output_tokens=10)
        print(call.event.event_id, flush=True)
    print("SPOOLED", flush=True)
    time.sleep(600)
    """
)


def test_a_killed_processes_spool_is_replayed_in_order_by_a_ledger_that_sends_nothing(
    private_broker: KafkaBroker, settings_factory: SettingsFactory, tmp_path: Path
) -> None:
    settings: Settings = settings_factory(kafka=private_broker.bootstrap)
    ensure_topics(settings.kafka, topic_specs(settings.topics))
    private_broker.stop(timeout_s=30)
    script = tmp_path / "orphan.py"
    script.write_text(CHILD)
    env = {
        **os.environ,
        "AGENTLEDGER_KAFKA": settings.kafka,
        "AGENTLEDGER_HOME": str(settings.home),
        "AGENTLEDGER_CONTROL_KEY": TEST_CONTROL_KEY,
        "AGENTLEDGER_TOPIC_PREFIX": settings.topic_prefix,
    }
    child = subprocess.Popen(
        [sys.executable, str(script), "40"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert child.stdout is not None
        emitted: list[str] = []
        for line in child.stdout:
            if line.strip() == "SPOOLED":
                break
            emitted.append(line.strip())
        assert len(emitted) == 40, f"the child stopped early: {emitted}"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert spooled_event_ids(settings.home / "spool") == emitted  # in order, on disk

    private_broker.start(timeout_s=120)
    heir = Ledger(settings, start_control_listener=False)  # builds it, sends nothing
    transport = heir.transport
    assert isinstance(transport, KafkaTransport)
    try:
        wait_replayed(transport, len(emitted), 90.0)
        assert transport.stats.sent == 0
    finally:
        heir.close()
    got = read_event_ids(settings.kafka, settings.topics.calls, len(emitted), 60.0)
    # One agent, one key, one partition: the calls topic has them in the order they were sent.
    assert first_occurrences(got, set(emitted)) == emitted
    assert not spooled_event_ids(settings.home / "spool")
    print(f"\norphaned spool: {len(emitted)} events replayed in order at start, 0 sent")
