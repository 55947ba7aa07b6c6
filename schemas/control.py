"""ControlCommand: what the processor (or an operator) tells running agents, and its signature.

Commands are signed with HMAC-SHA256 over a canonical JSON form, so an agent obeys only the
processor and operators that hold the shared key. A replayed older command for a scope is
recognised by its ``issued_at_ms`` and ignored by the shim.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .ids import uuid7

__all__ = [
    "CONTROL_COMMAND_VERSION",
    "SUBTREE_KIND",
    "CommandScope",
    "ControlAction",
    "ControlCommand",
    "Scope",
    "SignatureError",
    "sign_command",
    "subtree_scope",
    "verify_command",
]

# Version 2 adds subtree scopes. Commands for the other scopes are still written as version 1,
# so a shim from before version 2 keeps reading them (and ignores subtree commands).
CONTROL_COMMAND_VERSION: Literal[2] = 2
SIGNATURE_SCHEME = "hmac-sha256"
SUBTREE_KIND = "subtree"

Scope = Annotated[
    str,
    Field(
        min_length=3,
        max_length=210,
        pattern=r"^(agent|pool|workflow|task_type):[A-Za-z0-9._:/@+\-*?]+$",
        description="'<kind>:<id>', kind one of agent, pool, workflow, task_type",
    ),
]
# "|" is not an identifier character, so workflow and agent ids (which may hold "/" or ":")
# never make two subtrees look alike.
CommandScope = Annotated[
    str,
    Field(
        min_length=3,
        max_length=420,
        pattern=(
            r"^((agent|pool|workflow|task_type):[A-Za-z0-9._:/@+\-*?]+"
            r"|subtree:[A-Za-z0-9._:/@+\-]+\|[A-Za-z0-9._:/@+\-]+)$"
        ),
        description="'<kind>:<id>' (kind agent, pool, workflow or task_type), or "
        "'subtree:<workflow>|<agent>': every agent of the workflow spawned, directly or not, "
        "by that agent (not the agent itself)",
    ),
]


def subtree_scope(workflow_id: str, agent_id: str) -> str:
    """The scope of the agents of ``workflow_id`` that descend from ``agent_id``."""
    return f"{SUBTREE_KIND}:{workflow_id}|{agent_id}"


class ControlAction(StrEnum):
    STOP = "stop"
    RESUME = "resume"
    REFUSE_NEW_WORK = "refuse_new_work"
    THROTTLE = "throttle"
    ROUTE = "route"


class SignatureError(ValueError):
    """A command's signature is missing or does not match its content."""


class ControlCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1, 2] = 1
    command_id: uuid.UUID = Field(default_factory=uuid7)
    scope: CommandScope
    action: ControlAction
    params: dict[str, str | int] = Field(
        default_factory=dict,
        description="throttle: {'concurrency': n}; route: {'from': model, 'to': model}",
    )
    reason: str = Field(max_length=2000)
    limit_nano_usd: int | None = Field(default=None, ge=0)
    spend_nano_usd: int | None = Field(default=None, ge=0)
    period_start_ms: int | None = Field(default=None, ge=0)
    issued_at_ms: int = Field(ge=0)
    until_ms: int | None = Field(default=None, ge=0, description="when the command lapses")
    issuer: str = Field(default="processor", max_length=200)
    signature: str | None = None

    @model_validator(mode="after")
    def _subtree_needs_v2(self) -> ControlCommand:
        if self.scope.startswith(f"{SUBTREE_KIND}:") and self.schema_version < 2:
            raise ValueError(
                f"scope {self.scope!r} is a subtree scope, which needs schema_version 2 "
                f"(got {self.schema_version})"
            )
        return self

    def canonical_bytes(self) -> bytes:
        """The signed content: every field but the signature, as sorted compact JSON."""
        body = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _digest(command: ControlCommand, key: bytes) -> str:
    mac = hmac.new(key, command.canonical_bytes(), hashlib.sha256).hexdigest()
    return f"{SIGNATURE_SCHEME}:{mac}"


def sign_command(command: ControlCommand, key: bytes) -> ControlCommand:
    if len(key) < 16:
        raise ValueError(
            "the control key must be at least 16 bytes; generate one with "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return command.model_copy(update={"signature": _digest(command, key)})


def verify_command(command: ControlCommand, key: bytes) -> None:
    """Raise SignatureError unless ``command`` was signed with ``key``."""
    if not command.signature:
        raise SignatureError(f"command {command.command_id} for {command.scope} is unsigned")
    if not hmac.compare_digest(command.signature, _digest(command, key)):
        raise SignatureError(
            f"command {command.command_id} for {command.scope} has a bad signature"
        )
