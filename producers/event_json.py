"""The calls-topic bytes of one CallEvent, built directly on the agent's thread.

Constructing the pydantic ``CallEvent`` and dumping it costs about 16 us a call, most of the
shim's budget. The shim has already checked every user-supplied value where it entered
(``call()``, ``record()``), so here it only re-checks the cheap invariants (ranges, types,
identifiers through a cache) and writes the JSON text in ``CallEvent``'s field order, byte for
byte what ``CallEvent.model_dump_json()`` produces (tests compare the two). Anything outside
the plain cases (a non-ASCII error text, a value out of range) returns None, and the caller
takes the pydantic path, which validates and dead-letters.
"""

from __future__ import annotations

import json
import os
import threading
from functools import lru_cache

from agentledger.schemas import CallStatus

__all__ = ["agent_fragment", "call_event_json", "event_id"]

_MAX_TOKENS = 100_000_000
_STATUS = {status: status.value for status in CallStatus}


def _opt(value: str | None) -> str:
    # Identifiers are checked against ^[A-Za-z0-9._:/@+\-]+$, which JSON never escapes.
    return "null" if value is None else f'"{value}"'


def agent_fragment(
    agent_id: str, pool: str | None, workflow: str | None, parent: str | None, depth: int
) -> str:
    """The part of every event that only depends on the agent (agent_id ... spawn_depth)."""
    return (
        f'"agent_id":"{agent_id}","pool":{_opt(pool)},"workflow_id":{_opt(workflow)},'
        f'"parent_agent_id":{_opt(parent)},"spawn_depth":{depth},'
    )


@lru_cache(maxsize=256)
def _text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def call_event_json(
    event_id: str,
    event_time_ms: int,
    agent_part: str,
    task_type: str | None,
    task_id: str | None,
    provider: str,
    requested_model: str,
    used_model: str,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int,
    reasoning_tokens: int,
    cost_nano_usd: int,
    priced: bool,
    pricing_version: str | None,
    latency_ms: int,
    status: CallStatus,
    attempt: int,
    error_type: str | None,
) -> bytes | None:
    """The event's JSON, or None when a value needs the validating path.

    ``agent_part`` comes from ``agent_fragment``, and the caller has checked the identifier
    arguments (provider, models, task type and id) against ``Identifier``."""
    # Inline rather than a helper per field: this runs on every call.
    if not (
        type(event_time_ms) is int
        and 0 <= event_time_ms < 1 << 48
        and type(input_tokens) is int
        and type(output_tokens) is int
        and type(cached_input_tokens) is int
        and type(reasoning_tokens) is int
        and 0 <= cached_input_tokens <= input_tokens <= _MAX_TOKENS
        and 0 <= reasoning_tokens <= output_tokens <= _MAX_TOKENS
        and type(cost_nano_usd) is int
        and cost_nano_usd >= 0
        and type(latency_ms) is int
        and latency_ms >= 0
        and type(attempt) is int
        and 1 <= attempt <= 10_000
        and type(priced) is bool
    ):
        return None
    status_text = _STATUS.get(status)
    if status_text is None:
        return None
    if error_type is None:
        error_text = "null"
    elif type(error_type) is str and len(error_type) <= 200 and error_type.isascii():
        error_text = _text(error_type)
    else:
        return None
    if pricing_version is None:
        version_text = "null"
    elif type(pricing_version) is str and len(pricing_version) <= 100 and pricing_version.isascii():
        version_text = _text(pricing_version)
    else:
        return None
    return (
        f'{{"schema_version":1,"event_id":"{event_id}","event_time_ms":{event_time_ms},'
        f'{agent_part}"task_type":{_opt(task_type)},"task_id":{_opt(task_id)},'
        f'"provider":"{provider}","requested_model":"{requested_model}",'
        f'"used_model":"{used_model}","input_tokens":{input_tokens},'
        f'"output_tokens":{output_tokens},"cached_input_tokens":{cached_input_tokens},'
        f'"reasoning_tokens":{reasoning_tokens},"cost_nano_usd":{cost_nano_usd},'
        f'"priced":{"true" if priced else "false"},"pricing_version":{version_text},'
        f'"latency_ms":{latency_ms},"status":"{status_text}","attempt":{attempt},'
        f'"error_type":{error_text}}}'
    ).encode()


class _RandomHex:
    """Random hex digits from ``os.urandom`` in batches: one system call per 256 event ids."""

    IDS = 256
    PER_ID = 19  # 3 (rand_a) + 1 (variant and 2 random bits) + 15 (rand_b) hex digits

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.digits = ""
        self.at = 0

    def take(self) -> str:
        with self.lock:
            at = self.at
            if at >= len(self.digits):
                self.digits = os.urandom((self.IDS * self.PER_ID + 1) // 2).hex()
                at = 0
            self.at = at + self.PER_ID
            return self.digits[at : at + self.PER_ID]


_RANDOM = _RandomHex()
# A forked child must not hand out the ids its parent's leftover digits would make.
os.register_at_fork(after_in_child=_RANDOM.reset)
# RFC 9562 variant: the two top bits of this digit are 10; the low two stay random.
_VARIANT = {f"{n:x}": f"{8 | (n & 3):x}" for n in range(16)}


def event_id(unix_ms: int) -> str:
    """A RFC 9562 version 7 UUID for ``unix_ms`` (0 <= unix_ms < 2**48), as hyphenated text:
    the same layout as ``agentledger.schemas.uuid7`` (48 bits of time, version 7, 74 random
    bits)."""
    r = _RANDOM.take()
    t = f"{unix_ms:012x}"
    return f"{t[:8]}-{t[8:]}-7{r[:3]}-{_VARIANT[r[3]]}{r[4:7]}-{r[7:]}"
