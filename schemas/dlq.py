"""The dead-letter contract: a message no component could use, and why."""

from __future__ import annotations

import base64
import logging
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEAD_LETTER_VERSION", "DeadLetter", "InvalidMessage", "dead_letter"]

log = logging.getLogger("agentledger.dlq")

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


class DeadLetter(NamedTuple):
    """One record for ``<prefix>dlq``, ready for any producer: key, value and the message."""

    key: bytes
    value: bytes
    message: InvalidMessage


def dead_letter(
    *,
    topic: str,
    partition: int,
    offset: int,
    reason: str,
    component: str,
    detected_at_ms: int,
    key: bytes | None,
    payload: bytes | None,
) -> DeadLetter:
    """The one dlq writer of the shim, the processor and the sink: the record (keyed by the
    source topic and partition, so one source's dead letters stay in order) and one warning
    line naming where it came from and why. Each component sends it with its own producer."""
    message = InvalidMessage.from_raw(
        topic=topic,
        partition=partition,
        offset=offset,
        reason=reason,
        component=component,
        detected_at_ms=detected_at_ms,
        key=key,
        payload=payload,
    )
    log.warning("%s dead-lettered %s:%d@%d: %s", component, topic, partition, offset, reason[:300])
    return DeadLetter(f"{topic}:{partition}".encode(), message.model_dump_json().encode(), message)
