"""The processor's own work per calls event, without faust or Kafka: CPU time per stage.

The bench events and policies of `bench.processor_bench` go through what `Processor.on_calls`
does per batch (parse, routing stats, counting folded per agent, the agent's decision, its
table value, the forwarded costs per scope), timed with `time.process_time`. Sends and
changelog writes are left out: this is the part our code controls, next to faust's own
per-message cost measured by `bench.processor_bench`.

    AGENTLEDGER_TRACES=../shared/data .venv/bin/python -m bench.processor_core --batch 200
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from agentledger.schemas import BudgetPolicy, CallEvent
from agentledger.stream_processors.decisions import evaluate
from agentledger.stream_processors.fold import SpendFold
from agentledger.stream_processors.policies import PolicyBook
from agentledger.stream_processors.precedence import matching_policies
from agentledger.stream_processors.scopes import (
    ScopeCost,
    encode_scope_costs,
    forwarded_costs,
)
from agentledger.stream_processors.state import SpendState
from agentledger.stream_processors.state_codec import encode_state
from agentledger.stream_processors.stats import StatsAggregator

from .pipeline import _payloads
from .processor_bench import BENCH_POLICIES

__all__ = ["main", "measure"]

STAGES = ("parse", "stats", "count", "decide", "encode", "forward")


def _book() -> PolicyBook:
    book = PolicyBook()
    for raw in BENCH_POLICIES["budgets"]:
        policy = BudgetPolicy.model_validate(raw)
        reason = book.apply(policy.key.encode(), policy.model_dump_json().encode())
        if reason is not None:
            raise RuntimeError(reason)
    return book


def measure(count: int, batch: int) -> dict[str, Any]:
    payloads = _payloads(count)
    book = _book()
    now = time.time_ns() // 1_000_000
    stats = StatsAggregator(lambda: now)
    states: dict[str, SpendState] = {}
    governing: dict[str, list[BudgetPolicy]] = {}
    spent = dict.fromkeys(STAGES, 0.0)
    clock = time.process_time
    for start in range(0, count, batch):
        t0 = clock()
        by_agent: dict[str, list[tuple[CallEvent, int]]] = {}
        for offset, (_key, value) in enumerate(payloads[start : start + batch], start=start):
            event = CallEvent.model_validate_json(value)
            by_agent.setdefault(event.agent_id, []).append((event, offset))
        t1 = clock()
        for items in by_agent.values():
            for event, offset in items:
                stats.count(event, 0, offset)
        t2 = clock()
        forwards: dict[str, list[ScopeCost]] = {}
        for agent, items in by_agent.items():
            c0 = clock()
            fold = SpendFold(states.get(agent, SpendState()), now_ms=now, plan=book.plan)
            for event, offset in items:
                event_id = event.event_id.hex
                fold.add_event(event, event_id, 0, offset)
                for cost in forwarded_costs(event, 0, offset, event_id):
                    forwards.setdefault(cost.scope, []).append(cost)
            state = fold.result()
            c1 = clock()
            scope = f"agent:{agent}"
            if scope not in governing:
                governing[scope] = matching_policies(book.policies.values(), scope)
            evaluate(state, book.policies, scope, now, governing[scope])
            c2 = clock()
            encode_state(state)
            states[agent] = state
            c3 = clock()
            spent["count"] += c1 - c0
            spent["decide"] += c2 - c1
            spent["encode"] += c3 - c2
        t3 = clock()
        for scope, costs in forwards.items():
            costs.sort(key=lambda c: (c.partition, c.offset))
            encode_scope_costs(scope, costs)
        spent["parse"] += t1 - t0
        spent["stats"] += t2 - t1
        spent["forward"] += clock() - t3
    result: dict[str, Any] = {"events": count, "batch": batch, "agents": len(states)}
    result.update({f"{k}_us_per_event": round(1e6 * v / count, 1) for k, v in spent.items()})
    result["total_us_per_event"] = round(1e6 * sum(spent.values()) / count, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.events, args.batch), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
