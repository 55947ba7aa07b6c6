"""The processor's pure core: spend state per agent, applying events, deciding commands.

Nothing here touches faust or Kafka, so every rule is unit-tested with an injected clock.

Exactness rests on two facts kept in one state value (one changelog message, so one atomic
write): the highest source offset applied per partition, and the spend per period. A replayed
event, whose offset is at or below the applied one, changes nothing.

Outputs are idempotent too: :func:`decide` derives the wanted command from the state and the
policies, and compares it with the last command published (also kept in the state), so a crash
between the state write and the publish is repaired by the next decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any

from pydantic import ValidationError

from agentledger.schemas import (
    BudgetPolicy,
    CallEvent,
    ControlAction,
    ControlCommand,
    Period,
    nano_to_usd,
)

from .periods import DAY_MS, PeriodWindow, parse_period_key, period_window

__all__ = [
    "KEEP_PERIODS_MS",
    "RECENT_IDS",
    "Delivery",
    "SpendState",
    "apply_cost",
    "apply_event",
    "decide",
    "format_usd",
    "matching_policies",
    "policy_specificity",
    "spend_report",
]

# Buckets that ended this long before now are dropped from the live state: no budget period
# reaches back that far, and the full history lives in ClickHouse.
KEEP_PERIODS_MS = 35 * DAY_MS
# Event ids remembered per state value, to count an event delivered twice (the same bytes
# produced twice, at two offsets) once. Bounded because the whole value is rewritten to the
# changelog on every event; a duplicate arriving more than this many events of the same key
# later is counted again.
RECENT_IDS = 128


class Delivery(StrEnum):
    """What one record at one source offset is, relative to a state."""

    NEW = "new"  # count it
    REPLAY = "replay"  # this very record was counted already (offset at or below applied)
    DUPLICATE = "duplicate"  # another record with the same event id was counted


_PERIOD_WORDS = {Period.DAY: "daily", Period.WEEK: "weekly"}


@dataclass(frozen=True)
class SpendState:
    """Everything the processor knows about one agent, stored as one table value."""

    applied: Mapping[int, int] = field(default_factory=dict)
    periods: Mapping[str, int] = field(default_factory=dict)
    last_command: ControlCommand | None = None
    partition: int | None = None
    #: Recently counted event ids (hex) and the source offset each was counted at, oldest first.
    recent: Mapping[str, int] = field(default_factory=dict)

    def already_applied(self, partition: int, offset: int) -> bool:
        done = self.applied.get(partition)
        return done is not None and offset <= done

    def delivery(self, event_id: str | None, partition: int, offset: int) -> Delivery:
        seen_at = self.recent.get(event_id) if event_id is not None else None
        if seen_at is not None and seen_at != offset:
            return Delivery.DUPLICATE
        if self.already_applied(partition, offset):
            return Delivery.REPLAY
        return Delivery.NEW

    def spend(self, window: PeriodWindow) -> int:
        return self.periods.get(window.key, 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "applied": {str(p): o for p, o in sorted(self.applied.items())},
            "periods": dict(sorted(self.periods.items())),
            "last_command": (
                self.last_command.model_dump(mode="json") if self.last_command else None
            ),
            "partition": self.partition,
            # A list, not an object: the order says which ids to forget first.
            "recent": [[event_id, offset] for event_id, offset in self.recent.items()],
        }

    @classmethod
    def from_json(cls, data: Any) -> SpendState:
        """Rebuild a state from :meth:`to_json`; raise ValueError naming a malformed field."""
        if not isinstance(data, dict):
            raise ValueError(f"spend state must be a JSON object, got {type(data).__name__}")
        applied_raw = data.get("applied", {})
        periods_raw = data.get("periods", {})
        if not isinstance(applied_raw, dict):
            raise ValueError("spend state field 'applied' must map partition to offset")
        if not isinstance(periods_raw, dict):
            raise ValueError("spend state field 'periods' must map period key to nano-USD")
        try:
            applied = {int(p): _int(o, f"applied.{p}") for p, o in applied_raw.items()}
        except ValueError as exc:
            raise ValueError(f"spend state field 'applied': {exc}") from None
        periods: dict[str, int] = {}
        for key, nano in periods_raw.items():
            parse_period_key(key)
            periods[key] = _int(nano, f"periods.{key}")
        raw_command = data.get("last_command")
        try:
            command = ControlCommand.model_validate(raw_command) if raw_command else None
        except ValidationError as exc:
            raise ValueError(f"spend state field 'last_command': {exc}") from None
        partition = data.get("partition")
        if partition is not None:
            partition = _int(partition, "partition")
        recent_raw = data.get("recent", [])
        if not isinstance(recent_raw, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
            for pair in recent_raw
        ):
            raise ValueError("spend state field 'recent' must be a list of [event_id, offset]")
        recent = {pair[0]: _int(pair[1], f"recent.{pair[0]}") for pair in recent_raw}
        return cls(
            applied=applied,
            periods=periods,
            last_command=command,
            partition=partition,
            recent=recent,
        )


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def apply_cost(
    state: SpendState,
    *,
    event_id: str | None,
    event_time_ms: int,
    cost_nano_usd: int,
    partition: int,
    offset: int,
    now_ms: int,
    state_partition: int | None = None,
) -> SpendState:
    """Count one cost (read at source ``partition``/``offset``) in the periods of its time.

    Returns ``state`` itself for a replayed offset or an event id counted already, so both
    are no-ops. Every cost counts toward every period kind, so a policy published later, of
    any period, sees the spend made before it arrived. ``state_partition`` is where the
    state lives when that differs from the source partition (the scopes hop).
    """
    if state.delivery(event_id, partition, offset) is not Delivery.NEW:
        return state
    periods = dict(state.periods)
    for period in Period:
        key = period_window(period, event_time_ms).key
        periods[key] = periods.get(key, 0) + cost_nano_usd
    horizon = now_ms - KEEP_PERIODS_MS
    periods = {k: v for k, v in periods.items() if parse_period_key(k).end_ms > horizon}
    applied = {**state.applied, partition: offset}
    recent = dict(state.recent)
    if event_id is not None:
        recent[event_id] = offset
        while len(recent) > RECENT_IDS:
            del recent[next(iter(recent))]
    return replace(
        state,
        applied=applied,
        periods=periods,
        partition=partition if state_partition is None else state_partition,
        recent=recent,
    )


def apply_event(
    state: SpendState, event: CallEvent, partition: int, offset: int, *, now_ms: int
) -> SpendState:
    """Count ``event`` (read at ``partition``/``offset``); see :func:`apply_cost`."""
    return apply_cost(
        state,
        event_id=event.event_id.hex,
        event_time_ms=event.event_time_ms,
        cost_nano_usd=event.cost_nano_usd,
        partition=partition,
        offset=offset,
        now_ms=now_ms,
    )


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
    best: dict[Period, BudgetPolicy] = {}
    for policy in policies:
        pattern = policy.scope
        if pattern != scope and not (_is_glob(pattern) and fnmatchcase(scope, pattern)):
            continue
        current = best.get(policy.period)
        if current is None or _rank(policy, scope) < _rank(current, scope):
            best[policy.period] = policy
    return sorted(best.values(), key=lambda p: p.period.value)


def _rank(policy: BudgetPolicy, scope: str) -> tuple[int, int, str]:
    exact = 0 if policy.scope == scope else 1
    return (exact, -policy_specificity(policy.scope), policy.scope)


def format_usd(nano: int) -> str:
    """Dollars for people: cents always, more digits only when they are not zero."""
    amount = nano_to_usd(nano).normalize()
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        amount = amount.quantize(Decimal("0.01"))
    return f"${amount:,f}"


@dataclass(frozen=True)
class _Breach:
    policy: BudgetPolicy
    window: PeriodWindow
    spend: int
    limit: int


def _breaches(
    state: SpendState, policies: Iterable[BudgetPolicy], scope: str, now_ms: int
) -> list[_Breach]:
    found = []
    for policy in matching_policies(policies, scope):
        window = period_window(policy.period, now_ms)
        spend = state.spend(window)
        limit = policy.limit_nano_usd
        if spend >= limit:
            found.append(_Breach(policy, window, spend, limit))
    return found


def decide(
    state: SpendState, policies: Mapping[str, BudgetPolicy], scope: str, now_ms: int
) -> ControlCommand | None:
    """The command to publish for ``scope`` now, or None when what stands is already right.

    A STOP stands while the current period's spend is at or above a limit; it lapses (RESUME)
    when the period rolls over, or when the policy is raised or removed. With several breached
    periods, the STOP lasts until the latest of their ends. Unsigned: the caller signs.
    """
    breaches = _breaches(state, policies.values(), scope, now_ms)
    last = state.last_command
    last_is_stop = last is not None and last.action is ControlAction.STOP
    if breaches:
        worst = max(breaches, key=lambda b: (b.window.end_ms, b.window.start_ms))
        if (
            last is not None
            and last_is_stop
            and last.period_start_ms == worst.window.start_ms
            and last.until_ms == worst.window.end_ms
            and last.limit_nano_usd == worst.limit
        ):
            return None
        word = _PERIOD_WORDS[worst.policy.period]
        return ControlCommand(
            scope=scope,
            action=ControlAction.STOP,
            reason=(
                f"{scope} spent {format_usd(worst.spend)} of {format_usd(worst.limit)} "
                f"{word} budget"
            ),
            limit_nano_usd=worst.limit,
            spend_nano_usd=worst.spend,
            period_start_ms=worst.window.start_ms,
            until_ms=worst.window.end_ms,
            issued_at_ms=now_ms,
        )
    if last is None or not last_is_stop:
        return None
    if last.until_ms is not None and last.until_ms <= now_ms:
        why = f"{scope}: the budget period that was spent has ended; a new period started"
    else:
        why = f"{scope}: no budget is exceeded any more (policy raised or removed)"
    return ControlCommand(
        scope=scope,
        action=ControlAction.RESUME,
        reason=why,
        issued_at_ms=now_ms,
    )


def spend_report(
    state: SpendState | None, policies: Mapping[str, BudgetPolicy], scope: str, now_ms: int
) -> dict[str, Any]:
    """What /state/<scope> answers: spend and limit per current period, and what stands."""
    state = state or SpendState()
    periods = []
    governed = {p.period: p for p in matching_policies(policies.values(), scope)}
    for period in Period:
        window = period_window(period, now_ms)
        spend = state.spend(window)
        policy = governed.get(period)
        periods.append(
            {
                "period": period.value,
                "start_ms": window.start_ms,
                "end_ms": window.end_ms,
                "spend_nano_usd": spend,
                "spend_usd": f"{nano_to_usd(spend):f}",
                "limit_nano_usd": policy.limit_nano_usd if policy else None,
                "limit_usd": str(policy.limit_usd) if policy else None,
            }
        )
    return {
        "scope": scope,
        "now_ms": now_ms,
        "periods": periods,
        "buckets": dict(sorted(state.periods.items())),
        "last_command": (
            state.last_command.model_dump(mode="json") if state.last_command else None
        ),
        "applied_offsets": {str(p): o for p, o in sorted(state.applied.items())},
    }
