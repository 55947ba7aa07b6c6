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
    "SpendState",
    "apply_event",
    "decide",
    "format_usd",
    "matching_policies",
    "spend_report",
]

# Buckets that ended this long before now are dropped from the live state: no budget period
# reaches back that far, and the full history lives in ClickHouse.
KEEP_PERIODS_MS = 35 * DAY_MS

_PERIOD_WORDS = {Period.DAY: "daily", Period.WEEK: "weekly"}


@dataclass(frozen=True)
class SpendState:
    """Everything the processor knows about one agent, stored as one table value."""

    applied: Mapping[int, int] = field(default_factory=dict)
    periods: Mapping[str, int] = field(default_factory=dict)
    last_command: ControlCommand | None = None
    partition: int | None = None

    def already_applied(self, partition: int, offset: int) -> bool:
        done = self.applied.get(partition)
        return done is not None and offset <= done

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
        return cls(applied=applied, periods=periods, last_command=command, partition=partition)


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def apply_event(
    state: SpendState, event: CallEvent, partition: int, offset: int, *, now_ms: int
) -> SpendState:
    """Count ``event`` (read at ``partition``/``offset``) in the periods of its event time.

    Returns ``state`` itself when that offset was already applied, so a replay is a no-op.
    Every event counts toward both its day and its week, so a policy published later, of
    either period, sees the spend made before it arrived.
    """
    if state.already_applied(partition, offset):
        return state
    periods = dict(state.periods)
    for period in Period:
        key = period_window(period, event.event_time_ms).key
        periods[key] = periods.get(key, 0) + event.cost_nano_usd
    horizon = now_ms - KEEP_PERIODS_MS
    periods = {k: v for k, v in periods.items() if parse_period_key(k).end_ms > horizon}
    applied = {**state.applied, partition: offset}
    return replace(state, applied=applied, periods=periods, partition=partition)


def matching_policies(policies: Iterable[BudgetPolicy], scope: str) -> list[BudgetPolicy]:
    """The policies that govern ``scope``: exact scope match, one per period."""
    return sorted((p for p in policies if p.scope == scope), key=lambda p: p.period.value)


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
