"""Allowances: the processor grants each shim process slices of what remains of a budget.

Pure: no faust, no Kafka, an injected ``now_ms``. The state of a scope keeps, per budget
instance (one policy's current period) and per holder (a shim process), three cumulative
numbers: ``granted`` (G), ``confirmed`` (C, the cost of the holder's events counted so far)
and when the allowance expires. What a holder may still spend without asking is
``max(G - C, 0)`` as far as the processor knows; it is at least what the holder can really
still spend, because its events arrive after the spending. So the invariant

    spend + sum over holders of max(G - C, 0) <= limit

kept at every grant bounds the scope's real spend by the limit, for any number of
processes, plus only what calls cost beyond their reservations. Counting an event of holder
``h`` moves its cost from ``G - C`` into spend: the sum stays the same.

Replays are harmless: a request whose ``seq`` the state has applied already is answered from
the state again, unchanged; a holder applies only the answer to its latest request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from agentledger.schemas import (
    AllowanceGrant,
    AllowanceKind,
    AllowanceRequest,
    BudgetGrant,
    BudgetPolicy,
    Period,
    format_usd,
)

from .crossings import policy_window
from .state import SpendState

__all__ = [
    "HOLDERS_KEPT_MS",
    "Budget",
    "LeaseCosts",
    "apply_lease_costs",
    "current_budgets",
    "grant_allowance",
    "outstanding",
    "over_allocated",
    "revoke_over_allocated",
]

# A holder's last seq is kept this long after its last request, so a replayed request is
# recognised; longer than any redelivery after a crash or a rebalance.
HOLDERS_KEPT_MS = 15 * 60_000

Leases = Mapping[str, tuple[int, int | None, Mapping[str, tuple[int, int, int]]]]
#: Costs of one holder's events, counted in one batch: holder -> [(event time ms, nano-USD)].
LeaseCosts = Mapping[str, Sequence[tuple[int, int]]]


@dataclass(frozen=True)
class Budget:
    """One budget instance governing a scope now."""

    key: str
    period: str
    limit: int
    spend: int
    start_ms: int
    """events of a holder from here on count against its allowance"""
    end_ms: int | None
    until_ms: int | None
    """when the period resets (None for rolling windows and runs, which slide or idle out)"""


def current_budgets(
    state: SpendState, governing: Iterable[BudgetPolicy], now_ms: int
) -> list[Budget]:
    """The budgeted policies of ``governing`` with their current period and spend."""
    found = []
    for policy in governing:
        if not policy.budgeted:
            continue
        current = policy_window(state, policy, now_ms)
        limit = policy.limit_nano_usd
        if policy.period is Period.ROLLING:
            spend = current[1] if current is not None else 0
            found.append(
                Budget(f"rolling:{policy.window_ms}", "rolling", limit, spend, now_ms, None, None)
            )
        elif policy.period is Period.RUN:
            spend = current[1] if current is not None else 0
            found.append(Budget(f"run:{policy.window_ms}", "run", limit, spend, now_ms, None, None))
        elif current is not None:
            window, spend = current
            found.append(
                Budget(
                    window.key,
                    policy.period_name,
                    limit,
                    spend,
                    window.start_ms,
                    window.end_ms,
                    window.end_ms,
                )
            )
    return found


def _live(held: Mapping[str, tuple[int, int, int]], now_ms: int) -> dict[str, tuple[int, int, int]]:
    return {h: v for h, v in held.items() if v[2] > now_ms}


def _kept(
    held: Mapping[str, tuple[int, int, int]],
    now_ms: int,
    holders: Mapping[str, tuple[int, int, int]],
) -> dict[str, tuple[int, int, int]]:
    """The live allowances, and the lapsed ones of holders still known, cut to what they
    confirmed. A lapsed allowance holds nothing, but its confirmed spend must stay: a holder
    that comes back (after the processor was down longer than the TTL, or a long pause)
    claims all it used, and without its confirmed part that spend, already counted, would
    count again as outstanding and strand the rest of the budget."""
    horizon = now_ms - HOLDERS_KEPT_MS
    kept = {}
    for h, (g, c, e) in held.items():
        if e > now_ms:
            kept[h] = (g, c, e)
        else:
            seen = holders.get(h)
            if seen is not None and seen[1] > horizon:
                kept[h] = (min(g, c), c, e)
    return kept


def outstanding(held: Mapping[str, tuple[int, int, int]], now_ms: int, *, but: str = "") -> int:
    """What the live holders (except ``but``) may still spend, as far as the processor knows."""
    return sum(max(g - c, 0) for h, (g, c, e) in held.items() if e > now_ms and h != but)


def grant_allowance(
    state: SpendState,
    request: AllowanceRequest,
    governing: Sequence[BudgetPolicy],
    now_ms: int,
    *,
    ttl_ms: int,
) -> tuple[SpendState, AllowanceGrant]:
    """Apply ``request`` to the scope's ``state``; return the state and the (unsigned) answer.

    Sizing: the holder asks for ``want`` available beyond what it has used; it gets at most
    what remains, and at most a share of it (what remains over the other live holders plus
    two, so one holder never takes the last of a budget others may need), but never less
    than its waiting reservation ``need`` when that still fits.
    """
    holder = request.holder
    budgets = current_budgets(state, governing, now_ms)
    seen = state.holders.get(holder)
    replay = seen is not None and request.seq <= seen[0]
    leases: dict[str, tuple[int, int | None, Mapping[str, tuple[int, int, int]]]] = dict(
        state.leases
    )
    refused: list[str] = []
    if not replay:
        claims = {c.budget: c.used_nano_usd for c in request.claims}
        for budget in budgets:
            start, end, held_now = leases.get(budget.key, (budget.start_ms, budget.end_ms, {}))
            held = _kept(held_now, now_ms, state.holders)
            granted, confirmed, _ = held.get(holder, (0, 0, 0))
            used = max(claims.get(budget.key, 0), confirmed)
            if request.kind is AllowanceKind.RELEASE:
                # The holder stopped using anything beyond ``used`` before it asked; with a
                # ``want`` it asks afresh from there (after a policy change).
                granted = used
            if request.kind is AllowanceKind.ACQUIRE or request.want_nano_usd:
                # Used beyond granted happens after a revocation cut the allowance to what
                # was confirmed: those calls ended, their events are on their way, so they
                # are spend already and the holder's share is sized on top of them.
                granted = max(granted, used)
                others = outstanding(held, now_ms, but=holder)
                mine = max(granted - confirmed, 0)
                left = max(budget.limit - budget.spend - others - mine, 0)
                target = used + request.want_nano_usd
                if target > granted:
                    rivals = sum(1 for h, v in held.items() if h != holder and v[2] > now_ms)
                    share = left // (rivals + 2)
                    urgent = max(request.need_nano_usd - max(granted - used, 0), 0)
                    give = min(target - granted, left, max(share, urgent))
                    granted += give
                if granted - used < request.need_nano_usd:
                    refused.append(
                        f"{budget.period} budget of {_usd(budget.limit)}: spent "
                        f"{_usd(budget.spend)}, {_usd(others)} allowed to other processes, "
                        f"{_usd(max(granted - used, 0))} left to this one; "
                        f"{_usd(request.need_nano_usd)} does not fit"
                    )
            held[holder] = (granted, confirmed, now_ms + ttl_ms)
            leases[budget.key] = (start, end, held)
        holders = {h: v for h, v in state.holders.items() if v[1] > now_ms - HOLDERS_KEPT_MS}
        holders[holder] = (request.seq, now_ms, request.reply_partition)
        current = {b.key for b in budgets}
        # A budget instance whose period ended, or whose policy is gone, holds nothing now.
        leases = {k: v for k, v in leases.items() if k in current}
        state = replace(state, leases=leases, holders=holders)
    answer = AllowanceGrant(
        holder=holder,
        seq=request.seq,
        scope=request.scope,
        budgets=tuple(_budget_grant(b, state.leases, holder, now_ms) for b in budgets),
        ttl_ms=ttl_ms,
        issued_at_ms=now_ms,
        refused="; ".join(refused) or None if not replay else None,
    )
    return state, answer


def _budget_grant(budget: Budget, leases: Leases, holder: str, now_ms: int) -> BudgetGrant:
    _, _, held = leases.get(budget.key, (0, None, {}))
    granted = held.get(holder, (0, 0, 0))[0]
    return BudgetGrant(
        budget=budget.key,
        period=budget.period,
        granted_nano_usd=granted,
        limit_nano_usd=budget.limit,
        spend_nano_usd=budget.spend,
        outstanding_nano_usd=outstanding(held, now_ms),
        until_ms=budget.until_ms,
    )


def apply_lease_costs(state: SpendState, costs: LeaseCosts) -> SpendState:
    """Count the holders' events (already counted as spend) against their allowances."""
    if not state.leases or not costs:
        return state
    leases = dict(state.leases)
    changed = False
    for key, (start, end, held) in state.leases.items():
        updated = None
        for holder, items in costs.items():
            numbers = held.get(holder)
            if numbers is None:
                continue
            add = sum(c for t, c in items if t >= start and (end is None or t < end))
            if add:
                if updated is None:
                    updated = dict(held)
                g, c, e = numbers
                updated[holder] = (g, c + add, e)
        if updated is not None:
            leases[key] = (start, end, updated)
            changed = True
    return replace(state, leases=leases) if changed else state


