"""Ledger -> agent -> call: the event each call emits, and the refusals before a call runs."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.producers import (
    BudgetExceeded,
    ControlState,
    InMemoryTransport,
    KafkaTransport,
    Ledger,
)
from agentledger.schemas import CallEvent, CallStatus, ControlAction, ControlCommand, sign_command
from agentledger.schemas.ids import uuid7_time_ms
from tests.conftest import TEST_CONTROL_KEY

KEY = TEST_CONTROL_KEY.encode()
T0 = 1_795_000_000_000
MIDNIGHT = int(datetime(2026, 11, 24, tzinfo=UTC).timestamp()) * 1000


class FakeClock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock()
        self.transport = InMemoryTransport()
        self.state = ControlState(KEY)
        self.settings = Settings(
            home=tmp_path / "home", topic_prefix="unit.", control_key=SecretStr(TEST_CONTROL_KEY)
        )
        self.ledger = Ledger(
            self.settings,
            transport=self.transport,
            control=self.state,
            clock=self.clock,
            start_control_listener=False,
        )

    def events(self) -> list[CallEvent]:
        return [CallEvent.model_validate_json(v) for _t, _k, v in self.transport.messages]

    def publish(
        self,
        scope: str,
        action: ControlAction = ControlAction.STOP,
        until_ms: int | None = None,
        **extra: object,
    ) -> ControlCommand:
        self.clock.now += 1
        cmd = sign_command(
            ControlCommand(
                scope=scope,
                action=action,
                reason="daily budget of $5.00 spent",
                issued_at_ms=self.clock.now,
                until_ms=until_ms,
                **extra,
            ),
            KEY,
        )  # type: ignore[arg-type]
        assert self.state.apply(cmd.model_dump_json().encode())
        return cmd


def test_event_fields(h: Harness) -> None:
    agent = h.ledger.agent("researcher-1", workflow="wf-1", pool="research", task_type="search")
    with agent.call(provider="openai", model="gpt-4o-mini", attempt=3) as call:
        h.clock.now += 1234
        call.record(
            input_tokens=1200, output_tokens=300, cached_input_tokens=200, reasoning_tokens=100
        )
    ((topic, key, value),) = h.transport.messages
    assert topic == "unit.calls"
    assert key == b"researcher-1"
    event = CallEvent.model_validate_json(value)
    assert value == event.model_dump_json().encode()
    assert call.event == event
    assert event.model_dump(exclude={"event_id", "cost_nano_usd", "pricing_version"}) == {
        "schema_version": 1,
        "event_time_ms": T0,
        "agent_id": "researcher-1",
        "pool": "research",
        "workflow_id": "wf-1",
        "parent_agent_id": None,
        "spawn_depth": 0,
        "task_type": "search",
        "task_id": None,
        "provider": "openai",
        "requested_model": "gpt-4o-mini",
        "used_model": "gpt-4o-mini",
        "input_tokens": 1200,
        "output_tokens": 300,
        "cached_input_tokens": 200,
        "reasoning_tokens": 100,
        "priced": True,
        "latency_ms": 1234,
        "status": CallStatus.OK,
        "attempt": 3,
        "error_type": None,
    }
    assert event.event_id.version == 7
    assert uuid7_time_ms(event.event_id) == T0
    assert event.cost_nano_usd > 0


def test_call_task_type_overrides_the_agents(h: Harness) -> None:
    agent = h.ledger.agent("a", task_type="default-task")
    with agent.call(provider="openai", model="gpt-4o", task_type="special"):
        pass
    with agent.call(provider="openai", model="gpt-4o"):
        pass
    assert [e.task_type for e in h.events()] == ["special", "default-task"]


def test_no_record_means_zero_tokens(h: Harness) -> None:
    with h.ledger.agent("a").call(provider="openai", model="gpt-4o"):
        pass
    (event,) = h.events()
    assert (event.input_tokens, event.output_tokens, event.cost_nano_usd, event.status) == (
        0,
        0,
        0,
        CallStatus.OK,
    )


def test_exception_in_block_is_recorded_and_reraised(h: Harness) -> None:
    class ToolCallFailed(RuntimeError):
        pass

    with (
        pytest.raises(ToolCallFailed, match="boom"),
        h.ledger.agent("a").call(provider="openai", model="gpt-4o") as call,
    ):
        call.record(input_tokens=500, output_tokens=20)
        h.clock.now += 40
        raise ToolCallFailed("boom")
    (event,) = h.events()
    assert (event.status, event.error_type) == (CallStatus.ERROR, "ToolCallFailed")
    assert (event.input_tokens, event.output_tokens, event.latency_ms) == (500, 20, 40)
    assert event.cost_nano_usd > 0


def test_exception_before_any_record_costs_nothing(h: Harness) -> None:
    with (
        pytest.raises(KeyboardInterrupt),
        h.ledger.agent("a").call(provider="openai", model="gpt-4o"),
    ):
        raise KeyboardInterrupt
    (event,) = h.events()
    assert (event.status, event.error_type, event.input_tokens) == (
        CallStatus.ERROR,
        "KeyboardInterrupt",
        0,
    )


def test_recorded_status_is_kept_when_the_block_raises(h: Harness) -> None:
    with (
        pytest.raises(TimeoutError),
        h.ledger.agent("a").call(provider="openai", model="gpt-4o") as call,
    ):
        call.record(status="timeout")
        raise TimeoutError
    (event,) = h.events()
    assert (event.status, event.error_type) == (CallStatus.TIMEOUT, "TimeoutError")


def test_recorded_error_status_without_exception(h: Harness) -> None:
    with h.ledger.agent("a").call(provider="openai", model="gpt-4o") as call:
        call.record(
            input_tokens=10, output_tokens=1, status=CallStatus.ERROR, error_type="ToolCallFailed"
        )
    (event,) = h.events()
    assert (event.status, event.error_type) == (CallStatus.ERROR, "ToolCallFailed")


def test_used_model_is_priced(h: Harness) -> None:
    with h.ledger.agent("a").call(provider="openai", model="gpt-4o") as call:
        call.record(input_tokens=1000, output_tokens=100, used_model="gpt-4o-mini")
    with h.ledger.agent("a").call(provider="openai", model="gpt-4o-mini") as call:
        call.record(input_tokens=1000, output_tokens=100)
    routed, direct = h.events()
    assert (routed.requested_model, routed.used_model) == ("gpt-4o", "gpt-4o-mini")
    assert routed.cost_nano_usd == direct.cost_nano_usd


def test_latency_never_negative_when_the_clock_steps_back(h: Harness) -> None:
    with h.ledger.agent("a").call(provider="openai", model="gpt-4o"):
        h.clock.now -= 5000
    assert h.events()[0].latency_ms == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_tokens": -1}, "input_tokens must be an int from 0"),
        ({"output_tokens": 1.5}, "output_tokens must be an int"),
        ({"input_tokens": 10, "cached_input_tokens": 11}, "cached_input_tokens \\(11\\) is part"),
        ({"output_tokens": 1, "reasoning_tokens": 2}, "reasoning_tokens \\(2\\) is part"),
        ({"status": "exploded"}, "status must be one of ok, error"),
        ({"used_model": "gpt 4o"}, "used_model must be 1-200 characters"),
    ],
)
def test_bad_usage_names_the_field(h: Harness, kwargs: dict[str, object], message: str) -> None:
    with (
        pytest.raises(ValueError, match=message),
        h.ledger.agent("a").call(provider="openai", model="gpt-4o") as call,
    ):
        call.record(**kwargs)  # type: ignore[arg-type]
    # The failed record() is itself the block's exception: the call is still on record.
    assert [e.error_type for e in h.events()] == ["ValueError"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda led: led.agent("has space"), "agent_id must be 1-200 characters"),
        (lambda led: led.agent("a", pool=""), "pool must be"),
        (lambda led: led.agent("a", workflow="x" * 201), "workflow must be"),
        (lambda led: led.agent("a").call(provider="open ai", model="m"), "provider must be"),
        (
            lambda led: led.agent("a").call(provider="openai", model="m", attempt=0),
            "attempt must be an int from 1",
        ),
    ],
)
def test_bad_identity_names_the_field(
    h: Harness, make: Callable[[Ledger], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make(h.ledger)
    assert h.transport.messages == []


@pytest.mark.parametrize(
    "scope", ["agent:researcher-1", "pool:research", "workflow:wf-1", "task_type:search"]
)
def test_stop_for_any_scope_refuses_before_the_block(h: Harness, scope: str) -> None:
    agent = h.ledger.agent("researcher-1", workflow="wf-1", pool="research")
    h.publish(
        scope,
        limit_nano_usd=5_000_000_000,
        spend_nano_usd=5_001_200_000,
        until_ms=MIDNIGHT,
        params={"period": "day"},
    )
    ran = False
    with (
        pytest.raises(BudgetExceeded) as info,
        agent.call(provider="openai", model="gpt-4o-mini", task_type="search"),
    ):
        ran = True
    assert ran is False
    assert h.transport.messages == []
    exc = info.value
    assert exc.scope == scope
    assert (exc.limit_usd, exc.spend_usd) == (Decimal("5"), Decimal("5.0012"))
    assert exc.resets_at_ms == MIDNIGHT
    assert exc.reason == "daily budget of $5.00 spent"
    assert str(exc) == (
        f"budget exceeded for {scope}: spent $5.0012 of $5.00 (day); resets 2026-11-24T00:00:00Z"
    )
    assert h.ledger.stats["refused"] == 1


def test_stop_for_another_agent_or_pool_does_not_refuse(h: Harness) -> None:
    h.publish("agent:someone-else")
    h.publish("pool:other")
    with h.ledger.agent("a", pool="mine").call(provider="openai", model="gpt-4o"):
        pass
    assert len(h.events()) == 1


def test_resume_lifts_the_stop(h: Harness) -> None:
    agent = h.ledger.agent("a", pool="p")
    h.publish("pool:p")
    with pytest.raises(BudgetExceeded), agent.call(provider="openai", model="gpt-4o"):
        pass
    h.publish("pool:p", ControlAction.RESUME)
    with agent.call(provider="openai", model="gpt-4o"):
        pass
    assert len(h.events()) == 1


def test_stop_lapses_at_until_ms(h: Harness) -> None:
    agent = h.ledger.agent("a")
    h.publish("agent:a", until_ms=T0 + 60_000)
    h.clock.now = T0 + 59_999
    with pytest.raises(BudgetExceeded), agent.call(provider="openai", model="gpt-4o"):
        pass
    h.clock.now = T0 + 60_000
    with agent.call(provider="openai", model="gpt-4o"):
        pass
    assert len(h.events()) == 1


def test_other_actions_do_not_refuse_calls(h: Harness) -> None:
    throttle = h.publish("agent:a", ControlAction.THROTTLE, params={"concurrency": 1})
    agent = h.ledger.agent("a")
    with agent.call(provider="openai", model="gpt-4o"):
        pass
    assert len(h.events()) == 1
    assert agent.standing() == [throttle]


def test_budget_exceeded_is_not_a_retryable_error() -> None:
    exc = BudgetExceeded("agent:a", "spent")
    assert type(exc).__mro__ == (BudgetExceeded, Exception, BaseException, object)
    assert not isinstance(exc, OSError | TimeoutError | ConnectionError)


@pytest.mark.parametrize(("days", "word"), [(1, " (day)"), (7, " (week)"), (3, "")])
def test_period_named_from_the_window_the_processor_states(days: int, word: str) -> None:
    day_ms = 24 * 3600 * 1000
    cmd = ControlCommand(
        scope="agent:a",
        action=ControlAction.STOP,
        reason="r",
        limit_nano_usd=5_000_000_000,
        spend_nano_usd=5_000_000_001,
        period_start_ms=MIDNIGHT - days * day_ms,
        until_ms=MIDNIGHT,
        issued_at_ms=T0,
    )
    assert str(BudgetExceeded.from_command(cmd)) == (
        f"budget exceeded for agent:a: spent $5.000000001 of $5.00{word}; "
        "resets 2026-11-24T00:00:00Z"
    )


def test_budget_exceeded_message_without_amounts_and_pickling() -> None:
    exc = BudgetExceeded("workflow:w", "stopped by operator")
    assert str(exc) == "budget exceeded for workflow:w: stopped by operator"
    full = BudgetExceeded(
        "agent:a",
        "r",
        limit_usd=Decimal("5"),
        spend_usd=Decimal("5.5"),
        resets_at_ms=0,
        period="week",
    )
    copy = pickle.loads(pickle.dumps(full))
    assert (copy.scope, copy.limit_usd, copy.spend_usd, copy.resets_at_ms, str(copy)) == (
        "agent:a",
        Decimal("5"),
        Decimal("5.5"),
        0,
        str(full),
    )
    assert str(full) == (
        "budget exceeded for agent:a: spent $5.50 of $5.00 (week); resets 1970-01-01T00:00:00Z"
    )


def test_construction_has_no_side_effects(tmp_path: Path) -> None:
    home = tmp_path / "fresh-home"
    settings = Settings(home=home, topic_prefix="lazy.", kafka="127.0.0.1:1")
    ledger = Ledger(settings)
    assert isinstance(ledger.transport, KafkaTransport)
    assert not home.exists()  # no control.key written, nothing opened
    assert ledger._listener is None
    ledger.close()


def test_listener_starts_lazily_and_close_stops_it(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        topic_prefix="lazy.",
        kafka="127.0.0.1:1",
        control_key=SecretStr(TEST_CONTROL_KEY),
    )
    ledger = Ledger(settings, transport=InMemoryTransport())
    assert ledger._listener is None
    ledger.agent("a")
    listener = ledger._listener
    assert listener is not None and listener.running
    ledger.close()
    assert not listener.running
    ledger.close()  # idempotent


def test_events_after_close_are_dropped_not_raised(h: Harness) -> None:
    h.ledger.close()
    with h.ledger.agent("a").call(provider="openai", model="gpt-4o"):
        pass
    assert h.transport.messages == []
    assert h.transport.stats.dropped == 1


def test_invalid_event_goes_to_the_dlq(h: Harness) -> None:
    h.clock.now = -5  # a broken injected clock cannot produce a valid event time
    with h.ledger.agent("a").call(provider="openai", model="gpt-4o"):
        pass
    ((topic, key, value),) = h.transport.messages
    assert topic == "unit.dlq"
    assert key == b"unit.calls:0"
    assert b"event_time_ms" in value and b'"component":"shim"' in value
    assert h.ledger.stats["dead_lettered"] == 1


def test_import_is_light_and_side_effect_free() -> None:
    code = (
        "import sys, threading\n"
        "import agentledger.producers\n"
        "heavy = [m for m in ('faust', 'chdb', 'clickhouse_connect', 'aiokafka', 'mode')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
