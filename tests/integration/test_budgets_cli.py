"""`agentledger budgets apply | list` against the real broker."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from agentledger.budgets import apply_policies, list_policies, load_policy_file
from agentledger.config import Settings
from agentledger.schemas import PolicyFileError

pytestmark = pytest.mark.integration


def test_apply_then_list_keeps_latest_per_scope(stack_settings: Settings, tmp_path: Path) -> None:
    first = tmp_path / "b1.yaml"
    first.write_text(
        "budgets:\n"
        "  - scope: agent:researcher-1\n    period: day\n    limit_usd: 5\n"
        "  - scope: agent:coder-1\n    period: week\n    limit_usd: 20.50\n"
    )
    assert apply_policies(stack_settings, load_policy_file(first)) == 2
    second = tmp_path / "b2.yaml"
    second.write_text("budgets:\n  - scope: agent:researcher-1\n    limit_usd: 7.25\n")
    apply_policies(stack_settings, load_policy_file(second))

    listed = {p.key: p.limit_usd for p in list_policies(stack_settings)}
    assert listed == {
        "agent:researcher-1|day": Decimal("7.25"),
        "agent:coder-1|week": Decimal("20.50"),
    }


def test_bad_policy_file_is_refused_before_publishing(
    stack_settings: Settings, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("budgets:\n  - scope: agent:a\n    limit_usd: five\n")
    with pytest.raises(PolicyFileError, match=r"bad.yaml:3: budgets.0.limit_usd"):
        load_policy_file(bad)
    assert list_policies(stack_settings) == []
