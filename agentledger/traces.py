"""Real LLM call sizes from the Azure LLM inference traces (CC-BY 4.0, Patel et al., ISCA 2024).

The traces live in the repository's sibling folder ../shared/data (or AGENTLEDGER_TRACES); each row
is one real call's arrival time and prompt/completion token counts.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

__all__ = ["TraceCall", "find_trace_dir", "load_trace"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class TraceCall:
    arrival_ms: int
    input_tokens: int
    output_tokens: int


def find_trace_dir() -> Path:
    configured = os.environ.get("AGENTLEDGER_TRACES")
    candidates = [Path(configured)] if configured else []
    repo = Path(__file__).resolve().parent.parent
    candidates += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if (candidate / "azure_llm_trace_2023_conv.csv").exists():
            return candidate
    raise FileNotFoundError(
        "the Azure LLM traces were not found (looked in: "
        + ", ".join(str(c) for c in candidates)
        + "); set AGENTLEDGER_TRACES to the folder holding azure_llm_trace_2023_conv.csv"
    )


def load_trace(
    name: str = "conv", limit: int | None = None, trace_dir: Path | None = None
) -> list[TraceCall]:
    """Load ``azure_llm_trace_2023_<name>.csv`` (name: conv or code)."""
    path = (trace_dir or find_trace_dir()) / f"azure_llm_trace_2023_{name}.csv"
    calls: list[TraceCall] = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            # Timestamps carry 7 fractional digits; milliseconds are all we keep.
            stamp = datetime.strptime(row["TIMESTAMP"][:23], "%Y-%m-%d %H:%M:%S.%f").replace(
                tzinfo=UTC
            )
            arrival_ms = (stamp - _EPOCH) // timedelta(milliseconds=1)
            calls.append(
                TraceCall(arrival_ms, int(row["ContextTokens"]), int(row["GeneratedTokens"]))
            )
            if limit is not None and len(calls) >= limit:
                break
    return calls
