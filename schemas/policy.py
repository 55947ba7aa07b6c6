"""BudgetPolicy and the YAML policy file that `agentledger budgets apply` publishes.

Version 2 adds graduated ``thresholds`` (each with an action) and the month period; a
version 1 record (no thresholds: stop at 100%) still parses. Version 3 adds a timezone for
calendar periods, rolling windows (``period: rolling`` with ``window: 24h``), per-workflow-run
budgets (``period: run``), the forecast and burn-rate detectors, spawn limits for workflows
and a max-concurrency cap for pools; a policy without ``limit_usd`` carries only detectors
and capability limits (its key is ``<scope>|limits``). v1 and v2 records still parse.
"""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

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
    "CALENDAR_PERIODS",
    "DEFAULT_RUN_IDLE",
    "BudgetPolicy",
    "BurnRate",
    "Duration",
    "Forecast",
    "Period",
    "PolicyFile",
    "PolicyFileError",
    "RetryLoop",
    "SpawnLimits",
    "Spike",
    "Threshold",
    "duration_ms",
    "parse_policy_file",
]

BUDGET_POLICY_VERSION: Literal[3] = 3


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    ROLLING = "rolling"  # the last ``window`` of event time, sliding
    RUN = "run"  # one run of a workflow: its events with no gap longer than ``idle``


CALENDAR_PERIODS = (Period.DAY, Period.WEEK, Period.MONTH)

# "90s", "5m", "24h", "7d": a count and a unit.
Duration = Annotated[
    str,
    Field(pattern=r"^[1-9][0-9]{0,6}[smhd]$", description="a count and a unit: s, m, h or d"),
]
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
DEFAULT_RUN_IDLE = "30m"


def duration_ms(text: str) -> int:
    """Milliseconds of a :data:`Duration` such as ``24h``; raise ValueError otherwise."""
    if not text or text[-1] not in _UNIT_MS or not text[:-1].isdigit():
        raise ValueError(f"a duration looks like 90s, 5m, 24h or 7d, got {text!r}")
    return int(text[:-1]) * _UNIT_MS[text[-1]]


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
    it is not plain ``alert``, standing until ``window_s`` after the last failure.

    Or, with ``max_retry_cost_percent``: retries (attempt 2 and later) making up that share or
    more of the agent's spend in the current calendar period of the policy (day when it has
    none), once that spend reaches ``min_spend_usd``; standing until the period ends."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_failures: int | None = Field(default=None, ge=1, le=10_000)
    window_s: int = Field(default=600, ge=1, le=7 * 24 * 3600)
    max_retry_cost_percent: Decimal | None = Field(
        default=None, gt=0, le=100, max_digits=5, decimal_places=2
    )
    min_spend_usd: Decimal = Field(default=Decimal("0.01"), ge=0, max_digits=21, decimal_places=9)
    action: str = Field(
        default="alert",
        pattern=rf"^(alert|refuse_new_work|stop|throttle:[1-9][0-9]{{0,5}}|route:{_MODEL})$",
    )

    _as_decimal = field_validator("max_retry_cost_percent", "min_spend_usd", mode="before")(
        _decimal_from_yaml
    )

    @model_validator(mode="after")
    def _some_rule(self) -> RetryLoop:
        if self.max_failures is None and self.max_retry_cost_percent is None:
            raise ValueError("set max_failures, max_retry_cost_percent, or both")
        return self

    def as_threshold(self) -> Threshold:
        return Threshold(at_percent=Decimal(100), action=self.action)


_ACTION = rf"^(alert|refuse_new_work|stop|throttle:[1-9][0-9]{{0,5}}|route:{_MODEL})$"


