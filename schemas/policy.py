"""BudgetPolicy and the YAML policy file that `agentledger budgets apply` publishes.

Version 2 adds graduated ``thresholds`` (each with an action) and the month period; a
version 1 record (no thresholds: stop at 100%) still parses.
"""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .control import ControlAction, Scope
from .money import usd_to_nano

__all__ = [
    "BUDGET_POLICY_VERSION",
    "BudgetPolicy",
    "Period",
    "PolicyFile",
    "PolicyFileError",
    "RetryLoop",
    "Spike",
    "Threshold",
    "parse_policy_file",
]

BUDGET_POLICY_VERSION: Literal[2] = 2


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


_MODEL = r"[A-Za-z0-9._:/@+\-]{1,200}"


def _decimal_from_yaml(value: Any) -> Any:
    # YAML turns `5.10` into a float; going through its shortest repr keeps what the user
    # wrote instead of the binary approximation.
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


class Threshold(BaseModel):
    """At ``at_percent`` of the limit, do ``action``: ``alert``, ``refuse_new_work``,
    ``throttle:N`` (at most N calls in flight), ``route:MODEL`` (call MODEL instead) or
    ``stop``. Every crossing also raises an alert."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at_percent: Decimal = Field(gt=0, le=10_000, max_digits=7, decimal_places=2)
    action: str = Field(
        pattern=rf"^(alert|refuse_new_work|stop|throttle:[1-9][0-9]{{0,5}}|route:{_MODEL})$",
        description="alert | refuse_new_work | throttle:N | route:MODEL | stop",
    )
    from_model: str = Field(
        default="*",
        pattern=rf"^(\*|{_MODEL})$",
        description="route only: the requested model that is re-routed; '*' means every model",
    )

    _as_decimal = field_validator("at_percent", mode="before")(_decimal_from_yaml)

    @property
    def control_action(self) -> ControlAction | None:
        """The command this threshold publishes; None for a plain alert."""
        kind = self.action.partition(":")[0]
        return None if kind == "alert" else ControlAction(kind)

    @property
    def params(self) -> dict[str, str | int]:
        kind, _, arg = self.action.partition(":")
        if kind == "throttle":
            return {"concurrency": int(arg)}
        if kind == "route":
            return {"from": self.from_model, "to": arg}
        return {}


class Spike(BaseModel):
    """Spend within one shorter ``window`` reaching ``at_percent`` of the policy's (longer)
    limit, e.g. 20% of a weekly budget in one day: an alert (kind spike), and ``action`` when
    it is not plain ``alert``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: Period = Period.DAY
    at_percent: Decimal = Field(gt=0, le=10_000, max_digits=7, decimal_places=2)
    action: str = Field(
        default="alert",
        pattern=rf"^(alert|refuse_new_work|stop|throttle:[1-9][0-9]{{0,5}}|route:{_MODEL})$",
    )
    from_model: str = Field(default="*", pattern=rf"^(\*|{_MODEL})$")

    _as_decimal = field_validator("at_percent", mode="before")(_decimal_from_yaml)

    def as_threshold(self) -> Threshold:
        return Threshold(at_percent=self.at_percent, action=self.action, from_model=self.from_model)


class RetryLoop(BaseModel):
    """A detector: more than ``max_failures`` failed attempts on one task (task_id) within
    ``window_s`` seconds of event time raises an alert (kind retry_loop), and ``action`` when
    it is not plain ``alert``, standing until ``window_s`` after the last failure."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_failures: int = Field(ge=1, le=10_000)
    window_s: int = Field(default=600, ge=1, le=7 * 24 * 3600)
    action: str = Field(
        default="alert",
        pattern=rf"^(alert|refuse_new_work|stop|throttle:[1-9][0-9]{{0,5}}|route:{_MODEL})$",
    )

    def as_threshold(self) -> Threshold:
        return Threshold(at_percent=Decimal(100), action=self.action)


DEFAULT_THRESHOLDS = (Threshold(at_percent=Decimal(100), action="stop"),)


class BudgetPolicy(BaseModel):
    """A spend ceiling for one scope over one calendar period (UTC, event time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1, 2] = BUDGET_POLICY_VERSION
    scope: Scope
    period: Period = Period.DAY
    limit_usd: Decimal = Field(gt=0, max_digits=21, decimal_places=9)
    timezone: Literal["UTC"] = "UTC"
    thresholds: tuple[Threshold, ...] = Field(
        default=(), description="empty means the v1 behaviour: stop at 100%"
    )
    spike: Spike | None = None
    retry_loop: RetryLoop | None = Field(
        default=None, description="agent scopes only: the processor sees tasks per agent"
    )

    _no_float_rounding = field_validator("limit_usd", mode="before")(_decimal_from_yaml)

    @field_validator("thresholds")
    @classmethod
    def _distinct_percents(cls, value: tuple[Threshold, ...]) -> tuple[Threshold, ...]:
        percents = [t.at_percent for t in value]
        if len(set(percents)) != len(percents):
            raise ValueError(f"each at_percent may appear once, got {[str(p) for p in percents]}")
        return tuple(sorted(value, key=lambda t: t.at_percent))

    @model_validator(mode="after")
    def _spike_window_is_shorter(self) -> BudgetPolicy:
        order = list(Period)
        if self.spike is not None and order.index(self.spike.window) >= order.index(self.period):
            raise ValueError(
                f"spike.window ({self.spike.window.value}) must be shorter than the policy's "
                f"period ({self.period.value})"
            )
        return self

    @model_validator(mode="after")
    def _retry_loop_on_agents(self) -> BudgetPolicy:
        if self.retry_loop is not None and not self.scope.startswith("agent:"):
            raise ValueError(f"retry_loop applies to agent scopes only, not {self.scope!r}")
        return self

    @property
    def effective_thresholds(self) -> tuple[Threshold, ...]:
        return self.thresholds or DEFAULT_THRESHOLDS

    @property
    def limit_nano_usd(self) -> int:
        return usd_to_nano(self.limit_usd)

    @property
    def key(self) -> str:
        """The compacted policies topic keeps one policy per scope and period."""
        return f"{self.scope}|{self.period.value}"


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budgets: list[BudgetPolicy] = Field(default_factory=list)


class PolicyFileError(ValueError):
    """A policy file that cannot be applied; the message names the line and the field."""


def _node_at(root: yaml.Node | None, loc: tuple[int | str, ...]) -> yaml.Node | None:
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
            if node is None:
                return None
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return None
            node = node.value[part]
        else:
            return node
    return node


def parse_policy_file(text: str, source: str = "<policy>") -> PolicyFile:
    """Parse and validate a policy file, reporting errors as ``file:line: field: problem``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise PolicyFileError(f"{source}{where}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyFileError(f"{source}:1: the top level must be a mapping with a 'budgets' list")
    try:
        return PolicyFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            node = _node_at(root, loc)
            line = node.start_mark.line + 1 if node is not None else 1
            field = ".".join(str(p) for p in loc) or "(top level)"
            problems.append(f"{source}:{line}: {field}: {err['msg']}")
        raise PolicyFileError("\n".join(problems)) from exc
