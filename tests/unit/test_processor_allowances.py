"""The grant logic (stream_processors/allowances.py): sizing, replays, returns, expiry,
revocation, and the invariant that bounds overshoot for any number of processes."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from agentledger.schemas import (
    AllowanceKind,
    AllowanceRequest,
    BudgetClaim,
    BudgetPolicy,
    Period,
    usd_to_nano,
)
from agentledger.stream_processors.allowances import (
    current_budgets,
    grant_allowance,
    outstanding,
    revoke_over_allocated,
)
from agentledger.stream_processors.fold import SpendFold
from agentledger.stream_processors.state import SpendState

NOW = 1_767_830_400_000 + 3_600_000  # 2026-01-08 01:00 UTC
DAY_KEY = "day:1767830400000"
TTL = 30_000
LIMIT = usd_to_nano(Decimal("1"))
DAILY = BudgetPolicy(scope="agent:x", period=Period.DAY, limit_usd=Decimal("1"))


def ask(
    holder: str,
    seq: int,
    *,
    want: int,
    need: int = 0,
    used: int | None = None,
    kind: AllowanceKind = AllowanceKind.ACQUIRE,
) -> AllowanceRequest:
    claims = () if used is None else (BudgetClaim(budget=DAY_KEY, used_nano_usd=used),)
    return AllowanceRequest(
        holder=holder,
        seq=seq,
        scope="agent:x",
        kind=kind,
        want_nano_usd=want,
        need_nano_usd=need,
        claims=claims,
        reply_partition=0,
        sent_at_ms=NOW,
    )


def grant(state: SpendState, request: AllowanceRequest, now: int = NOW, policy=DAILY):  # type: ignore[no-untyped-def]
    return grant_allowance(state, request, [policy], now, ttl_ms=TTL)


def spend(state: SpendState, holder: str | None, cost: int, offset: int) -> SpendState:
    fold = SpendFold(state, now_ms=NOW)
    fold.add_cost(
        event_id=f"{offset:032x}",
        event_time_ms=NOW,
        cost_nano_usd=cost,
        partition=0,
        offset=offset,
        holder=holder,
    )
    return fold.result()


def granted(answer) -> int:  # type: ignore[no-untyped-def]
    (budget,) = answer.budgets
    return int(budget.granted_nano_usd)


def test_a_lone_holder_gets_what_it_wants_while_the_budget_is_plentiful() -> None:
    state, answer = grant(SpendState(), ask("h1", 1, want=1000))
    assert granted(answer) == 1000
    assert answer.refused is None
    (budget,) = answer.budgets
    assert (budget.budget, budget.limit_nano_usd, budget.until_ms) == (
        DAY_KEY,
        LIMIT,
        1767830400000 + 86_400_000,
    )
    assert state.leases[DAY_KEY][2]["h1"] == (1000, 0, NOW + TTL)
    assert state.holders["h1"] == (1, NOW, 0)


def test_a_grant_never_takes_more_than_a_share_of_what_is_left() -> None:
    # Half when alone (room for one newcomer), a third with one other live holder.
    state, first = grant(SpendState(), ask("h1", 1, want=LIMIT))
    assert granted(first) == LIMIT // 2
    state, second = grant(state, ask("h2", 1, want=LIMIT))
    assert granted(second) == (LIMIT - LIMIT // 2) // 3


def test_the_waiting_reservation_is_granted_whole_if_it_fits() -> None:
    state, _ = grant(SpendState(), ask("h1", 1, want=LIMIT))  # holds half
    left = LIMIT - LIMIT // 2
    state, answer = grant(state, ask("h2", 1, want=left, need=left - 10))
    assert granted(answer) == left - 10
    assert answer.refused is None


def test_a_need_that_does_not_fit_is_refused_with_the_numbers() -> None:
    state, _ = grant(SpendState(), ask("h1", 1, want=LIMIT // 2))
    state, answer = grant(state, ask("h2", 1, want=LIMIT, need=LIMIT))
    assert answer.refused is not None
    assert "day budget of $1.00" in answer.refused
    assert "$0.50 allowed to other processes" in answer.refused


def test_a_replayed_request_changes_nothing_and_is_answered_the_same() -> None:
    state, answer = grant(SpendState(), ask("h1", 1, want=1000))
    again_state, again = grant(state, ask("h1", 1, want=5000))
    assert again_state is state
    assert again.budgets == answer.budgets


def test_counted_events_move_allowance_into_spend_and_the_sum_stays() -> None:
    state, _ = grant(SpendState(), ask("h1", 1, want=1000))
    state = spend(state, "h1", 300, offset=1)
    (budget,) = current_budgets(state, [DAILY], NOW)
    assert budget.spend == 300
    assert outstanding(state.leases[DAY_KEY][2], NOW) == 700
    # An event without a holder (an unshimmed app) counts as spend only.
    state = spend(state, None, 50, offset=2)
    assert outstanding(state.leases[DAY_KEY][2], NOW) == 700


def test_release_keeps_only_what_was_used_and_renewal_extends_the_expiry() -> None:
    state, _ = grant(SpendState(), ask("h1", 1, want=1000))
    state, answer = grant(state, ask("h1", 2, want=0, used=400, kind=AllowanceKind.RELEASE))
    assert granted(answer) == 400
    state, _ = grant(state, ask("h1", 3, want=0, used=400), now=NOW + 20_000)
    assert state.leases[DAY_KEY][2]["h1"][2] == NOW + 20_000 + TTL


def test_an_expired_allowance_is_reclaimed() -> None:
    state, _ = grant(SpendState(), ask("h1", 1, want=LIMIT))
    later = NOW + TTL + 1
    state, answer = grant(state, ask("h2", 1, want=LIMIT, need=LIMIT // 2 + 1), now=later)
    assert answer.refused is None  # h1's half came back
    assert state.leases[DAY_KEY][2]["h1"][0] == 0  # it holds nothing beyond what it confirmed


def test_a_holder_back_after_its_allowance_lapsed_gets_the_rest_of_the_budget() -> None:
    # The processor was down longer than the TTL (or the holder paused): the holder's lease
    # lapsed, and it comes back claiming all it used. Its counted spend must not count again
    # as outstanding, or that much of the budget is stranded until the period ends.
    call = 1_000
    state, _ = grant(SpendState(), ask("h1", 1, want=500 * call))
    for offset in range(300):
        state = spend(state, "h1", call, offset=offset)
    later = NOW + TTL + 1
    state, answer = grant(state, ask("h1", 2, want=LIMIT, need=call, used=300 * call), now=later)
    assert answer.refused is None
    (budget,) = answer.budgets
    assert budget.spend_nano_usd == 300 * call
    # A lone holder's share (half of what is left) of all that is left, on top of what it used.
    left = LIMIT - 300 * call
    assert budget.granted_nano_usd - 300 * call == left // 2
    assert budget.spend_nano_usd + budget.outstanding_nano_usd <= LIMIT


def test_a_lowered_policy_takes_allowances_back() -> None:
    state, _ = grant(SpendState(), ask("h1", 1, want=LIMIT // 2))
    state = spend(state, "h1", 100, offset=1)
    lower = BudgetPolicy(scope="agent:x", period=Period.DAY, limit_usd=Decimal("0.0000002"))
    revoked, answers = revoke_over_allocated(state, [lower], "agent:x", NOW, ttl_ms=TTL)
    assert [(p, a.holder, granted(a)) for p, a in answers] == [(0, "h1", 100)]
    assert revoked.leases[DAY_KEY][2]["h1"][0] == 100
    # Nothing to take back when the allowances still fit.
    same, none = revoke_over_allocated(state, [DAILY], "agent:x", NOW, ttl_ms=TTL)
    assert same is state and none == []


def test_a_holder_that_used_more_than_it_holds_after_a_revocation_still_gets_what_is_left() -> None:
    # A revocation cuts the allowance to what the processor has confirmed; the holder's calls
    # in flight (used, not yet counted) are real spend beyond it. Its next request must get
    # its need on top of that used amount while the budget has room, not be refused.
    call = 1_000
    state, _ = grant(SpendState(), ask("h1", 1, want=100 * call))
    for offset in range(10):
        state = spend(state, "h1", call, offset=offset)
    lower = BudgetPolicy(scope="agent:x", period=Period.DAY, limit_usd=Decimal("0.00005"))
    state, _ = revoke_over_allocated(state, [lower], "agent:x", NOW, ttl_ms=TTL)
    assert state.leases[DAY_KEY][2]["h1"][0] == 10 * call
    used = 30 * call  # 20 calls ended whose events the processor has not counted yet
    state, answer = grant(state, ask("h1", 2, want=256 * call, need=call, used=used), policy=lower)
    assert answer.refused is None
    (budget,) = answer.budgets
    assert used + call <= budget.granted_nano_usd
    # The invariant still holds once the calls in flight are counted.
    assert budget.spend_nano_usd + (budget.granted_nano_usd - 10 * call) <= 50 * call


def test_a_scope_without_a_budget_gets_an_empty_answer() -> None:
    detectors_only = BudgetPolicy(scope="agent:x", retry_loop={"max_failures": 3, "window_s": 60})
    state, answer = grant(SpendState(), ask("h1", 1, want=1000), policy=detectors_only)
    assert answer.budgets == ()
    assert not state.leases


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["h1", "h2", "h3", "h4"]),
            st.integers(min_value=0, max_value=LIMIT),
            st.integers(min_value=0, max_value=LIMIT // 4),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_holders_spending_only_what_they_were_granted_never_pass_the_limit(
    steps: list[tuple[str, int, int]],
) -> None:
    """Each holder asks, then spends part of what it holds (as the shim admits calls); the
    processor counts some of those events later. Real spend never passes the limit, and
    confirmed spend plus outstanding allowances never pass it either."""
    state = SpendState()
    seqs: dict[str, int] = {}
    held: dict[str, int] = {}  # what each holder believes it was granted
    used: dict[str, int] = {}
    pending: list[tuple[str, int]] = []  # spent, not counted yet
    offset = 0
    for holder, want, cost in steps:
        seqs[holder] = seqs.get(holder, 0) + 1
        state, answer = grant(state, ask(holder, seqs[holder], want=want, used=used.get(holder)))
        held[holder] = granted(answer)
        room = held[holder] - used.get(holder, 0)
        if 0 < cost <= room:
            used[holder] = used.get(holder, 0) + cost
            pending.append((holder, cost))
        if len(pending) > 3:  # the processor lags a few events behind
            who, amount = pending.pop(0)
            offset += 1
            state = spend(state, who, amount, offset)
        (budget,) = current_budgets(state, [DAILY], NOW)
        assert budget.spend + outstanding(state.leases[DAY_KEY][2], NOW) <= LIMIT
        assert sum(used.values()) <= LIMIT
