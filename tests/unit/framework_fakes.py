"""What the framework integration tests share: the loopback provider fake and exact prices."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from genai_prices import Usage, calc_price

from agentledger.producers.framework import pause_stats
from agentledger.schemas import CallEvent, ControlAction, usd_to_nano
from tests.unit.test_producer_ledger import T0, Harness
from tests.unit.test_producer_sdk import OPENAI_USAGE, RESPONSES_USAGE, FakeApi

__all__ = [
    "OPENAI_USAGE",
    "RESPONSES_USAGE",
    "FakeApi",
    "StopAt",
    "assert_paused_then_resumed",
    "assert_priced",
    "genai_nano",
    "until",
]


def genai_nano(provider: str, model: str, inp: int, out: int, cached: int) -> int:
    """genai-prices' own price of a call at the harness clock's start, in nano-USD."""
    usage = Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=cached)
    at = datetime.fromtimestamp(T0 / 1000, tz=UTC)
    result = calc_price(usage, model_ref=model, provider_id=provider, genai_request_timestamp=at)
    return usd_to_nano(result.total_price)


def assert_priced(event: CallEvent, model: str) -> None:
    """The fake's usage (1200 in, 1000 of them cached, 300 out, 100 reasoning) at ``model``."""
    assert event.used_model == model
    assert (event.input_tokens, event.output_tokens) == (1200, 300)
    assert (event.cached_input_tokens, event.reasoning_tokens) == (1000, 100)
    assert event.priced
    assert event.cost_nano_usd == genai_nano("openai", model, 1200, 300, 1000)


def until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``condition`` (generous deadline: the machine is shared)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class StopAt:
    """A looping agent's tool body: on its ``n``-th run it publishes a STOP for ``scope`` (as
    the processor would mid-run); it always answers "more"."""

    def __init__(self, h: Harness, n: int, scope: str) -> None:
        self.h, self.n, self.scope = h, n, scope
        self.runs = 0

    def __call__(self) -> str:
        self.runs += 1
        if self.runs == self.n:
            self.h.publish(self.scope)
        return "more"


def assert_paused_then_resumed(
    h: Harness, api: FakeApi, scope: str, run: Callable[[], object]
) -> None:
    """Under a standing STOP on ``scope``, ``run`` (a one-call run in pause mode) waits before
    its request; a RESUME, as `agentledger control resume` publishes, lets it finish."""
    h.publish(scope)
    thread = threading.Thread(target=run)
    thread.start()
    stats = pause_stats(h.ledger)
    until(lambda: stats.paused_now == {scope: 1}, "the call to pause")
    assert api.requests == []
    h.publish(scope, ControlAction.RESUME)
    thread.join(30)
    assert not thread.is_alive()
    assert len(h.events()) == 1 and stats.resumed == 1
