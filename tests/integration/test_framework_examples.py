"""The three framework examples, run as their README says (``--offline``), against the real
stack: each loops until its $0.02 budget stops it from inside the framework's entry point."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agentledger.deploy.stack import Stack
from tests.integration.test_allowances import env_of

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# (script, agent, module it needs)
CASES = [
    ("langgraph_budget.py", "lg-example", "langgraph"),
    ("openai_agents_budget.py", "oa-example", "agents"),
    ("pydantic_ai_budget.py", "pa-example", "pydantic_ai"),
]


def test_each_example_is_stopped_by_its_budget(stack: Stack) -> None:
    for script, agent, module in CASES:
        pytest.importorskip(module)
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / script), "--offline"],
            env=env_of(stack.settings),
            text=True,
            capture_output=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        found = re.search(
            rf"stopped after (\d+) calls: budget exceeded for agent:{agent}", done.stdout
        )
        assert found is not None, done.stdout[-2000:] + done.stderr[-2000:]
        calls = int(found.group(1))
        print(f"{script}: stopped after {calls} calls")
        # Stopped by the budget, not by the step limit (400): at least the six calls that fit
        # in $0.02 ran first.
        assert 6 <= calls < 400
