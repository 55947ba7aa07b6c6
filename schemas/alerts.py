"""Alert: something an operator should look at (a threshold crossed, a spike, a detector firing).

Alerts go to ``<prefix>alerts`` keyed by scope; they inform, while ControlCommands act.

Version 2 adds the ``dlq_rate`` kind, raised by a component about itself, so its scope may
also be ``processor:<what>`` (e.g. ``processor:dlq``); v1 records still parse.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .control import Scope
from .ids import uuid7

__all__ = ["ALERT_VERSION", "Alert", "AlertKind", "Severity"]

ALERT_VERSION: Literal[2] = 2

# A component's alert about itself rather than about a budget scope.
ComponentScope = Annotated[str, Field(pattern=r"^processor:[a-z_]{1,50}$")]


class AlertKind(StrEnum):
    THRESHOLD = "threshold"
    SPIKE = "spike"
    RETRY_LOOP = "retry_loop"
    SPAWN_EXPLOSION = "spawn_explosion"
    BURN_RATE = "burn_rate"
    FORECAST = "forecast"
    CAPACITY = "capacity"
    DLQ_RATE = "dlq_rate"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Alert(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1, 2] = ALERT_VERSION
    alert_id: uuid.UUID = Field(default_factory=uuid7)
    kind: AlertKind
    severity: Severity = Severity.WARNING
    scope: Scope | ComponentScope
    message: str = Field(max_length=4000, description="what happened, for an operator")
    issued_at_ms: int = Field(ge=0)
    period_start_ms: int | None = Field(default=None, ge=0)
    spend_nano_usd: int | None = Field(default=None, ge=0)
    limit_nano_usd: int | None = Field(default=None, ge=0)
    action: str | None = Field(
        default=None, max_length=200, description="the control action taken with it, if any"
    )
    details: dict[str, str | int] = Field(default_factory=dict)
