"""Pause records: the schema and its key, what a pausing framework call publishes (record while
it waits, refreshes, tombstone at the end), and the dashboard's board and snapshot of them."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from agentledger.dashboard.feeds import PauseBoard
from agentledger.dashboard.view import RateTracker, build_snapshot
from agentledger.producers import BudgetExceeded
from agentledger.producers.framework import Pause, PauseStats, admit, pause_stats
from agentledger.schemas import ControlAction, PauseRecord, pause_key
from agentledger.schemas.pause import STALE_AFTER_REFRESHES
from tests.unit.framework_fakes import until
from tests.unit.test_producer_ledger import T0, Harness

RECORD = {
    "process": "host-1.4242.ab12cd34",
    "host": "host-1",
    "pid": 4242,
    "scope": "agent:a",
    "agents": ["a"],
    "calls": 2,
    "reason": "budget exceeded for agent:a: spent $5.00 of $5.00 (day)",
    "since_ms": T0,
    "waits_until_ms": T0 + 60_000,
    "resets_at_ms": T0 + 3_600_000,
    "updated_at_ms": T0 + 1_000,
    "refresh_ms": 10_000,
}


def record(**changes: object) -> PauseRecord:
    return PauseRecord.model_validate({**RECORD, **changes})


def encoded(**changes: object) -> bytes:
    return record(**changes).model_dump_json().encode()


def test_record_round_trips_and_is_keyed_by_process_and_scope() -> None:
    rec = record()
    assert PauseRecord.model_validate_json(rec.model_dump_json()) == rec
    assert (
        rec.key() == pause_key("host-1.4242.ab12cd34", "agent:a") == b"host-1.4242.ab12cd34|agent:a"
    )
    # Subtree scopes are keyed apart from the agent's own.
    assert record(scope="subtree:wf|a").key() != rec.key()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"scope": "a"}, "scope"),
        ({"calls": 0}, "calls"),
        ({"agents": []}, "agents"),
        ({"agents": ["bad agent"]}, "agents"),
        ({"process": "has|bar"}, "process"),
        ({"waits_until_ms": T0 - 1}, "waits_until_ms"),
        ({"updated_at_ms": T0 - 1}, "updated_at_ms"),
        ({"refresh_ms": 0}, "refresh_ms"),
        ({"extra": 1}, "extra"),
    ],
)
def test_bad_records_name_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        record(**changes)


def test_a_record_goes_stale_after_missed_refreshes_or_its_deadline() -> None:
    rec = record()
    assert rec.live(T0 + 1_000 + STALE_AFTER_REFRESHES * 10_000)
    assert not rec.live(T0 + 1_001 + STALE_AFTER_REFRESHES * 10_000)
    assert not record(waits_until_ms=T0 + 5_000).live(T0 + 5_000)


class Published:
    """A publish function that keeps what it was given, decoded."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, PauseRecord | None]] = []
        self.lock = threading.Lock()

    def __call__(self, key: bytes, value: bytes | None) -> bool:
        decoded = None if value is None else PauseRecord.model_validate_json(value)
        with self.lock:
            self.sent.append((key, decoded))
        return True

    def records(self) -> list[PauseRecord | None]:
        with self.lock:
            return [r for _, r in self.sent]


