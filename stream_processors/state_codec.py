"""Spend states as the bytes the tables and their changelogs hold.

The JSON is the one :meth:`SpendState.to_json` describes (so changelogs written before,
through faust's json codec, read back unchanged), but encoded by msgspec from tuples and the
state's own dicts: per key and batch, ``to_json`` plus ``json.dumps`` (run by faust on every
changelog write) cost ~10x more than this, and a state holds 128 recent event ids.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import msgspec

from .budgets import SpendState

__all__ = ["decode_state", "encode_state"]

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()


def encode_state(state: SpendState) -> bytes:
    """The state as JSON bytes; :func:`decode_state` reads them back."""
    command = state.last_command
    wire: dict[str, Any] = {
        "applied": {str(p): o for p, o in sorted(state.applied.items())},
        "periods": dict(sorted(state.periods.items())),
        "last_command": command.model_dump(mode="json") if command is not None else None,
        "partition": state.partition,
        # Pairs, oldest first: the order says which ids to forget first.
        "recent": list(state.recent.items()),
        "alerted": state.alerted,
        "failures": dict(state.failures),
        "slots": dict(state.slots),
        "runs": {str(idle): run for idle, run in sorted(state.runs.items())},
        "intervals": state.intervals,
        "agents": dict(state.agents),
        "retry_spend": dict(sorted(state.retry_spend.items())),
    }
    if state.subtrees:
        wire["subtrees"] = state.subtrees
    if state.leases or state.holders:
        wire["leases"] = {key: list(entry) for key, entry in state.leases.items()}
        wire["holders"] = dict(state.holders)
    return _ENCODER.encode(wire)


# Every field of the state must be written: one forgotten (subtrees was) is lost at the first
# restart or rebalance, silently. Checked at import, so a new field cannot be missed.
_ENCODED_FIELDS = frozenset(
    {
        "applied",
        "periods",
        "last_command",
        "partition",
        "recent",
        "alerted",
        "failures",
        "slots",
        "runs",
        "intervals",
        "agents",
        "retry_spend",
        "subtrees",
        "leases",
        "holders",
    }
)
_STATE_FIELDS = frozenset(f.name for f in fields(SpendState))
if _STATE_FIELDS != _ENCODED_FIELDS:
    raise ImportError(
        f"state_codec does not encode SpendState fields {sorted(_STATE_FIELDS - _ENCODED_FIELDS)}"
        f" (or encodes gone ones {sorted(_ENCODED_FIELDS - _STATE_FIELDS)}): update encode_state"
    )


def decode_state(raw: bytes | str | dict[str, Any]) -> SpendState:
    """A state from table bytes (or the dict faust's json codec gave before the tables held
    bytes); raise ValueError naming what is malformed."""
    if isinstance(raw, dict):
        return SpendState.from_json(raw)
    try:
        data = _DECODER.decode(raw)
    except msgspec.DecodeError as exc:
        raise ValueError(f"spend state is not JSON: {exc}") from None
    return SpendState.from_json(data)
