"""BudgetPolicy and the YAML policy file that `agentledger budgets apply` publishes."""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .control import Scope
from .money import usd_to_nano

__all__ = [
    "BUDGET_POLICY_VERSION",
    "BudgetPolicy",
    "Period",
    "PolicyFile",
    "PolicyFileError",
    "parse_policy_file",
]

BUDGET_POLICY_VERSION: Literal[1] = 1


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"


class BudgetPolicy(BaseModel):
    """A spend ceiling for one scope over one calendar period (UTC, event time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = BUDGET_POLICY_VERSION
    scope: Scope
    period: Period = Period.DAY
    limit_usd: Decimal = Field(gt=0, max_digits=21, decimal_places=9)
    timezone: Literal["UTC"] = "UTC"

    @field_validator("limit_usd", mode="before")
    @classmethod
    def _no_float_rounding(cls, value: Any) -> Any:
        # YAML turns `5.10` into a float; going through its shortest repr keeps what the user
        # wrote instead of the binary approximation.
        if isinstance(value, float):
            return Decimal(repr(value))
        return value

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
