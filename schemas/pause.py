"""PauseRecord: calls of one shim process waiting out a refusal on one scope (a framework
integration's ``Pause``), so an operator sees what is paused and can resume it.

Published to the compacted ``<prefix>pauses`` topic keyed by ``pause_key(process, scope)``:
when the first call starts waiting, whenever the waiting set changes, and every
``refresh_ms`` while it lasts. A tombstone under the same key says the pause ended. A reader
drops a record once it is older than ``STALE_AFTER_REFRESHES`` refreshes (the process died
without its tombstone) or once ``waits_until_ms`` passed (every call has given up by then).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .control import CommandScope
from .events import Identifier

__all__ = ["PAUSE_VERSION", "STALE_AFTER_REFRESHES", "PauseRecord", "pause_key"]

PAUSE_VERSION: Literal[1] = 1
STALE_AFTER_REFRESHES = 3
MAX_AGENTS = 20


def pause_key(process: str, scope: str) -> bytes:
    """The record's Kafka key: one record per (process, scope). ``|`` is not an identifier
    character, so no two pairs share a key."""
    return f"{process}|{scope}".encode()


class PauseRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = PAUSE_VERSION
    process: Identifier = Field(description="the shim process: '<host>.<pid>.<random>'")
    host: str = Field(min_length=1, max_length=255)
    pid: int = Field(ge=0)
    scope: CommandScope = Field(description="the scope whose refusal the calls wait out")
    agents: list[Identifier] = Field(
        min_length=1, max_length=MAX_AGENTS, description="the agents waiting (sorted, first 20)"
    )
    calls: int = Field(ge=1, description="calls waiting now")
    reason: str = Field(max_length=500, description="the refusal, as the shim raised it")
    since_ms: int = Field(ge=0, description="when the oldest waiting call was refused")
    waits_until_ms: int = Field(ge=0, description="when the last waiting call gives up")
    resets_at_ms: int | None = Field(
        default=None, ge=0, description="when the refusing STOP lapses, if it says"
    )
    updated_at_ms: int = Field(ge=0)
    refresh_ms: int = Field(ge=1, description="how often the shim re-publishes while paused")

    @model_validator(mode="after")
    def _ordered(self) -> PauseRecord:
        if self.waits_until_ms < self.since_ms:
            raise ValueError(
                f"waits_until_ms ({self.waits_until_ms}) is before since_ms ({self.since_ms})"
            )
        if self.updated_at_ms < self.since_ms:
            raise ValueError(
                f"updated_at_ms ({self.updated_at_ms}) is before since_ms ({self.since_ms})"
            )
        return self

    def key(self) -> bytes:
        return pause_key(self.process, self.scope)

    def live(self, now_ms: int) -> bool:
        """Still waiting as far as a reader can tell at ``now_ms``."""
        fresh = now_ms - self.updated_at_ms <= STALE_AFTER_REFRESHES * self.refresh_ms
        return fresh and now_ms < self.waits_until_ms
