"""CallEvent: one LLM call (or one failed attempt) made by one agent."""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .ids import uuid7

__all__ = ["CALL_EVENT_VERSION", "CallEvent", "CallFields", "CallStatus", "Identifier", "id_hex"]

CALL_EVENT_VERSION: Literal[1] = 1

# Ids travel in Kafka keys, ClickHouse rows and scope strings ("agent:<id>"), so they are kept
# printable and free of whitespace.
Identifier = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:/@+\-]+$")]
TokenCount = Annotated[int, Field(ge=0, le=100_000_000)]


class CallStatus(StrEnum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    REFUSED = "refused"


class CallEvent(BaseModel):
    """One LLM call attempt. Only leaf calls carry cost; a parent never re-counts its children.

    ``input_tokens`` counts every prompt token, cached ones included (``cached_input_tokens`` is
    the cached subset), and ``output_tokens`` includes ``reasoning_tokens``, as the providers
    bill them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = CALL_EVENT_VERSION
    event_id: uuid.UUID = Field(default_factory=uuid7)
    event_time_ms: int = Field(ge=0, lt=1 << 48, description="UTC unix milliseconds, event time")

    agent_id: Identifier
    pool: Identifier | None = None
    workflow_id: Identifier | None = None
    parent_agent_id: Identifier | None = None
    spawn_depth: int = Field(default=0, ge=0, le=1000)
    task_type: Identifier | None = None
    task_id: Identifier | None = None

    provider: Identifier
    requested_model: Identifier
    used_model: Identifier

    input_tokens: TokenCount = 0
    output_tokens: TokenCount = 0
    cached_input_tokens: TokenCount = 0
    reasoning_tokens: TokenCount = 0

    cost_nano_usd: int = Field(ge=0, description="exact cost in 1e-9 USD")
    priced: bool = Field(
        default=True, description="false when no price was known; the cost is then 0 and unknown"
    )
    pricing_version: str | None = Field(default=None, max_length=100)

    latency_ms: int = Field(ge=0)
    status: CallStatus = CallStatus.OK
    attempt: int = Field(default=1, ge=1, le=10_000)
    error_type: str | None = Field(default=None, max_length=200)

    @field_validator("cached_input_tokens")
    @classmethod
    def _cached_within_input(cls, cached: int, info: ValidationInfo) -> int:
        data = info.data
        total = data.get("input_tokens")
        if total is not None and cached > total:
            raise ValueError(
                f"cached_input_tokens ({cached}) is part of input_tokens ({total}) and cannot "
                "exceed it: send the total prompt tokens as input_tokens"
            )
        return cached

    @field_validator("reasoning_tokens")
    @classmethod
    def _reasoning_within_output(cls, reasoning: int, info: ValidationInfo) -> int:
        data = info.data
        total = data.get("output_tokens")
        if total is not None and reasoning > total:
            raise ValueError(
                f"reasoning_tokens ({reasoning}) is part of output_tokens ({total}) and cannot "
                "exceed it: send the total completion tokens as output_tokens"
            )
        return reasoning

    def scopes(self) -> tuple[str, ...]:
        """Every budget scope this call counts toward."""
        found = [f"agent:{self.agent_id}"]
        if self.pool:
            found.append(f"pool:{self.pool}")
        if self.workflow_id:
            found.append(f"workflow:{self.workflow_id}")
        if self.task_type:
            found.append(f"task_type:{self.task_type}")
        return tuple(found)


class CallFields(Protocol):
    """A call's fields, read-only: what the processor's pure core reads. Both CallEvent and
    the msgspec CallRecord (agentledger.schemas.call_decode, decoded to the same values)
    have them, so a batch path can count records without building pydantic models. The record
    carries event_id as the UUID's canonical text (``str(uuid)``): turning the object back
    into text cost more than msgspec's whole decode of the rest; :func:`id_hex` reads both."""

    @property
    def schema_version(self) -> Literal[1]: ...
    @property
    def event_id(self) -> uuid.UUID | str: ...
    @property
    def event_time_ms(self) -> int: ...
    @property
    def agent_id(self) -> str: ...
    @property
    def pool(self) -> str | None: ...
    @property
    def workflow_id(self) -> str | None: ...
    @property
    def parent_agent_id(self) -> str | None: ...
    @property
    def spawn_depth(self) -> int: ...
    @property
    def task_type(self) -> str | None: ...
    @property
    def task_id(self) -> str | None: ...
    @property
    def provider(self) -> str: ...
    @property
    def requested_model(self) -> str: ...
    @property
    def used_model(self) -> str: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def cached_input_tokens(self) -> int: ...
    @property
    def reasoning_tokens(self) -> int: ...
    @property
    def cost_nano_usd(self) -> int: ...
    @property
    def priced(self) -> bool: ...
    @property
    def pricing_version(self) -> str | None: ...
    @property
    def latency_ms(self) -> int: ...
    @property
    def status(self) -> CallStatus: ...
    @property
    def attempt(self) -> int: ...
    @property
    def error_type(self) -> str | None: ...

    def scopes(self) -> tuple[str, ...]: ...


def id_hex(event_id: uuid.UUID | str) -> str:
    """The id as 32 hex digits (what the processor's state keys recent ids by), from a UUID or
    its canonical text (lower-case, hyphenated: CallRecord's, checked when decoded)."""
    if isinstance(event_id, str):
        return event_id.replace("-", "")
    return event_id.hex
