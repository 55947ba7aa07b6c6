"""Alert: something an operator should look at (a threshold crossed, a spike, a detector firing).

Alerts go to ``<prefix>alerts`` keyed by scope; they inform, while ControlCommands act.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .control import Scope
from .ids import uuid7

__all__ = ["ALERT_VERSION", "Alert", "AlertKind", "Severity"]

ALERT_VERSION: Literal[1] = 1


class AlertKind(StrEnum):
    THRESHOLD = "threshold"
    SPIKE = "spike"
    RETRY_LOOP = "retry_loop"
    SPAWN_EXPLOSION = "spawn_explosion"
    BURN_RATE = "burn_rate"
    FORECAST = "forecast"
    CAPACITY = "capacity"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Alert(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = ALERT_VERSION
    alert_id: uuid.UUID = Field(default_factory=uuid7)
    kind: AlertKind
    severity: Severity = Severity.WARNING
    scope: Scope
    message: str = Field(max_length=4000, description="what happened, for an operator")
    issued_at_ms: int = Field(ge=0)
    period_start_ms: int | None = Field(default=None, ge=0)
    spend_nano_usd: int | None = Field(default=None, ge=0)
    limit_nano_usd: int | None = Field(default=None, ge=0)
    action: str | None = Field(
        default=None, max_length=200, description="the control action taken with it, if any"
    )
    details: dict[str, str | int] = Field(default_factory=dict)
