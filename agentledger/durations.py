"""Parse the CLI's durations ("24h", "7d", "90m") into milliseconds."""

from __future__ import annotations

import re

__all__ = ["parse_duration_ms"]

_UNITS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}


def parse_duration_ms(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if match is None:
        raise ValueError(
            f"duration {text!r} is not understood: use a number and a unit, "
            "one of s, m, h, d, w (for example 24h or 7d)"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]
