"""What the shim raises and warns: a budget refusal, and a call it could not price."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Self

from agentledger.schemas import ControlCommand, nano_to_usd, usd_to_nano
from agentledger.schemas import format_usd as format_usd_nano

__all__ = [
    "AllowanceRefused",
    "BudgetExceeded",
    "ControlPlaneUnavailable",
    "NewWorkRefused",
    "ThrottleTimeout",
    "UnpricedModelWarning",
    "format_usd",
]


def format_usd(amount: Decimal) -> str:
    """A Decimal USD amount in the one format of money for people (schemas.format_usd)."""
    return format_usd_nano(usd_to_nano(amount))


def _iso_utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_PERIOD_NAMES = {24 * 3600 * 1000: "day", 7 * 24 * 3600 * 1000: "week"}


def _period_of(command: ControlCommand) -> str | None:
    """The budget period's name, from the window the processor states (start to reset)."""
    if command.period_start_ms is None or command.until_ms is None:
        return None
    return _PERIOD_NAMES.get(command.until_ms - command.period_start_ms)


class BudgetExceeded(Exception):
    """A STOP stands for one of the agent's budget scopes, so the call was refused.

    Deliberately a plain ``Exception``: retry helpers that back off on rate limits must not
    treat a spent budget as something that goes away by retrying.
    """

    def __init__(
        self,
        scope: str,
        reason: str,
        *,
        limit_usd: Decimal | None = None,
        spend_usd: Decimal | None = None,
        resets_at_ms: int | None = None,
        period: str | None = None,
    ) -> None:
        self.scope = scope
        self.reason = reason
        self.limit_usd = limit_usd
        self.spend_usd = spend_usd
        self.resets_at_ms = resets_at_ms
        self.period = period
        super().__init__(self._message())

    @classmethod
    def from_command(cls, command: ControlCommand) -> Self:
        period = command.params.get("period") or _period_of(command)
        limit, spend = command.limit_nano_usd, command.spend_nano_usd
        return cls(
            command.scope,
            command.reason,
            limit_usd=None if limit is None else nano_to_usd(limit),
            spend_usd=None if spend is None else nano_to_usd(spend),
            resets_at_ms=command.until_ms,
            period=None if period is None else str(period),
        )

    def _message(self) -> str:
        if self.spend_usd is not None and self.limit_usd is not None:
            detail = f"spent {format_usd(self.spend_usd)} of {format_usd(self.limit_usd)}"
            if self.period:
                detail += f" ({self.period})"
        else:
            detail = self.reason or "stopped"
        if self.reason.startswith("local reservation"):
            detail += f"; refused by the {self.reason}"
        message = f"budget exceeded for {self.scope}: {detail}"
        if self.resets_at_ms is not None:
            message += f"; resets {_iso_utc(self.resets_at_ms)}"
        return message

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields would be lost by the default pickling of exceptions, and agents
        # do send exceptions across process pools.
        return (
            _rebuild,
            (
                type(self),
                self.scope,
                self.reason,
                self.limit_usd,
                self.spend_usd,
                self.resets_at_ms,
                self.period,
            ),
        )


def _rebuild(
    cls: type[BudgetExceeded],
    scope: str,
    reason: str,
    limit_usd: Decimal | None,
    spend_usd: Decimal | None,
    resets_at_ms: int | None,
    period: str | None,
) -> BudgetExceeded:
    return cls(
        scope,
        reason,
        limit_usd=limit_usd,
        spend_usd=spend_usd,
        resets_at_ms=resets_at_ms,
        period=period,
    )


class NewWorkRefused(BudgetExceeded):
    """A REFUSE_NEW_WORK (the warn threshold) stands for one of the agent's scopes, so a new
    ``agent.task()`` was refused; calls inside tasks already running go on."""

    def _message(self) -> str:
        detail = super()._message().removeprefix(f"budget exceeded for {self.scope}: ")
        return f"new work refused for {self.scope}: {detail}"


class ThrottleTimeout(BudgetExceeded):
    """A THROTTLE stood for one of the agent's scopes and no slot freed up within the ledger's
    ``throttle_max_wait_s``. ``reason`` says how long the call waited for how many slots."""

    def _message(self) -> str:
        return f"throttled at {self.scope}: {self.reason}"


class ControlPlaneUnavailable(BudgetExceeded):
    """Fail-closed: the control topic has been unreachable for longer than the ledger's
    ``fail_closed_after_s``, so no call may start until it answers again."""

    def _message(self) -> str:
        return f"refused by {self.scope}: {self.reason}"


class AllowanceRefused(BudgetExceeded):
    """The call's reservation does not fit in what the processor would grant this process of
    a budget: the budget is spent, or what is left is granted to other processes. ``reason``
    has the numbers; ``resets_at_ms`` says when the period resets (None for rolling windows)."""

    def _message(self) -> str:
        message = f"budget exceeded for {self.scope}: allowance refused: {self.reason}"
        if self.resets_at_ms is not None:
            message += f"; resets {_iso_utc(self.resets_at_ms)}"
        return message


class UnpricedModelWarning(UserWarning):
    """No price is known for a call's model: its event says ``priced=False`` and cost 0."""
