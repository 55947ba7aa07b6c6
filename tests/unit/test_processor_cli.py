"""`agentledger budgets diff`: what an apply would change versus the published policies."""

from __future__ import annotations

from decimal import Decimal

from agentledger.budgets import diff_policies
from agentledger.schemas import BudgetPolicy, parse_policy_file


def test_diff_names_added_changed_same_and_kept_policies() -> None:
    published = [
        BudgetPolicy.model_validate(
            {"schema_version": 1, "scope": "agent:a", "period": "day", "limit_usd": "5"}
        ),
        BudgetPolicy(scope="agent:b", limit_usd=Decimal(1)),
        BudgetPolicy(scope="pool:p", limit_usd=Decimal(9)),
    ]
    wanted = parse_policy_file(
        "budgets:\n"
        "  - {scope: 'agent:a', limit_usd: 5.0}\n"  # same meaning, v2 record
        "  - scope: agent:b\n"
        "    limit_usd: 1\n"
        "    thresholds: [{at_percent: 80, action: refuse_new_work}]\n"
        "  - {scope: 'workflow:w', period: month, limit_usd: 3}\n"
    )
    changes = diff_policies(published, wanted)
    assert [(c.key, c.change) for c in changes] == [
        ("agent:a|day", "same"),
        ("agent:b|day", "change"),
        ("pool:p|day", "keep"),
        ("workflow:w|month", "add"),
    ]
    assert changes[1].describe() == (
        "change  agent:b|day: $1 [100%: stop] -> $1 [80%: refuse_new_work]"
    )
    assert changes[3].describe() == "add     workflow:w|month: - -> $3 [100%: stop]"
