"""The durable spool: append-only segments replayed in order, adopted after a crash, and the
Kafka transport spilling into it when the broker is unreachable, the queue full or at close."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.producers import (
    BudgetExceeded,
    ControlPlaneUnavailable,
    InMemoryTransport,
    KafkaTransport,
    Ledger,
    Spool,
)
from tests.conftest import TEST_CONTROL_KEY, free_port


def drain(spool: Spool) -> list[tuple[str, bytes, bytes]]:
    got = []
    while (segment := spool.take()) is not None:
        records, lines = spool.load(segment)
        got.extend(records)
        spool.done(segment, lines)
    return got


def test_records_come_back_in_order_across_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", segment_bytes=200)
    sent = [("t.calls", b"agent-%d" % (i % 3), bytes([i, 0, 255]) * 10) for i in range(50)]
    for record in sent:
        spool.append(*record)
    assert spool.pending == 50
    directory = next((tmp_path / "spool").iterdir())
    assert len(list(directory.glob("*.jsonl"))) > 5  # rotated
    assert drain(spool) == sent
    assert spool.is_empty()
    spool.append("t.calls", b"k", b"later")
    assert drain(spool) == [("t.calls", b"k", b"later")]
    spool.close()


def test_nothing_is_written_until_the_first_append(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert spool.take() is None
    spool.close()
    assert not (tmp_path / "spool").exists()


def test_a_dead_processes_spool_is_adopted_and_a_live_ones_is_not(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    dead = Spool(root)
    dead.append("t.calls", b"a", b"1")
    dead.append("t.calls", b"a", b"2")
    dead.close()  # its lock is released, as when its process died
    alive = Spool(root)
    alive.append("t.calls", b"b", b"x")
    heir = Spool(root)
    assert heir.adopt_orphans() == 2
    assert drain(heir) == [("t.calls", b"a", b"1"), ("t.calls", b"a", b"2")]
    assert drain(alive) == [("t.calls", b"b", b"x")]
    alive.close()
    heir.close()


def test_orphans_are_found_without_writing_and_adopted_oldest_first(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    assert not Spool(root).has_orphans()
    older, newer = Spool(root), Spool(root)
    older.append("t.calls", b"a", b"old")
    time.sleep(0.02)  # directory names (pid-random) say nothing of age; segment times do
    newer.append("t.calls", b"b", b"new")
    alive = Spool(root)
    alive.append("t.calls", b"c", b"alive")
    assert not Spool(root).has_orphans()  # both still held by their owners
    newer.close()
    older.close()
    before = sorted(p.name for p in root.iterdir())
    assert Spool(root).has_orphans()
    assert sorted(p.name for p in root.iterdir()) == before  # looking wrote nothing
    heir = Spool(root)
    assert heir.adopt_orphans() == 2
    assert drain(heir) == [("t.calls", b"a", b"old"), ("t.calls", b"b", b"new")]
    assert not Spool(root).has_orphans()
    alive.close()
    heir.close()


def test_a_transport_replays_an_orphaned_spool_before_any_send(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    dead = Spool(root)
    dead.append("t.calls", b"a", b"1")
    dead.close()
    transport = KafkaTransport(f"127.0.0.1:{free_port()}", close_timeout_s=0.2, spool=Spool(root))
    # Adopted at construction: the replayer runs, and a first send would queue behind it.
    assert transport.spooling
    transport.send("t.calls", b"a", b"2")
    assert transport.stats.spooled == 1 and transport.stats.sent == 0
    transport.close()
    heir = Spool(root)
    assert heir.adopt_orphans() == 2
    assert drain(heir) == [("t.calls", b"a", b"1"), ("t.calls", b"a", b"2")]
    heir.close()


def test_a_transport_with_nothing_to_adopt_writes_nothing(tmp_path: Path) -> None:
    transport = KafkaTransport(f"127.0.0.1:{free_port()}", spool=Spool(tmp_path / "spool"))
    assert not transport.spooling
    transport.close()
    assert not (tmp_path / "spool").exists()


def test_a_torn_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.append("t.calls", b"a", b"whole")
    spool.close()
    segment = next((tmp_path / "spool").glob("*/*.jsonl"))
    with segment.open("ab") as f:
        f.write(b'{"t":"t.calls","k":"YQ==","v":')  # a crash mid-write
    heir = Spool(tmp_path / "spool")
    assert heir.adopt_orphans() == 2
    assert drain(heir) == [("t.calls", b"a", b"whole")]
    assert heir.torn_lines == 1
    assert heir.is_empty()
    heir.close()


def test_spool_directory_is_locked_while_open(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.append("t", b"k", b"v")
    lock = next((tmp_path / "spool").glob("*/.lock"))
    with lock.open("ab") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = False
        except BlockingIOError:
            locked = True
    assert locked
    spool.close()


def test_dead_broker_events_go_to_the_spool_and_survive_close(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    transport = KafkaTransport(
        f"127.0.0.1:{free_port()}",
        close_timeout_s=0.5,
        spool=Spool(root),
        **{"message.timeout.ms": 800, "reconnect.backoff.max.ms": 200},
    )
    sent = [("t.calls", b"k", b"event-%d" % i) for i in range(20)]
    started = time.monotonic()
    for i, record in enumerate(sent):
        transport.send(*record)
        if i == 0:
            time.sleep(1.0)  # the broker is found unreachable; later sends spool at once
    assert time.monotonic() - started < 5  # never blocked the agent
    transport.close()
    stats = transport.stats
    assert stats.dropped == 0
    assert stats.spooled == 20
    heir = Spool(root)
    assert heir.adopt_orphans() == 20
    # The first one failed delivery after message.timeout.ms and was spooled after the rest.
    assert sorted(drain(heir)) == sorted(sent)
    heir.close()


def test_full_queue_spills_to_the_spool_without_blocking(tmp_path: Path) -> None:
    transport = KafkaTransport(
        f"127.0.0.1:{free_port()}",
        close_timeout_s=0.2,
        spool=Spool(tmp_path / "spool"),
        **{"queue.buffering.max.messages": 2, "message.timeout.ms": 60_000},
    )
    started = time.monotonic()
    for i in range(10):
        transport.send("t.calls", b"k", b"%d" % i)
    assert time.monotonic() - started < 0.5
    assert transport.stats.dropped == 0
    assert transport.stats.spooled >= 8
    assert transport.spooling
    transport.close()
    assert transport.stats.spooled == 10  # the 2 queued ones were purged into the spool


def test_fail_open_by_default_and_fail_closed_when_configured(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    settings = Settings(
        kafka=dead, home=tmp_path, control_key=SecretStr(TEST_CONTROL_KEY), topic_prefix="dead."
    )
    ledgers = {
        "open": Ledger(settings, transport=InMemoryTransport()),
        "closed": Ledger(settings, transport=InMemoryTransport(), fail_closed_after_s=0.5),
    }
    try:
        agents = {name: led.agent("offline", pool="p") for name, led in ledgers.items()}
        # Within the grace period both work.
        for agent in agents.values():
            with agent.call(provider="openai", model="gpt-4o"):
                pass
        time.sleep(0.8)
        with agents["open"].call(provider="openai", model="gpt-4o"):
            pass
        with (
            pytest.raises(ControlPlaneUnavailable, match="unreachable for") as info,
            agents["closed"].call(provider="openai", model="gpt-4o"),
        ):
            pytest.fail("a call ran with the control plane unreachable")
        assert isinstance(info.value, BudgetExceeded)
        with pytest.raises(ControlPlaneUnavailable), agents["closed"].task("t"):
            pass
        assert ledgers["closed"].stats["refused_fail_closed"] == 2
        assert ledgers["open"].stats["events"] == 2
    finally:
        for led in ledgers.values():
            led.close(timeout_s=0.5)


def test_bad_fail_closed_setting_names_it(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, control_key=SecretStr(TEST_CONTROL_KEY))
    with pytest.raises(ValueError, match="fail_closed_after_s"):
        Ledger(settings, transport=InMemoryTransport(), fail_closed_after_s=0)
