"""The dead-letter contract: a message no component could use, and why."""

from __future__ import annotations

import base64
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEAD_LETTER_VERSION", "InvalidMessage"]

DEAD_LETTER_VERSION: Literal[1] = 1


class InvalidMessage(BaseModel):
    """Written to ``<prefix>dlq`` keyed by the source topic and partition; nothing is dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = DEAD_LETTER_VERSION
    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)
    reason: str = Field(max_length=4000)
    component: str = Field(description="who rejected it: processor or sink")
    detected_at_ms: int = Field(ge=0)
    key_b64: str | None = None
    payload_b64: str

    @classmethod
    def from_raw(
        cls,
        *,
        topic: str,
        partition: int,
        offset: int,
        reason: str,
        component: str,
        detected_at_ms: int,
        key: bytes | None,
        payload: bytes | None,
    ) -> InvalidMessage:
        return cls(
            topic=topic,
            partition=partition,
            offset=offset,
            reason=reason[:4000],
            component=component,
            detected_at_ms=detected_at_ms,
            key_b64=base64.b64encode(key).decode() if key is not None else None,
            payload_b64=base64.b64encode(payload or b"").decode(),
        )

    def payload(self) -> bytes:
        return base64.b64decode(self.payload_b64)
