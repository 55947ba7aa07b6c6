"""CallEvent decoded by msgspec, checked to the same rules as the pydantic model.

pydantic's ``CallEvent.model_validate_json`` costs several times what a msgspec Struct decode
does (bench/call_decode.py measures both on the traces). :class:`CallRecord` has CallEvent's
fields, types and constraints; the checks msgspec cannot express (the identifier pattern, the
token subsets) run after the decode. The pydantic model stays the authority: a record the
fast path does not accept *for certain* (a missing event_id, a number sent as a string, a
constraint failure, anything unusual) is decoded by pydantic, which either raises the same
``ValidationError`` as before (so a dead letter's reason does not change) or gives the event,
whose fields become the record. The fast path may only be stricter than pydantic, never
looser, and both give the same field values: tests/unit/test_call_decode.py fuzzes documents
through both and compares verdicts, values and reasons.

msgspec is not a dependency of the shim, so this module is imported by name
(``agentledger.schemas.call_decode``), not from the package.
"""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from .events import CALL_EVENT_VERSION, CallEvent, CallFields, CallStatus

__all__ = ["CallRecord", "decode_call", "decode_call_fast", "record_of"]

_TokenCount = Annotated[int, msgspec.Meta(ge=0, le=100_000_000)]
_NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class CallRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """CallEvent's fields in CallEvent's order, with its types, bounds and defaults.
    Identifiers are plain str here: their pattern is checked after decoding, each distinct
    value once (see _valid). Only scalars, so no reference cycles: gc=False."""

    schema_version: Literal[1] = CALL_EVENT_VERSION
    event_id: uuid.UUID
    event_time_ms: Annotated[int, msgspec.Meta(ge=0, lt=1 << 48)]
    agent_id: str
    pool: str | None = None
    workflow_id: str | None = None
    parent_agent_id: str | None = None
    spawn_depth: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    task_type: str | None = None
    task_id: str | None = None
    provider: str
    requested_model: str
    used_model: str
    input_tokens: _TokenCount = 0
    output_tokens: _TokenCount = 0
    cached_input_tokens: _TokenCount = 0
    reasoning_tokens: _TokenCount = 0
    cost_nano_usd: _NonNegative
    priced: bool = True
    pricing_version: Annotated[str, msgspec.Meta(max_length=100)] | None = None
    latency_ms: _NonNegative
    status: CallStatus = CallStatus.OK
    attempt: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1
    error_type: Annotated[str, msgspec.Meta(max_length=200)] | None = None

    def scopes(self) -> tuple[str, ...]:
        """Every budget scope this call counts toward (as :meth:`CallEvent.scopes`)."""
        found = [f"agent:{self.agent_id}"]
        if self.pool:
            found.append(f"pool:{self.pool}")
        if self.workflow_id:
            found.append(f"workflow:{self.workflow_id}")
        if self.task_type:
            found.append(f"task_type:{self.task_type}")
        return tuple(found)


# The two field lists are checked against each other at import, so they cannot drift apart.
if CallRecord.__struct_fields__ != tuple(CallEvent.model_fields):
    raise RuntimeError(
        f"CallRecord fields {CallRecord.__struct_fields__} do not match CallEvent's "
        f"{tuple(CallEvent.model_fields)}"
    )

if TYPE_CHECKING:
    # mypy proves both types give the processor's core what it reads.
    _RECORD_FIELDS: type[CallFields] = CallRecord
    _EVENT_FIELDS: type[CallFields] = CallEvent

_DECODER = msgspec.json.Decoder(CallRecord)
# CallEvent's Identifier is 1-200 of these characters. The same few agent ids, models, pools
# and task types come with nearly every event, so a value checked once is remembered (up to
# _KNOWN_MAX of them): nine set lookups cost less than one regex over the joined fields.
# (fullmatch, not msgspec's Meta(pattern=...): Python's "$" also matches before a final
# "\n", pydantic's does not; fullmatch has no "$". A Meta pattern per field measured slower.)
_IDENTIFIER = re.compile(r"[A-Za-z0-9._:/@+\-]{1,200}")
_KNOWN_MAX = 50_000
_known: set[str] = set()


def _valid(value: str | None) -> bool:
    if value is None or value in _known:
        return True
    if _IDENTIFIER.fullmatch(value) is None:
        return False
    if len(_known) >= _KNOWN_MAX:
        _known.clear()
    _known.add(value)
    return True


def decode_call_fast(value: bytes) -> CallRecord | None:
    """The record when msgspec and the checks accept it for certain, else None (let pydantic
    decide and explain)."""
    try:
        r = _DECODER.decode(value)
    except msgspec.DecodeError:
        # ValidationError is a DecodeError: both mean "not certain".
        return None
    if r.cached_input_tokens > r.input_tokens or r.reasoning_tokens > r.output_tokens:
        return None
    known = _known
    for field in (
        r.agent_id,
        r.provider,
        r.requested_model,
        r.used_model,
        r.pool,
        r.workflow_id,
        r.parent_agent_id,
        r.task_type,
        r.task_id,
    ):
        if field is not None and field not in known and not _valid(field):
            return None
    return r


def record_of(event: CallEvent) -> CallRecord:
    """The record with the event's field values."""
    return CallRecord(**dict(event))


def decode_call(value: bytes) -> CallRecord:
    """The CallEvent in ``value`` as a record; pydantic's ``ValidationError`` (exactly what
    ``CallEvent.model_validate_json`` raises) when it is not one."""
    record = decode_call_fast(value)
    if record is not None:
        return record
    return record_of(CallEvent.model_validate_json(value))
