"""The README's policy examples are real: each YAML block parses as a policy file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agentledger.schemas import parse_policy_file

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_policy_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_policy_example_parses(block: str) -> None:
    policies = parse_policy_file(block, source="README.md")
    assert policies.budgets
