"""The routing part of `agentledger demo`: two agents that can both summarize, one on a model
about 16x cheaper per token; the router picks by mode once the processor's stats are in, and
says so when the evidence is thin."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from agentledger.config import Settings

__all__ = ["run_routing_demo"]

CALLS_PER_AGENT = 24
# Simulated service times: the cheap model is slower here, so speed and budget disagree.
AGENTS = {"mini": ("gpt-4o-mini", 0.030), "full": ("gpt-4o", 0.010)}


def run_routing_demo(settings: Settings, run: str, say: Callable[[str], None] = print) -> bool:
    """Make the calls, wait for their stats, print one decision per mode; False when the stats
    never arrived."""
    from agentledger.producers import Ledger, Router, RoutingPolicy

    names = {key: f"summarizer-{key}-{run}" for key in AGENTS}
    say(f"== routing: {', '.join(names.values())} both summarize; {CALLS_PER_AGENT} calls each")
    ledger = Ledger(settings)
    explore = random.Random(run)  # noqa: S311 - exploration, not security
    router = Router(ledger, policy=RoutingPolicy(min_samples=20), rng=explore)
    try:
        router.wait_for_stats(15.0)
        rng = random.Random(run)  # noqa: S311 - simulation, not security
        for key, (model, delay) in AGENTS.items():
            agent = ledger.agent(names[key], pool="summarizers")
            for _ in range(CALLS_PER_AGENT):
                with (
                    agent.task("summarize-demo"),
                    agent.call(provider="openai", model=model) as call,
                ):
                    time.sleep(delay)
                    call.record(input_tokens=rng.randrange(800, 1600), output_tokens=200)
        ledger.transport.flush(10.0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = [router.stats.summary(f"agent:{n}", "summarize-demo") for n in names.values()]
            if all(s is not None and s.calls >= CALLS_PER_AGENT for s in got):
                break
            time.sleep(0.2)
        else:
            say("!! the routing stats did not arrive within 30 s; is the processor running?")
            return False
        candidates = list(names.values())
        for mode in ("budget", "speed", "balanced"):
            decision = router.choose("summarize-demo", candidates, mode)
            say(f"   {mode:8} -> {decision.chosen}: {decision.reasons[0]}")
        thin = router.choose("review-demo", candidates, "budget")
        say(f"   new task type -> {thin.status.value}: {thin.reasons[-1][:160]}")
        return True
    finally:
        router.close()
        ledger.close()
