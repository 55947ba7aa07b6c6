"""Published JSON Schemas, one file per model and version (schemas/json/<name>.v<N>.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .alerts import ALERT_VERSION, Alert
from .allowance import (
    ALLOWANCE_REQUEST_VERSION,
    ALLOWANCE_VERSION,
    AllowanceGrant,
    AllowanceRequest,
)
from .control import CONTROL_COMMAND_VERSION, ControlCommand
from .dlq import DEAD_LETTER_VERSION, InvalidMessage
from .events import CALL_EVENT_VERSION, CallEvent
from .pause import PAUSE_VERSION, PauseRecord
from .policy import BUDGET_POLICY_VERSION, BudgetPolicy
from .stats import STATS_VERSION, TaskStats

__all__ = ["PUBLISHED", "SCHEMA_DIR", "render", "write_all"]

SCHEMA_DIR = Path(__file__).parent / "json"

PUBLISHED: dict[str, tuple[type[BaseModel], int]] = {
    "call_event": (CallEvent, CALL_EVENT_VERSION),
    "control_command": (ControlCommand, CONTROL_COMMAND_VERSION),
    "budget_policy": (BudgetPolicy, BUDGET_POLICY_VERSION),
    "invalid_message": (InvalidMessage, DEAD_LETTER_VERSION),
    "alert": (Alert, ALERT_VERSION),
    "task_stats": (TaskStats, STATS_VERSION),
    "allowance_request": (AllowanceRequest, ALLOWANCE_REQUEST_VERSION),
    "allowance_grant": (AllowanceGrant, ALLOWANCE_VERSION),
    "pause_record": (PauseRecord, PAUSE_VERSION),
}


def render(model: type[BaseModel]) -> str:
    schema: dict[str, Any] = model.model_json_schema(mode="validation")
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_all(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every published schema; a changed schema needs a version bump first."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (model, version) in PUBLISHED.items():
        path = directory / f"{name}.v{version}.json"
        path.write_text(render(model))
        written.append(path)
    return written
