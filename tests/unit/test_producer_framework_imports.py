"""The shim's core import stays free of the agent frameworks (they are extras)."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("langchain_core", "langgraph", "agents", "pydantic_ai", "openai", "litellm")


def test_importing_the_shim_imports_no_framework() -> None:
    probe = (
        "import sys, agentledger.producers, agentledger.producers.framework; "
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
