"""Allowances: slices of a scope's remaining budget that the processor grants a shim process.

A shim process (the *holder*) asks for an allowance in one scope with an
:class:`AllowanceRequest` on ``<prefix>allowance-requests``; the worker that owns the scope's
spend state answers with a signed :class:`AllowanceGrant` on ``<prefix>allowances``. Amounts in
a grant are cumulative per budget instance (one policy's current period), so a grant repeated
after a crash or a replayed request changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .control import SIGNATURE_SCHEME, CommandScope, SignatureError
from .events import Identifier

__all__ = [
    "ALLOWANCE_REQUEST_VERSION",
    "ALLOWANCE_VERSION",
    "HOLDER_HEADER",
    "AllowanceGrant",
    "AllowanceKind",
    "AllowanceRequest",
    "BudgetClaim",
    "BudgetGrant",
    "sign_grant",
    "verify_grant",
]

ALLOWANCE_VERSION: Literal[1] = 1
# Version 2 of a request adds ``policies_at``; processors read both, so upgrade them first.
ALLOWANCE_REQUEST_VERSION: Literal[2] = 2
# The record header naming the holder whose allowance a call event spent: the shim sets it, the
# processor moves the cost out of that holder's allowance when it counts the event.
HOLDER_HEADER = "agentledger-holder"


class AllowanceKind(StrEnum):
    ACQUIRE = "acquire"  # grant up to ``want`` more, and keep the allowance alive
    RELEASE = "release"  # give back everything beyond what was used


class BudgetClaim(BaseModel):
    """What the holder has used of one budget instance it was granted: the actual cost of its
    ended calls plus the reservations of its running ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: str = Field(min_length=1, max_length=200)
    used_nano_usd: int = Field(ge=0)


class AllowanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1, 2] = ALLOWANCE_REQUEST_VERSION
    holder: Identifier
    seq: int = Field(ge=1, description="per holder, increasing; a replay is answered again")
    scope: CommandScope
    kind: AllowanceKind = AllowanceKind.ACQUIRE
    want_nano_usd: int = Field(default=0, ge=0, description="wanted available beyond used")
    need_nano_usd: int = Field(default=0, ge=0, description="the reservation waiting now")
    claims: tuple[BudgetClaim, ...] = ()
    reply_partition: int = Field(ge=0, description="partition of the allowances topic to answer on")
    sent_at_ms: int = Field(ge=0)
    policies_at: dict[int, int] = Field(
        default_factory=dict,
        description=(
            "how far the holder had read the policies topic when it asked (partition -> next "
            "offset): the processor answers once its own policies are that far, so a holder "
            "that saw a lowered limit is never granted under the old one"
        ),
    )

    @model_validator(mode="after")
    def _positions_need_v2(self) -> AllowanceRequest:
        if self.policies_at and self.schema_version < 2:
            raise ValueError(
                "policies_at needs schema_version 2 (got 1); send version 2 or leave it out"
            )
        for partition, offset in self.policies_at.items():
            if partition < 0 or offset < 0:
                raise ValueError(
                    f"policies_at {{{partition}: {offset}}}: partitions and offsets are >= 0"
                )
        return self


class BudgetGrant(BaseModel):
    """The holder's allowance in one budget instance, with the numbers behind it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: str = Field(min_length=1, max_length=200)
    period: str = Field(max_length=50, description="the policy's period: day, week, ...")
    granted_nano_usd: int = Field(ge=0, description="cumulative for this holder and budget")
    limit_nano_usd: int = Field(ge=0)
    spend_nano_usd: int = Field(ge=0, description="confirmed spend in the period")
    outstanding_nano_usd: int = Field(ge=0, description="all holders' unconfirmed allowances")
    until_ms: int | None = Field(default=None, ge=0, description="when the period resets")


class AllowanceGrant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = ALLOWANCE_VERSION
    holder: Identifier
    seq: int = Field(ge=1)
    scope: CommandScope
    budgets: tuple[BudgetGrant, ...] = Field(
        default=(), description="empty: no budget governs the scope"
    )
    ttl_ms: int = Field(ge=0, description="unused allowance is reclaimed this long after seq")
    issued_at_ms: int = Field(ge=0)
    refused: str | None = Field(
        default=None, max_length=2000, description="why less than the need was granted"
    )
    signature: str | None = None

    def canonical_bytes(self) -> bytes:
        body = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _digest(grant: AllowanceGrant, key: bytes) -> str:
    mac = hmac.new(key, b"allowance:" + grant.canonical_bytes(), hashlib.sha256).hexdigest()
    return f"{SIGNATURE_SCHEME}:{mac}"


def sign_grant(grant: AllowanceGrant, key: bytes) -> AllowanceGrant:
    if len(key) < 16:
        raise ValueError("the control key must be at least 16 bytes")
    return grant.model_copy(update={"signature": _digest(grant, key)})


def verify_grant(grant: AllowanceGrant, key: bytes) -> None:
    """Raise SignatureError unless ``grant`` was signed with ``key``: a forged grant would let a
    process spend budget nobody granted."""
    if not grant.signature or not hmac.compare_digest(grant.signature, _digest(grant, key)):
        raise SignatureError(f"allowance grant {grant.seq} for {grant.holder} is not signed")