class Forecast(BaseModel):
    """A detector: at the period's average burn rate so far, the limit is projected to be
    exhausted before the period ends: an alert (kind forecast), once per period, and
    ``action`` when it is not plain ``alert``. Not before ``min_elapsed_percent`` of the period
    has passed, so one early call does not project a runaway."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_elapsed_percent: int = Field(default=10, ge=0, le=100)
    action: str = Field(default="alert", pattern=_ACTION)

    def as_threshold(self) -> Threshold:
        return Threshold(at_percent=Decimal(100), action=self.action)


class BurnRate(BaseModel):
    """A detector: spend in the last ``window`` is at least ``factor`` times the scope's own
    average spend per ``window`` over the ``baseline`` before it, and at least ``min_usd``: an
    alert (kind burn_rate), and ``action`` when it is not plain ``alert``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: Duration = "5m"
    baseline: Duration = "1h"
    factor: Decimal = Field(default=Decimal(3), gt=1, le=10_000, max_digits=7, decimal_places=2)
    min_usd: Decimal = Field(default=Decimal("0.01"), ge=0, max_digits=21, decimal_places=9)
    action: str = Field(default="alert", pattern=_ACTION)

    _as_decimal = field_validator("factor", "min_usd", mode="before")(_decimal_from_yaml)

    @model_validator(mode="after")
    def _baseline_is_whole_windows(self) -> BurnRate:
        window, baseline = duration_ms(self.window), duration_ms(self.baseline)
        if window % 10_000:
            raise ValueError(f"window ({self.window}) must be a whole multiple of 10s")
        if baseline < window or baseline % window:
            raise ValueError(
                f"baseline ({self.baseline}) must be a whole multiple of window ({self.window})"
            )
        if baseline + window > 7 * 86_400_000:
            raise ValueError("baseline + window must be at most 7d")
        return self

    def as_threshold(self) -> Threshold:
        return Threshold(at_percent=Decimal(100), action=self.action)


