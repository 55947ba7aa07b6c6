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

The record's event_id is the UUID's canonical text (lower-case, hyphenated, exactly the texts
with ``str(UUID(t)) == t``): msgspec building a UUID object, and the processor turning it back
into hex, cost more than the decode of every other field (bench.processor_core). Any other
spelling pydantic takes (upper case, no hyphens, ``urn:uuid:``) goes to pydantic, whose UUID
becomes the canonical text, so a record's id has one spelling.

:func:`decode_calls` checks many records at once (what the processor and the sink call): the
same verdicts as :func:`decode_call_fast` record by record, at a fraction of its cost outside
msgspec.

msgspec is not a dependency of the shim, so this module is imported by name
(``agentledger.schemas.call_decode``), not from the package.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar, cast

import msgspec

from .events import CALL_EVENT_VERSION, CallEvent, CallFields, CallStatus

__all__ = [
    "CallRecord",
    "decode_call",
    "decode_call_fast",
    "decode_calls",
    "decode_calls_with",
    "record_of",
]

_TokenCount = Annotated[int, msgspec.Meta(ge=0, le=100_000_000)]
_NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class CallRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """CallEvent's fields in CallEvent's order, with its types, bounds and defaults.
    Identifiers are plain str here: their pattern is checked after decoding, each distinct
    value once (see _valid). event_id is the canonical text of the UUID (checked after
    decoding). Only scalars, so no reference cycles: gc=False."""

    schema_version: Literal[1] = CALL_EVENT_VERSION
    event_id: str
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
_CANONICAL_ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_ONE_CANONICAL_ID = re.compile(_CANONICAL_ID)


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
    if _ONE_CANONICAL_ID.fullmatch(r.event_id) is None:
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
    """The record with the event's field values (its id as canonical text)."""
    return CallRecord(**{**dict(event), "event_id": str(event.event_id)})


def decode_call(value: bytes) -> CallRecord:
    """The CallEvent in ``value`` as a record; pydantic's ``ValidationError`` (exactly what
    ``CallEvent.model_validate_json`` raises) when it is not one."""
    record = decode_call_fast(value)
    if record is not None:
        return record
    return record_of(CallEvent.model_validate_json(value))


# -- the same check, many records at a time -------------------------------------------------
# Per record, decode_call_fast spends a third of its time outside msgspec: the id's regex and
# nine identifier lookups. Over a batch:
# - the batch's ids, newline-joined, match one regex (the length rules out an id with a
#   newline inside: two ids in one would match);
# - the identifiers of all records, newline-joined, are checked at once: every character is one
#   of an identifier's (or the separator), there are exactly 9 fields per record, none is
#   empty, and none is longer than 200 (certain when a record's 9 fields take <= 208
#   characters);
# and only when a batch check fails does each record get it alone. A record any check does not
# accept for certain is None, for the caller's per-record path (decode_call, pydantic's
# reason), so the verdicts are decode_call_fast's record by record (tests compare).
_CANONICAL_IDS = re.compile(rf"(?:{_CANONICAL_ID}\n)*{_CANONICAL_ID}")
_IDENTIFIER_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/@+-\n"
_IDENTIFIER_FIELDS = 9
# 9 fields of at least 1 character and 8 separators: within this length no field exceeds 200.
_SHORT_IDENTIFIERS = 208

Record = TypeVar("Record", bound=CallRecord)


def _identifiers(r: CallRecord) -> str:
    return (
        f"{r.agent_id}\n{r.provider}\n{r.requested_model}\n{r.used_model}\n{r.pool}\n"
        f"{r.workflow_id}\n{r.parent_agent_id}\n{r.task_type}\n{r.task_id}"
    )


def _identifiers_ok(texts: list[str]) -> bool:
    """Every text holds 9 valid identifiers (what the per-record regex checks), for certain."""
    joined = "\n".join(texts)
    try:
        leftover = joined.encode("ascii").translate(None, _IDENTIFIER_BYTES)
    except UnicodeEncodeError:
        return False
    return (
        not leftover
        and joined.count("\n") == _IDENTIFIER_FIELDS * len(texts) - 1
        and "\n\n" not in joined
        and joined[:1] != "\n"
        and joined[-1:] != "\n"
        and max(map(len, texts)) <= _SHORT_IDENTIFIERS
    )


def _rejected(records: list[Record | None]) -> set[int]:
    """Indices of the records the batch checks do not accept for certain."""
    bad = {i for i, r in enumerate(records) if r is None}
    index: Sequence[int] = range(len(records))
    if bad:
        index = [i for i, r in enumerate(records) if r is not None]
    live = [r for r in records if r is not None] if bad else cast(list[Record], records)
    bad.update(
        index[j]
        for j, r in enumerate(live)
        if r.cached_input_tokens > r.input_tokens or r.reasoning_tokens > r.output_tokens
    )
    ids = "\n".join([r.event_id for r in live])
    if live and (len(ids) != 37 * len(live) - 1 or _CANONICAL_IDS.fullmatch(ids) is None):
        bad.update(
            index[j] for j, r in enumerate(live) if _ONE_CANONICAL_ID.fullmatch(r.event_id) is None
        )
    texts = [_identifiers(r) for r in live]
    if texts and not _identifiers_ok(texts):
        bad.update(index[j] for j, text in enumerate(texts) if not _identifiers_ok([text]))
    return bad


def _decode_or_none(decode: Callable[[bytes], Record], value: bytes) -> Record | None:
    try:
        return decode(value)
    except msgspec.DecodeError:  # ValidationError included
        return None


def decode_calls(values: Sequence[bytes | None]) -> list[CallRecord | None]:
    """:func:`decode_call_fast` of each value (None: let :func:`decode_call` decide and
    explain), checked a batch at a time."""
    records = decode_calls_with(_DECODER.decode, values)
    for i, record in enumerate(records):
        value = values[i]
        if record is None and value:
            # What the batch checks could not settle (a long identifier, say), one by one.
            records[i] = decode_call_fast(value)
    return records


def decode_calls_with(
    decode: Callable[[bytes], Record], values: Sequence[bytes | None]
) -> list[Record | None]:
    """Each value decoded by ``decode`` (a msgspec decoder of CallRecord or of a subclass with
    narrower bounds: the sink's columns) when the batch checks accept it for certain, else
    None: stricter than :func:`decode_call_fast`, never looser."""
    texts = [v or b"" for v in values]
    try:
        records: list[Record | None] = list(map(decode, texts))
    except msgspec.DecodeError:
        records = [_decode_or_none(decode, v) for v in texts]
    for i in _rejected(records):
        records[i] = None
    return records
