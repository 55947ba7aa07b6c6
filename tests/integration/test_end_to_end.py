"""The walking skeleton end to end: shim -> Kafka -> processor -> control -> shim, and
shim -> Kafka -> sink -> ClickHouse, on the real broker with the real services as processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price

from agentledger.budgets import apply_policies
from agentledger.deploy.stack import Stack
from agentledger.producers import BudgetExceeded, Ledger
from agentledger.review.query import QueryClient
from agentledger.schemas import BudgetPolicy, PolicyFile, format_usd, usd_to_nano

pytestmark = pytest.mark.integration

# Real call sizes from the Azure conversation trace (first rows of azure_llm_trace_2023_conv.csv).
SIZES = [(374, 44), (396, 109), (879, 55), (91, 16), (91, 16), (2738, 232), (733, 178)]


def genai_price_nano(model: str, input_tokens: int, output_tokens: int) -> int:
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return usd_to_nano(calc_price(usage, model_ref=model, provider_id="openai").total_price)


def sink_totals(client: QueryClient, workflow: str) -> tuple[int, int]:
    result = client.query(
        "SELECT count(), sum(toInt128(cost_nano_usd)) FROM calls WHERE workflow_id = {wf:String}",
        {"wf": workflow},
    )
    count, cost = result.rows[0]
    return int(count), int(cost)


def test_budget_crossing_stops_agent_and_history_is_exact(stack: Stack) -> None:
    settings = stack.settings
    limit = Decimal("0.01")
    apply_policies(
        settings, PolicyFile(budgets=[BudgetPolicy(scope="agent:e2e-runaway", limit_usd=limit)])
    )

    ledger = Ledger(settings)
    try:
        assert ledger.wait_for_control(15)
        runaway = ledger.agent("e2e-runaway", workflow="wf-e2e", pool="research")
        steady = ledger.agent("e2e-steady", workflow="wf-e2e", pool="research")
        expected_total = 0
        spent_runaway = 0
        emitted = 0
        crossed_at: float | None = None
        # Call until the runaway's own spend crosses its limit, then stop calling and measure
        # how long the STOP takes to come back through processor and control topic.
        n = 0
        while crossed_at is None:
            tokens_in, tokens_out = SIZES[n % len(SIZES)]
            n += 1
            # Recorded after the fact (as a callback such as LiteLLM's does), so no allowance
            # bounds it: the spend crosses the limit and the processor's STOP is what stops
            # the agent. Calls through agent.call() never cross it (test_allowances.py).
            now = time.time_ns() // 1_000_000
            runaway.record_finished(
                provider="openai",
                model="gpt-4o",
                started_ms=now,
                ended_ms=now,
                input_tokens=tokens_in,
                output_tokens=tokens_out,
            )
            with steady.call(provider="openai", model="gpt-4o-mini") as call:
                call.record(input_tokens=tokens_in, output_tokens=tokens_out)
            cost_runaway = genai_price_nano("gpt-4o", tokens_in, tokens_out)
            expected_total += cost_runaway + genai_price_nano("gpt-4o-mini", tokens_in, tokens_out)
            spent_runaway += cost_runaway
            emitted += 2
            if spent_runaway >= usd_to_nano(limit):
                assert ledger.transport.flush(10) == 0
                crossed_at = time.monotonic()
        assert n < 200, "the workload should cross a $0.01 budget quickly"

        refused_after = None
        while time.monotonic() - crossed_at < 10:
            try:
                runaway.check_budget()
            except BudgetExceeded:
                refused_after = time.monotonic() - crossed_at
                break
            time.sleep(0.02)
        assert refused_after is not None, "no STOP reached the agent within 10 s"
        print(
            f"STOP reached the agent {refused_after * 1000:.0f} ms "
            "after the crossing event was flushed"
        )
        assert refused_after <= 2.0

        with (
            pytest.raises(BudgetExceeded) as stop,
            runaway.call(provider="openai", model="gpt-4o"),
        ):
            pytest.fail("the call body must not run while a STOP stands")
        assert stop.value.scope == "agent:e2e-runaway"
        assert stop.value.limit_usd == limit
        assert stop.value.spend_usd == Decimal(spent_runaway) / 10**9
        assert stop.value.resets_at_ms is not None and stop.value.resets_at_ms % 86_400_000 == 0
        # Other agents are not affected by the runaway's STOP.
        steady.check_budget()
    finally:
        ledger.close()

    client = QueryClient.from_settings(settings)
    deadline = time.monotonic() + 30
    while sink_totals(client, "wf-e2e")[0] < emitted and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sink_totals(client, "wf-e2e") == (emitted, expected_total)
    rows = client.query(
        "SELECT used_model, count(), sum(toInt128(cost_nano_usd)) FROM calls "
        "WHERE workflow_id = {wf:String} GROUP BY used_model ORDER BY used_model",
        {"wf": "wf-e2e"},
    ).rows
    assert [(str(m), int(c)) for m, c, _ in rows] == [("gpt-4o", n), ("gpt-4o-mini", n)]
    assert int(rows[0][2]) == spent_runaway

    # The CLI reads the same history through the sink (the process that owns chDB).
    env = {**os.environ, **stack.child_env()}
    sql = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentledger",
            "sql",
            "--format",
            "json",
            "SELECT agent_id, count() AS n FROM calls GROUP BY agent_id ORDER BY agent_id",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert sql.returncode == 0, sql.stderr
    assert json.loads(sql.stdout)["rows"] == [["e2e-runaway", n], ["e2e-steady", n]]
    refused = subprocess.run(
        [sys.executable, "-m", "agentledger", "sql", "DROP TABLE calls"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2 and "agentledger: error:" in refused.stderr
    assert sink_totals(client, "wf-e2e") == (emitted, expected_total)
    review = subprocess.run(
        [sys.executable, "-m", "agentledger", "review", "--since", "1h"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert review.returncode == 0, review.stderr
    lines = review.stdout.splitlines()
    runaway_row = next(line for line in lines if line.startswith("e2e-runaway"))
    assert runaway_row.split()[:3] == ["e2e-runaway", "gpt-4o", str(n)]
    assert f"total: {format_usd(expected_total)} over {emitted} calls" in review.stdout