class SpawnLimits(BaseModel):
    """A detector for workflows: more than ``max_children`` distinct agents spawned by one
    parent, an agent deeper than ``max_depth``, or more than ``max_new_agents_per_minute`` new
    agents within one minute of event time: an alert (kind spawn_explosion), and with
    ``action: stop`` a STOP of the whole workflow scope, which every agent of the workflow
    obeys, standing until the policy is raised or removed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_children: int | None = Field(default=None, ge=1, le=100_000)
    max_depth: int | None = Field(default=None, ge=0, le=1000)
    max_new_agents_per_minute: int | None = Field(default=None, ge=1, le=100_000)
    action: Literal["alert", "stop"] = "alert"

    @model_validator(mode="after")
    def _some_limit(self) -> SpawnLimits:
        if (self.max_children, self.max_depth, self.max_new_agents_per_minute) == (
            None,
            None,
            None,
        ):
            raise ValueError(
                "set at least one of max_children, max_depth, max_new_agents_per_minute"
            )
        return self

    def as_threshold(self) -> Threshold:
        return Threshold(at_percent=Decimal(100), action=self.action)


DEFAULT_THRESHOLDS = (Threshold(at_percent=Decimal(100), action="stop"),)


class BudgetPolicy(BaseModel):
    """A spend ceiling for one scope over one period of event time (a calendar day, ISO week
    or month in ``timezone``, a rolling ``window``, or one workflow run), with its detectors;
    or, without ``limit_usd``, only detectors and capability limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1, 2, 3] = BUDGET_POLICY_VERSION
    scope: Scope
    period: Period = Period.DAY
    limit_usd: Decimal | None = Field(
        default=None,
        gt=0,
        max_digits=21,
        decimal_places=9,
        description="the spend ceiling; absent for a policy of detectors and limits only",
    )
    timezone: str = Field(
        default="UTC",
        max_length=100,
        description="IANA zone whose midnights bound day, week and month",
    )
    window: Duration | None = Field(
        default=None, description="rolling only: the window's length, whole minutes (e.g. 24h)"
    )
    idle: Duration | None = Field(
        default=None,
        description=f"run only: a gap without events that ends a run (default {DEFAULT_RUN_IDLE})",
    )
    thresholds: tuple[Threshold, ...] = Field(
        default=(), description="empty means the v1 behaviour: stop at 100%"
    )
    spike: Spike | None = None
    retry_loop: RetryLoop | None = Field(
        default=None, description="agent scopes only: the processor sees tasks per agent"
    )
    forecast: Forecast | None = None
    burn_rate: BurnRate | None = None
    spawn: SpawnLimits | None = Field(default=None, description="workflow scopes only")
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="pool scopes only: calls in flight above this publish THROTTLE",
    )

    _no_float_rounding = field_validator("limit_usd", mode="before")(_decimal_from_yaml)

    @field_validator("thresholds")
    @classmethod
    def _distinct_percents(cls, value: tuple[Threshold, ...]) -> tuple[Threshold, ...]:
        percents = [t.at_percent for t in value]
        if len(set(percents)) != len(percents):
            raise ValueError(f"each at_percent may appear once, got {[str(p) for p in percents]}")
        return tuple(sorted(value, key=lambda t: t.at_percent))

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"timezone must be an IANA zone name such as 'Europe/Paris', got {value!r}"
            ) from None
        return value

    @model_validator(mode="after")
    def _period_fields(self) -> BudgetPolicy:
        if self.period is Period.ROLLING:
            if self.window is None:
                raise ValueError("period rolling needs a window, e.g. window: 24h")
            window = duration_ms(self.window)
            if window % 60_000 or window > 7 * 86_400_000:
                raise ValueError(
                    f"window ({self.window}) must be whole minutes and at most 7d "
                    "(it is kept in 60 slots of window/60)"
                )
        elif self.window is not None:
            raise ValueError(f"window applies to period rolling only, not {self.period.value}")
        if self.period is Period.RUN:
            if not self.scope.startswith("workflow:"):
                raise ValueError(f"period run applies to workflow scopes only, not {self.scope!r}")
            if duration_ms(self.idle or DEFAULT_RUN_IDLE) > 7 * 86_400_000:
                raise ValueError(f"idle ({self.idle}) must be at most 7d")
        elif self.idle is not None:
            raise ValueError(f"idle applies to period run only, not {self.period.value}")
        if self.timezone != "UTC" and self.period not in CALENDAR_PERIODS:
            raise ValueError(
                f"timezone applies to day, week and month only, not {self.period.value}"
            )
        return self

    @model_validator(mode="after")
    def _spike_window_is_shorter(self) -> BudgetPolicy:
        if self.spike is None:
            return self
        order = list(CALENDAR_PERIODS)
        if self.period not in order or order.index(self.spike.window) >= order.index(self.period):
            raise ValueError(
                f"spike.window ({self.spike.window.value}) must be a calendar period shorter "
                f"than the policy's period ({self.period.value})"
            )
        return self

    @model_validator(mode="after")
    def _scope_kinds(self) -> BudgetPolicy:
        if self.retry_loop is not None and not self.scope.startswith("agent:"):
            raise ValueError(f"retry_loop applies to agent scopes only, not {self.scope!r}")
        if self.spawn is not None and not self.scope.startswith("workflow:"):
            raise ValueError(f"spawn applies to workflow scopes only, not {self.scope!r}")
        if self.max_concurrency is not None and not self.scope.startswith("pool:"):
            raise ValueError(f"max_concurrency applies to pool scopes only, not {self.scope!r}")
        return self

    @model_validator(mode="after")
    def _limitless_carries_detectors(self) -> BudgetPolicy:
        if self.limit_usd is not None:
            return self
        if self.thresholds or self.spike or self.forecast:
            raise ValueError("thresholds, spike and forecast need limit_usd")
        # model_dump writes the default period back, so a day period must pass here.
        if self.period is not Period.DAY or self.timezone != "UTC":
            raise ValueError("a policy without limit_usd has no period or timezone")
        if (self.retry_loop, self.burn_rate, self.spawn, self.max_concurrency) == (
            None,
            None,
            None,
            None,
        ):
            raise ValueError(
                "limit_usd is required unless the policy sets retry_loop, burn_rate, spawn "
                "or max_concurrency"
            )
        return self

    @property
    def budgeted(self) -> bool:
        """Whether the policy has a spend ceiling (else it holds detectors and limits only)."""
        return self.limit_usd is not None

    @property
    def effective_thresholds(self) -> tuple[Threshold, ...]:
        if not self.budgeted:
            return ()
        return self.thresholds or DEFAULT_THRESHOLDS

    @property
    def limit_nano_usd(self) -> int:
        if self.limit_usd is None:
            raise ValueError(f"policy {self.key} has no limit_usd")
        return usd_to_nano(self.limit_usd)

    @property
    def window_ms(self) -> int:
        """Rolling: the window's length; run: the idle gap that ends a run; else 0."""
        if self.period is Period.ROLLING and self.window is not None:
            return duration_ms(self.window)
        if self.period is Period.RUN:
            return duration_ms(self.idle or DEFAULT_RUN_IDLE)
        return 0

    @property
    def period_name(self) -> str:
        """The period part of the key: ``day``, ``rolling:24h``, ``run``, or ``limits``."""
        if not self.budgeted:
            return "limits"
        if self.period is Period.ROLLING:
            return f"rolling:{self.window}"
        return self.period.value

    @property
    def key(self) -> str:
        """The compacted policies topic keeps one policy per scope and period."""
        return f"{self.scope}|{self.period_name}"


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
        if isinstance(exc, yaml.reader.ReaderError):
            # A forbidden character has no mark, only its position in the text.
            where = f":{text.count(chr(10), 0, exc.position) + 1}"
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
