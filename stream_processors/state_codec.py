"""Spend states as the bytes the tables and their changelogs hold, and as JSON.

The JSON is the one :func:`state_to_json` describes (so changelogs written before,
through faust's json codec, read back unchanged), but encoded by msgspec from tuples and the
state's own dicts: per key and batch, ``state_to_json`` plus ``json.dumps`` (run by faust on every
changelog write) cost ~10x more than this, and a state holds 128 recent event ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import msgspec
from pydantic import ValidationError

from agentledger.schemas import ControlCommand

from .periods import parse_period_key
from .state import SpendState

__all__ = ["decode_state", "encode_state", "state_from_json", "state_to_json"]

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
        return state_from_json(raw)
    try:
        data = _DECODER.decode(raw)
    except msgspec.DecodeError as exc:
        raise ValueError(f"spend state is not JSON: {exc}") from None
    return state_from_json(data)


def state_to_json(state: SpendState) -> dict[str, Any]:
    """The state as the JSON document its table value holds (:func:`encode_state` writes the
    same document, faster)."""
    return {
        "applied": {str(p): o for p, o in sorted(state.applied.items())},
        "periods": dict(sorted(state.periods.items())),
        "last_command": (
            state.last_command.model_dump(mode="json") if state.last_command else None
        ),
        "partition": state.partition,
        # A list, not an object: the order says which ids to forget first.
        "recent": [[event_id, offset] for event_id, offset in state.recent.items()],
        "alerted": list(state.alerted),
        "failures": {task: list(times) for task, times in state.failures.items()},
        "slots": dict(state.slots),
        "runs": {str(idle): list(run) for idle, run in sorted(state.runs.items())},
        "intervals": [list(pair) for pair in state.intervals],
        "agents": {a: [p, d, t] for a, (p, d, t) in state.agents.items()},
        "retry_spend": dict(sorted(state.retry_spend.items())),
        **({"subtrees": list(state.subtrees)} if state.subtrees else {}),
        **_leases_to_json(state.leases, state.holders),
    }


def state_from_json(data: Any) -> SpendState:
    """Rebuild a state from :func:`state_to_json`; raise ValueError naming a malformed field."""
    if not isinstance(data, dict):
        raise ValueError(f"spend state must be a JSON object, got {type(data).__name__}")
    applied_raw = data.get("applied", {})
    periods_raw = data.get("periods", {})
    if not isinstance(applied_raw, dict):
        raise ValueError("spend state field 'applied' must map partition to offset")
    if not isinstance(periods_raw, dict):
        raise ValueError("spend state field 'periods' must map period key to nano-USD")
    try:
        applied = {int(p): _int(o, f"applied.{p}") for p, o in applied_raw.items()}
    except ValueError as exc:
        raise ValueError(f"spend state field 'applied': {exc}") from None
    periods: dict[str, int] = {}
    for key, nano in periods_raw.items():
        parse_period_key(key)
        periods[key] = _int(nano, f"periods.{key}")
    raw_command = data.get("last_command")
    try:
        command = ControlCommand.model_validate(raw_command) if raw_command else None
    except ValidationError as exc:
        raise ValueError(f"spend state field 'last_command': {exc}") from None
    partition = data.get("partition")
    if partition is not None:
        partition = _int(partition, "partition")
    recent_raw = data.get("recent", [])
    if not isinstance(recent_raw, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
        for pair in recent_raw
    ):
        raise ValueError("spend state field 'recent' must be a list of [event_id, offset]")
    recent = {pair[0]: _int(pair[1], f"recent.{pair[0]}") for pair in recent_raw}
    alerted = data.get("alerted", [])
    if not isinstance(alerted, list) or not all(isinstance(k, str) for k in alerted):
        raise ValueError("spend state field 'alerted' must be a list of strings")
    failures_raw = data.get("failures", {})
    if not isinstance(failures_raw, dict) or not all(
        isinstance(times, list) for times in failures_raw.values()
    ):
        raise ValueError("spend state field 'failures' must map task id to a list of times")
    failures = {
        str(task): tuple(_int(t, f"failures.{task}") for t in times)
        for task, times in failures_raw.items()
    }
    return SpendState(
        failures=failures,
        applied=applied,
        periods=periods,
        last_command=command,
        partition=partition,
        recent=recent,
        alerted=tuple(alerted),
        **_tracked_from_json(data),
        **_leases_from_json(data),
    )


def _leases_to_json(
    leases: Mapping[str, tuple[int, int | None, Mapping[str, tuple[int, int, int]]]],
    holders: Mapping[str, tuple[int, int, int]],
) -> dict[str, Any]:
    if not leases and not holders:
        return {}
    return {
        "leases": {
            key: [start, end, {h: list(v) for h, v in held.items()}]
            for key, (start, end, held) in leases.items()
        },
        "holders": {h: list(v) for h, v in holders.items()},
    }


def _leases_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    leases_raw = data.get("leases", {})
    holders_raw = data.get("holders", {})
    if not isinstance(leases_raw, dict) or not isinstance(holders_raw, dict):
        raise ValueError("spend state fields 'leases' and 'holders' must be JSON objects")
    leases: dict[str, tuple[int, int | None, dict[str, tuple[int, int, int]]]] = {}
    for key, entry in leases_raw.items():
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], dict)):
            raise ValueError(f"spend state field 'leases.{key}' must be [start, end, holders]")
        start = _int(entry[0], f"leases.{key}.start")
        end = None if entry[1] is None else _int(entry[1], f"leases.{key}.end")
        held = {}
        for holder, numbers in entry[2].items():
            if not (isinstance(numbers, list) and len(numbers) == 3):
                raise ValueError(
                    f"spend state field 'leases.{key}.{holder}' must be "
                    "[granted, confirmed, expires_ms]"
                )
            g, c, e = (_int(n, f"leases.{key}.{holder}") for n in numbers)
            held[str(holder)] = (g, c, e)
        leases[str(key)] = (start, end, held)
    holders = {}
    for holder, numbers in holders_raw.items():
        if not (isinstance(numbers, list) and len(numbers) == 3):
            raise ValueError(
                f"spend state field 'holders.{holder}' must be [seq, at_ms, partition]"
            )
        seq, at, partition = (_int(n, f"holders.{holder}") for n in numbers)
        holders[str(holder)] = (seq, at, partition)
    return {"leases": leases, "holders": holders}


def _tracked_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    slots_raw = data.get("slots", {})
    if not isinstance(slots_raw, dict):
        raise ValueError("spend state field 'slots' must map '<slot_ms>:<start_ms>' to nano-USD")
    slots = {str(k): _int(v, f"slots.{k}") for k, v in slots_raw.items()}
    runs_raw = data.get("runs", {})
    if not isinstance(runs_raw, dict) or not all(
        isinstance(r, list) and len(r) == 3 for r in runs_raw.values()
    ):
        raise ValueError("spend state field 'runs' must map idle ms to [start, last, nano-USD]")
    runs = {
        int(idle): (
            _int(r[0], f"runs.{idle}"),
            _int(r[1], f"runs.{idle}"),
            _int(r[2], f"runs.{idle}"),
        )
        for idle, r in runs_raw.items()
    }
    intervals_raw = data.get("intervals", [])
    if not isinstance(intervals_raw, list) or not all(
        isinstance(pair, list) and len(pair) == 2 for pair in intervals_raw
    ):
        raise ValueError("spend state field 'intervals' must be a list of [start_ms, end_ms]")
    intervals = tuple(
        (_int(a, "intervals.start"), _int(b, "intervals.end")) for a, b in intervals_raw
    )
    agents_raw = data.get("agents", {})
    if not isinstance(agents_raw, dict) or not all(
        isinstance(v, list) and len(v) == 3 and (v[0] is None or isinstance(v[0], str))
        for v in agents_raw.values()
    ):
        raise ValueError("spend state field 'agents' must map agent to [parent, depth, first]")
    agents = {
        str(a): (v[0], _int(v[1], f"agents.{a}"), _int(v[2], f"agents.{a}"))
        for a, v in agents_raw.items()
    }
    retry_raw = data.get("retry_spend", {})
    if not isinstance(retry_raw, dict):
        raise ValueError("spend state field 'retry_spend' must map period key to nano-USD")
    retry_spend = {}
    for key, nano in retry_raw.items():
        parse_period_key(key)
        retry_spend[key] = _int(nano, f"retry_spend.{key}")
    subtrees = data.get("subtrees", [])
    if not isinstance(subtrees, list) or not all(isinstance(s, str) for s in subtrees):
        raise ValueError("spend state field 'subtrees' must be a list of subtree scopes")
    return {
        "slots": slots,
        "runs": runs,
        "intervals": intervals,
        "agents": agents,
        "retry_spend": retry_spend,
        "subtrees": tuple(subtrees),
    }


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value
