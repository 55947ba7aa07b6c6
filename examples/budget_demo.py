"""What the three framework examples share: the command line, the $0.02 daily budget they run
under on the local stack (``agentledger up``), the offline model's answer, and how a run ends.

Each example imports it as a sibling module (run them as ``python examples/<name>.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal

from agentledger.budgets import apply_policies
from agentledger.config import Settings
from agentledger.producers import AgentLedger, BudgetExceeded, Ledger
from agentledger.producers.framework import Pause
from agentledger.schemas import BudgetPolicy, PolicyFile

__all__ = [
    "LATENCY_S",
    "LIMIT_USD",
    "OFFLINE_MODEL",
    "OFFLINE_USAGE",
    "TOOL_ARGS",
    "Demo",
    "parse",
    "search_result",
]

LATENCY_S = 0.05  # the offline model takes time to answer, as a real one does
LIMIT_USD = Decimal("0.02")
OFFLINE_MODEL = "gpt-4o-mini"  # what the offline model says it is, so it is priced as that
OFFLINE_USAGE = (20_000, 500)  # (input, output) tokens of each offline answer
TOOL_ARGS = {"query": "more"}  # the offline model always asks for search(query="more")


def search_result(query: str) -> str:
    """What the examples' search tool answers: never enough, so the agent loops."""
    return f"nothing new about {query}; search again"


def parse(doc: str | None, limit: str, limit_help: str) -> argparse.Namespace:
    """``--offline``, ``--pause S`` and the framework's own step limit ``--<limit>``."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="use an in-process fake model")
    parser.add_argument("--pause", type=float, help="wait up to this many seconds for a resume")
    parser.add_argument(f"--{limit}", type=int, default=400, help=limit_help)
    return parser.parse_args()


class Demo:
    """The example's agent under its budget, and the end of its run reported."""

    def __init__(self, ledger: Ledger, agent: AgentLedger, pause: Pause | None) -> None:
        self.ledger = ledger
        self.agent = agent
        self.pause = pause

    @classmethod
    @contextmanager
    def start(cls, agent_id: str, args: argparse.Namespace) -> Iterator[Demo]:
        """Publish the budget of ``agent:<agent_id>``, then a ledger that knows it."""
        settings = Settings()
        budget = BudgetPolicy(scope=f"agent:{agent_id}", limit_usd=LIMIT_USD)
        apply_policies(settings, PolicyFile(budgets=[budget]))
        with Ledger(settings) as ledger:
            ledger.wait_for_control(10)
            agent = ledger.agent(agent_id, workflow="wf-example", pool="examples")
            yield cls(ledger, agent, Pause(timeout_s=args.pause) if args.pause else None)

    def run(self, work: Callable[[], object]) -> int:
        """Run ``work`` until it ends or its budget stops it; say which."""
        try:
            work()
            print("the run finished within its step limit")
        except BudgetExceeded as stop:
            print(f"stopped after {self.ledger.stats['events']} calls: {stop}")
        return 0