def over_allocated(state: SpendState, budgets: Sequence[Budget], now_ms: int) -> list[str]:
    """The budget keys whose allowances exceed what remains (a policy was lowered)."""
    found = []
    for budget in budgets:
        entry = state.leases.get(budget.key)
        if entry is not None and budget.spend + outstanding(entry[2], now_ms) > budget.limit:
            found.append(budget.key)
    return found


def revoke_over_allocated(
    state: SpendState,
    governing: Sequence[BudgetPolicy],
    scope: str,
    now_ms: int,
    *,
    ttl_ms: int,
) -> tuple[SpendState, list[tuple[int, AllowanceGrant]]]:
    """Take back every unconfirmed allowance of a budget whose allowances no longer fit (its
    policy was lowered): each holder is told it holds what it has confirmed, and asks again
    for a share of what remains. Returns the state and the answers with their partitions."""
    budgets = current_budgets(state, governing, now_ms)
    keys = over_allocated(state, budgets, now_ms)
    if not keys:
        return state, []
    leases = dict(state.leases)
    touched: set[str] = set()
    for key in keys:
        start, end, held = leases[key]
        revoked = dict(held)
        for holder, (g, c, e) in _live(held, now_ms).items():
            revoked[holder] = (min(g, c), c, e)
            touched.add(holder)
        leases[key] = (start, end, revoked)
    state = replace(state, leases=leases)
    answers = []
    for holder in sorted(touched):
        seen = state.holders.get(holder)
        if seen is None:
            continue
        seq, _, partition = seen
        answers.append(
            (
                partition,
                AllowanceGrant(
                    holder=holder,
                    seq=seq,
                    scope=scope,
                    budgets=tuple(_budget_grant(b, leases, holder, now_ms) for b in budgets),
                    ttl_ms=ttl_ms,
                    issued_at_ms=now_ms,
                    # Not a refusal: the holder asks again for a share of what remains.
                    refused=None,
                ),
            )
        )
    return state, answers


def _usd(nano: int) -> str:
    return format_usd(nano)
