"""`agentledger demo`: a simulated multi-agent workload against the real local stack.

Well-behaved agents make calls with real token sizes from the Azure traces; one agent is stuck in
a retry loop on an expensive model. The processor stops it when its daily budget is spent, the
shim refuses its next call, and the review shows who spent what.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal

from agentledger.config import Settings
from agentledger.review_report import review_table
from agentledger.schemas import BudgetPolicy, CallStatus, PolicyFile, nano_to_usd, usd_to_nano
from agentledger.traces import TraceCall, load_trace

__all__ = ["run_demo"]

RUNAWAY_MAX_ATTEMPTS = 5_000
RUNAWAY_MAX_SECONDS = 120.0


def _say(message: str) -> None:
    print(message, flush=True)


@dataclass
class _Outcome:
    agent_id: str
    calls: int = 0
    stopped_by: str | None = None
    stop_seen_at: float | None = None
    spent_nano_usd: int = 0
    errors: list[str] = field(default_factory=list)


def run_demo(
    settings: Settings, *, agents: int = 4, budget_usd: str = "0.25", stop_after: bool = False
) -> int:
    from agentledger.budgets import apply_policies
    from agentledger.deploy.stack import Stack
    from agentledger.producers import BudgetExceeded, Ledger
    from agentledger.producers.errors import format_usd

    _say("== 1/5 starting the local stack (Kafka broker, processor, sink with embedded ClickHouse)")
    stack = Stack(settings, progress=_say)
    stack.up()

    run = secrets.token_hex(2)
    workflow = f"demo-{run}"
    runaway_id = f"runaway-{run}"
    worker_ids = [f"{'researcher' if i % 2 == 0 else 'coder'}-{i + 1}-{run}" for i in range(agents)]
    limit = Decimal(budget_usd)
    _say(f"== 2/5 publishing budgets for run {run}: {runaway_id} ${limit}/day, the others $5/day")
    policies = [BudgetPolicy(scope=f"agent:{runaway_id}", limit_usd=limit)]
    policies += [BudgetPolicy(scope=f"agent:{a}", limit_usd=Decimal(5)) for a in worker_ids]
    apply_policies(settings, PolicyFile(budgets=policies))

    conv = load_trace("conv", limit=2_000)
    code = load_trace("code", limit=2_000)
    _say(f"   loaded {len(conv) + len(code)} real call sizes from the Azure LLM traces")

    ledger = Ledger(settings)
    review_since_ms = int(time.time() * 1000) - 1000
    ledger.wait_for_control(15.0)
    lock = threading.Lock()

    def worker(agent_id: str, sizes: list[TraceCall], model: str, pool: str) -> _Outcome:
        outcome = _Outcome(agent_id)
        agent = ledger.agent(agent_id, workflow=workflow, pool=pool)
        rng = random.Random(agent_id)  # noqa: S311 - simulation, not security
        for n in range(25):
            size = sizes[rng.randrange(len(sizes))]
            try:
                with agent.call(provider="openai", model=model, task_type="summarize") as call:
                    time.sleep(0.02 + size.output_tokens / 20_000)
                    call.record(input_tokens=size.input_tokens, output_tokens=size.output_tokens)
                outcome.calls += 1
            except BudgetExceeded as exc:
                outcome.stopped_by = str(exc)
                break
            if n % 10 == 9:
                with lock:
                    _say(f"   {agent_id}: {n + 1} calls done")
        return outcome

    def runaway() -> _Outcome:
        outcome = _Outcome(runaway_id)
        agent = ledger.agent(runaway_id, workflow=workflow, pool="research")
        rng = random.Random(run)  # noqa: S311 - simulation, not security
        deadline = time.monotonic() + RUNAWAY_MAX_SECONDS
        for attempt in range(1, RUNAWAY_MAX_ATTEMPTS + 1):
            if time.monotonic() > deadline:
                break
            size = code[rng.randrange(len(code))]
            try:
                # max_tokens and the prompt's size make the reservation fit the call, so the
                # allowance admits every call that fits the budget and none that does not.
                with agent.call(
                    provider="openai",
                    model="gpt-4o",
                    task_type="fix-tests",
                    attempt=attempt,
                    max_tokens=max(size.output_tokens, 1),
                    estimated_input_tokens=size.input_tokens,
                ) as call:
                    time.sleep(0.03)
                    # The tool call keeps failing, so the agent retries with the full context.
                    call.record(
                        input_tokens=size.input_tokens,
                        output_tokens=size.output_tokens,
                        status=CallStatus.ERROR,
                        error_type="ToolCallFailed",
                    )
                outcome.calls += 1
                outcome.spent_nano_usd += call.cost_nano_usd
            except BudgetExceeded as exc:
                outcome.stopped_by = str(exc)
                outcome.stop_seen_at = time.time()
                break
            if attempt % 20 == 0:
                with lock:
                    _say(f"   {runaway_id}: retry attempt {attempt} (gpt-4o, failing tool call)")
        return outcome

    _say(f"== 3/5 running {agents} agents and 1 runaway retry loop (workflow {workflow})")
    results: dict[str, _Outcome] = {}
    pools = ["research", "coding"]
    threads = [
        threading.Thread(
            target=lambda a=a, i=i: results.__setitem__(
                a, worker(a, conv if i % 2 == 0 else code, "gpt-4o-mini", pools[i % 2])
            )
        )
        for i, a in enumerate(worker_ids)
    ]
    threads.append(threading.Thread(target=lambda: results.__setitem__(runaway_id, runaway())))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ledger.close()
    emitted = sum(o.calls for o in results.values())

    stopped = results[runaway_id]
    if stopped.stopped_by is None:
        _say(
            f"!! {runaway_id} was never stopped after {stopped.calls} attempts: check "
            f"`agentledger status` and {settings.home}/logs/processor.log"
        )
        return 1
    _say(f"== STOPPED {runaway_id} after {stopped.calls} attempts:\n   {stopped.stopped_by}")
    limit_nano = usd_to_nano(limit)
    spent = stopped.spent_nano_usd
    over = (spent - limit_nano) * 100 / limit_nano
    _say(
        f"   spent when stopped: {format_usd(nano_to_usd(spent))} of {format_usd(limit)} "
        f"({spent * 100 / limit_nano:.2f}% of the budget; overshoot {max(over, 0):.2f}%)"
    )

    _say(f"== 4/5 waiting for the sink to write all {emitted} calls to ClickHouse")
    from agentledger.review.query import QueryClient

    client = QueryClient.from_settings(settings)
    deadline = time.monotonic() + 60
    landed = 0
    while time.monotonic() < deadline:
        result = client.query(
            "SELECT count() FROM calls WHERE workflow_id = {wf:String}", {"wf": workflow}
        )
        landed = int(result.rows[0][0])
        if landed >= emitted:
            break
        time.sleep(0.5)
    _say(f"   {landed} of {emitted} calls in ClickHouse")

    _say(f"== 5/5 review of workflow {workflow}")
    _say(review_table(settings, review_since_ms, int(time.time() * 1000) + 1, workflow_id=workflow))
    _say(
        f"   {runaway_id} retried a failing call on gpt-4o "
        f"until its ${limit} daily budget stopped it."
    )
    from agentledger.routing_demo import run_routing_demo

    run_routing_demo(settings, run, _say)
    if stop_after:
        stack.down()
        _say("stack stopped")
    else:
        _say(
            "the stack is still running: try `.venv/bin/agentledger review` or "
            '`.venv/bin/agentledger sql "SELECT ..."`; stop it with `.venv/bin/agentledger down`'
        )
    return 0 if landed >= emitted else 1