def test_a_paused_call_publishes_while_it_waits_and_a_tombstone_when_it_resumes(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    stats = pause_stats(h.ledger)
    assert stats.publish is None  # an in-memory transport has no pauses topic
    published = Published()
    stats.publish = published
    stats.refresh_s = 0.02
    agent = h.ledger.agent("a")
    stop = h.publish("agent:a", until_ms=h.clock.now + 3_600_000)
    done = threading.Event()

    def run() -> None:
        call = admit(
            lambda: agent.call(provider="openai", model="gpt-4o"),
            agent,
            Pause(timeout_s=60, poll_s=0.01),
        )
        call.__exit__(None, None, None)
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    until(lambda: len(published.records()) >= 3, "the record and two refreshes")
    first = published.records()[0]
    assert first is not None
    assert (first.scope, first.agents, first.calls) == ("agent:a", ["a"], 1)
    assert first.resets_at_ms == stop.until_ms
    assert first.since_ms == h.clock.now
    assert first.waits_until_ms == h.clock.now + 60_000
    assert "budget exceeded for agent:a" in first.reason
    assert first.process == stats.process
    assert stats.record("agent:a") is not None
    h.clock.now += 5_000
    until(lambda: (published.records()[-1] or first).updated_at_ms == h.clock.now, "a refresh")
    assert not done.is_set()
    h.publish("agent:a", ControlAction.RESUME)  # what `agentledger control resume` publishes
    thread.join(30)
    assert done.is_set()
    key, last = published.sent[-1]
    assert (key, last) == (pause_key(stats.process, "agent:a"), None)
    assert {k for k, _ in published.sent} == {key}
    assert stats.record("agent:a") is None
    assert (stats.pauses, stats.resumed, stats.paused_now) == (1, 1, {})


def test_two_waiting_calls_share_one_record_until_both_end(tmp_path: Path) -> None:
    stats = PauseStats(clock_ms=lambda: T0)
    published = Published()
    stats.publish = published
    refusal = BudgetExceeded("pool:p", "stopped", resets_at_ms=None)
    first, second = object(), object()
    stats._begin(first, "a", refusal, 10)
    stats._begin(second, "b", refusal, 30)
    both = published.records()[-1]
    assert both is not None
    assert (both.calls, both.agents, both.waits_until_ms) == (2, ["a", "b"], T0 + 30_000)
    stats._end(first, "pool:p", resumed=False)
    one = published.records()[-1]
    assert one is not None and (one.calls, one.agents) == (1, ["b"])
    stats._end(second, "pool:p", resumed=True)
    assert published.records()[-1] is None
    assert (stats.timed_out, stats.resumed) == (1, 1)


def test_a_failed_publish_is_counted_not_raised() -> None:
    stats = PauseStats(lambda _k, _v: False, clock_ms=lambda: T0)
    call = object()
    stats._begin(call, "a", BudgetExceeded("agent:a", "stopped"), 1)
    stats._end(call, "agent:a", resumed=True)
    assert stats.publish_failures == 2


def test_board_follows_records_and_tombstones_and_rejects_bad_ones() -> None:
    board = PauseBoard()
    rec = record()
    board.apply(rec.key(), rec.model_dump_json().encode())
    other = record(process="host-2.1.00000000", host="host-2", scope="pool:p", since_ms=T0 - 5)
    board.apply(other.key(), other.model_dump_json().encode())
    assert board.live(T0 + 2_000) == [other, rec]  # oldest first
    # A newer record for the same key replaces it.
    board.apply(rec.key(), encoded(calls=1, updated_at_ms=T0 + 1_500))
    assert [r.calls for r in board.live(T0 + 2_000)] == [2, 1]
    board.apply(rec.key(), None)  # the pause ended
    assert board.live(T0 + 2_000) == [other]
    # Bad records change nothing and say why.
    board.apply(b"x|agent:a", b"{not json")
    board.apply(b"someone-else|agent:a", encoded())
    board.apply(None, encoded())
    assert board.rejected == 3
    assert board.last_rejection is not None and "without a key" in board.last_rejection
    assert board.live(T0 + 2_000) == [other]
    # Stale: no refresh for three periods.
    assert board.live(T0 + 1_001 + 3 * 10_000) == []


def test_snapshot_lists_pauses_and_marks_the_scope_row() -> None:
    report = {
        "scope": "agent:a",
        "periods": [
            {
                "period": "day",
                "start_ms": T0,
                "end_ms": T0 + 86_400_000,
                "spend_nano_usd": 5_000_000_000,
                "limit_nano_usd": 5_000_000_000,
            }
        ],
    }
    snap = build_snapshot(
        now_ms=T0 + 2_000,
        scopes_body={"scopes": [report]},
        standing={},
        alerts=[],
        paused=[record(), record(process="host-2.1.00000000", calls=3)],
        history=None,
        rates=RateTracker(),
        health={},
    )
    assert snap["scopes"][0]["paused_calls"] == 5
    assert [(p["process"], p["calls"]) for p in snap["paused"]] == [
        ("host-1.4242.ab12cd34", 2),
        ("host-2.1.00000000", 3),
    ]
    assert snap["paused"][0]["resets_at_ms"] == T0 + 3_600_000
    json.dumps(snap)  # JSON-ready
