"""Which policies govern a scope: at most one per period, by precedence (exact scope, then
the most specific glob, then the alphabetically first pattern)."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from agentledger.schemas import BudgetPolicy

__all__ = ["matching_policies", "policy_specificity"]


def policy_specificity(pattern: str) -> int:
    """How specific a scope pattern is: the number of its literal (non-wildcard) characters.

    ``agent:*`` (every agent) is the least specific agent pattern, so it is the default.
    """
    return sum(1 for ch in pattern if ch not in "*?")


def _is_glob(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


def matching_policies(policies: Iterable[BudgetPolicy], scope: str) -> list[BudgetPolicy]:
    """The policies that govern ``scope``: at most one per period, ordered by period.

    Per period, a policy naming the scope exactly wins; otherwise the matching glob with the
    most literal characters (``agent:researcher-*`` before ``agent:*``); a tie goes to the
    alphabetically first pattern, so every worker picks the same one.
    """
    best: dict[str, BudgetPolicy] = {}
    for policy in policies:
        pattern = policy.scope
        if pattern != scope and not (_is_glob(pattern) and fnmatchcase(scope, pattern)):
            continue
        current = best.get(policy.period_name)
        if current is None or _rank(policy, scope) < _rank(current, scope):
            best[policy.period_name] = policy
    return sorted(best.values(), key=lambda p: p.period_name)


def _rank(policy: BudgetPolicy, scope: str) -> tuple[int, int, str]:
    exact = 0 if policy.scope == scope else 1
    return (exact, -policy_specificity(policy.scope), policy.scope)
