"""Fuzzing the shim's input validation with hypothesis: whatever an agent passes as ids, model
names, token counts, status or error type, the shim either emits a valid CallEvent or raises
ValueError naming the argument."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.producers import ControlState, InMemoryTransport, Ledger
from agentledger.producers.errors import UnpricedModelWarning
from agentledger.schemas import CallEvent
from tests.conftest import TEST_CONTROL_KEY

anything = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=210)
    | st.binary(max_size=10)
    | st.lists(st.integers(), max_size=2)
)
ids = st.from_regex(r"[A-Za-z0-9._:/@+\-]{1,30}", fullmatch=True) | anything
tokens = st.integers(min_value=0, max_value=5_000) | anything

IDENTITY = ("agent_id", "workflow", "pool", "task_type")
CALL = ("provider", "model")
RECORD = ("input_tokens", "output_tokens", "status", "error_type", "used_model")


def make_ledger(home: Path) -> tuple[Ledger, InMemoryTransport]:
    transport = InMemoryTransport()
    settings = Settings(home=home, topic_prefix="fuzz.", control_key=SecretStr(TEST_CONTROL_KEY))
    ledger = Ledger(
        settings,
        transport=transport,
        control=ControlState(TEST_CONTROL_KEY.encode()),
        clock=lambda: 1_795_478_400_000,
        start_control_listener=False,
    )
    return ledger, transport


def one_call(ledger: Ledger, values: dict[str, Any]) -> None:
    agent = ledger.agent(
        values["agent_id"],
        workflow=values["workflow"],
        pool=values["pool"],
        task_type=values["task_type"],
    )
    # A well-formed but unknown model is recorded unpriced, with a warning: expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnpricedModelWarning)
        with agent.call(provider=values["provider"], model=values["model"]) as call:
            call.record(
                input_tokens=values["input_tokens"],
                output_tokens=values["output_tokens"],
                status=values["status"],
                error_type=values["error_type"],
                used_model=values["used_model"],
            )


@settings(max_examples=400, deadline=None)
@given(
    values=st.fixed_dictionaries(
        {
            "agent_id": ids,
            "workflow": ids,
            "pool": ids,
            "task_type": ids,
            "provider": st.sampled_from(["openai", "anthropic"]) | ids,
            "model": st.sampled_from(["gpt-4o-mini", "gpt-4o"]) | ids,
            "input_tokens": tokens,
            "output_tokens": tokens,
            "status": st.sampled_from(["ok", "error", "timeout"]) | anything,
            "error_type": st.none() | st.text(max_size=250) | anything,
            "used_model": st.none() | ids,
        }
    )
)
def test_bad_arguments_raise_a_value_error_naming_them(values: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ledger, transport = make_ledger(Path(tmp) / "home")
        try:
            one_call(ledger, values)
        except ValueError as exc:
            named = [
                field
                for field in IDENTITY + CALL + RECORD
                if field in str(exc) or field.replace("workflow", "workflow_id") in str(exc)
            ]
            assert named, f"the error names no argument: {exc}"
        else:
            assert len(transport.messages) == 1
            event = CallEvent.model_validate_json(transport.messages[0][2])
            assert event.agent_id == values["agent_id"]
            assert event.input_tokens == values["input_tokens"]
        finally:
            ledger.close()


@settings(max_examples=100, deadline=None)
@given(agent=ids.filter(lambda v: isinstance(v, str)), tokens_in=st.integers(0, 10**6))
def test_valid_arguments_are_recorded(agent: str, tokens_in: int) -> None:
    # The valid side of the fuzz above, which random combinations reach only rarely.
    with tempfile.TemporaryDirectory() as tmp:
        ledger, transport = make_ledger(Path(tmp) / "home")
        values = dict.fromkeys(IDENTITY, "x-1") | {"agent_id": agent}
        values |= {"provider": "openai", "model": "gpt-4o-mini", "used_model": None}
        values |= {"input_tokens": tokens_in, "output_tokens": 7, "status": "ok"}
        values |= {"error_type": None}
        try:
            one_call(ledger, values)
        except ValueError as exc:
            assert "agent_id" in str(exc)
            return
        finally:
            ledger.close()
        event = CallEvent.model_validate_json(transport.messages[0][2])
        assert (event.agent_id, event.input_tokens) == (agent, tokens_in)
