"""Query results as plain JSON values, the same whether they came over HTTP or directly."""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

__all__ = ["JsonValue", "QueryResult", "to_json_value"]

JsonValue = Any


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[list[JsonValue]]
    types: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"columns": self.columns, "types": self.types, "rows": self.rows}


def to_json_value(value: object) -> JsonValue:
    """Decimals, UUIDs, dates and IPs become strings (exact; JSON numbers would round money),
    integers stay integers, NaN/inf become strings because JSON has no spelling for them."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal | uuid.UUID | ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping):
        return {str(to_json_value(k)): to_json_value(v) for k, v in value.items()}
    if isinstance(value, Sequence | set | frozenset):
        return [to_json_value(v) for v in value]
    return str(value)
