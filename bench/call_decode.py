"""CPU per calls record: pydantic's CallEvent against the msgspec CallRecord, on trace events.

The records are the bench events of `bench.processor_bench` (the Azure LLM inference traces in
AGENTLEDGER_TRACES, as the shim serialises them). Each decoder reads all of them, several
rounds; the best round's CPU time (`time.process_time`) per record is reported.

    AGENTLEDGER_TRACES=../shared/data .venv/bin/python -m bench.call_decode --events 50000
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from agentledger.schemas import CallEvent
from agentledger.schemas.call_decode import decode_call, decode_call_fast

from .pipeline import _payloads

__all__ = ["main", "measure"]


def _best_us(decode: Callable[[bytes], object], values: list[bytes], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for value in values:
            decode(value)
        best = min(best, time.process_time() - started)
    return round(best / len(values) * 1e6, 3)


def measure(count: int, rounds: int) -> dict[str, object]:
    values = [value for _key, value in _payloads(count)]
    fast = sum(decode_call_fast(value) is not None for value in values)
    if fast != count:
        raise RuntimeError(f"only {fast} of {count} trace records took the fast path")
    pydantic_us = _best_us(CallEvent.model_validate_json, values, rounds)
    record_us = _best_us(decode_call, values, rounds)
    return {
        "events": count,
        "rounds": rounds,
        "pydantic_us_per_event": pydantic_us,
        "call_record_us_per_event": record_us,
        "speedup": round(pydantic_us / record_us, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(measure(args.events, args.rounds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
