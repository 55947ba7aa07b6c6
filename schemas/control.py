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

from pydantic import BaseModel, ConfigDict, Field

from .ids import uuid7

__all__ = [
    "CONTROL_COMMAND_VERSION",
    "ControlAction",
    "ControlCommand",
    "Scope",
    "SignatureError",
    "sign_command",
    "verify_command",
]

CONTROL_COMMAND_VERSION: Literal[1] = 1
SIGNATURE_SCHEME = "hmac-sha256"

Scope = Annotated[
    str,
    Field(
        min_length=3,
        max_length=210,
        pattern=r"^(agent|pool|workflow|task_type):[A-Za-z0-9._:/@+\-*?]+$",
        description="'<kind>:<id>', kind one of agent, pool, workflow, task_type",
    ),
]


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

    schema_version: Literal[1] = CONTROL_COMMAND_VERSION
    command_id: uuid.UUID = Field(default_factory=uuid7)
    scope: Scope
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
