"""The dashboard's pull sources: the processor's live scopes and the call history in ClickHouse.

History goes through QueryClient (the sink's read-only /query for the embedded engine, or a
read-only session on a ClickHouse server), always with bound parameters.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from agentledger.config import Settings
from agentledger.deploy.stack import worker_ports
from agentledger.review.query import QueryClient, QueryError

__all__ = ["History", "fetch_history", "fetch_scopes", "processor_ports"]

SERIES_MINUTES = 60
TOP_AGENTS = 10
AUDIT_ROWS = 10

# Spend per minute over the last hour, from the minute rollup.
_SERIES_SQL = """
SELECT toInt64(toUnixTimestamp(bucket)) * 1000 AS t, toString(sum(cost_nano_usd)) AS cost
FROM calls_by_minute
WHERE bucket >= toDateTime(intDiv({since_ms:Int64}, 1000), 'UTC')
GROUP BY bucket
ORDER BY bucket
"""

# Top agents of the current UTC day, from the hour rollup.
_TOP_AGENTS_SQL = """
SELECT agent_id, toString(sum(cost_nano_usd)) AS cost, toUInt64(sum(calls)) AS n
FROM calls_by_hour
WHERE bucket >= toDateTime(intDiv({day_start_ms:Int64}, 1000), 'UTC')
GROUP BY agent_id
ORDER BY sum(cost_nano_usd) DESC, agent_id
LIMIT {limit:UInt32}
"""

# The operator commands the sink audited, newest first.
_AUDIT_SQL = """
SELECT toInt64(toUnixTimestamp64Milli(issued_at)) AS t, scope, action, params, reason, issuer,
       verified
FROM control_commands
WHERE startsWith(issuer, 'operator')
ORDER BY issued_at DESC
LIMIT {limit:UInt32}
"""


def processor_ports(settings: Settings) -> list[int]:
    """The web port of every processor worker: the settings' count when given explicitly,
    else the shape `agentledger up` recorded in <home>/run/stack.json, else one."""
    count = settings.processors
    if "processors" not in settings.model_fields_set:
        try:
            recorded = json.loads((settings.home / "run" / "stack.json").read_text())
        except (FileNotFoundError, ValueError):
            recorded = {}
        if isinstance(recorded, dict) and isinstance(recorded.get("processors"), int):
            count = recorded["processors"]
    return worker_ports(settings.processor_port, max(1, count))


def _fetch_one(port: int, token: str, timeout_s: float) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/scopes")
    request.add_header("Authorization", f"Bearer {token}")
    try:
        # Fixed http scheme and loopback host.
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            body: Any = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(
            f"processor at 127.0.0.1:{port} answered {exc.code} for /scopes"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RuntimeError(f"processor not reachable at 127.0.0.1:{port} ({reason})") from None
    except json.JSONDecodeError:
        raise RuntimeError(f"processor at 127.0.0.1:{port} answered non-JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("scopes"), list):
        raise RuntimeError(f"processor at 127.0.0.1:{port} answered without a 'scopes' list")
    return body


def fetch_scopes(settings: Settings, timeout_s: float = 2.0) -> dict[str, Any]:
    """Every processor worker's ``GET /scopes``, merged (each worker holds its own partitions'
    scopes). Workers that failed are listed under ``errors``; RuntimeError if all failed."""
    token = settings.api_token_value()
    scopes: dict[str, Any] = {}
    errors: list[str] = []
    for port in processor_ports(settings):
        try:
            body = _fetch_one(port, token, timeout_s)
        except RuntimeError as exc:
            errors.append(str(exc))
            continue
        for report in body["scopes"]:
            if isinstance(report, dict):
                scopes.setdefault(str(report.get("scope")), report)
    if errors and not scopes and len(errors) == len(processor_ports(settings)):
        raise RuntimeError("; ".join(errors))
    return {"scopes": [scopes[k] for k in sorted(scopes)], "errors": errors}


@dataclass(frozen=True)
class History:
    series: list[tuple[int, int]] = field(default_factory=list)  # (minute ms, nano-USD)
    top_agents: list[tuple[str, int, int]] = field(default_factory=list)  # (id, nano, calls)
    audit: list[dict[str, Any]] = field(default_factory=list)


def fetch_history(client: QueryClient, now_ms: int) -> History:
    """Spend per minute over the last hour, today's top agents, recent operator commands.
    Raises QueryError (the sink is down, a query failed)."""
    since = (now_ms // 60_000 - SERIES_MINUTES + 1) * 60_000
    day_start = now_ms // 86_400_000 * 86_400_000
    series = client.query(_SERIES_SQL, {"since_ms": since})
    top = client.query(_TOP_AGENTS_SQL, {"day_start_ms": day_start, "limit": TOP_AGENTS})
    audit = client.query(_AUDIT_SQL, {"limit": AUDIT_ROWS})
    try:
        return History(
            series=[(int(t), int(c)) for t, c in series.rows],
            top_agents=[(str(a), int(c), int(n)) for a, c, n in top.rows],
            audit=[
                {
                    "issued_at_ms": int(t),
                    "scope": scope,
                    "action": action,
                    "params": json.loads(params) if params else {},
                    "reason": reason,
                    "issuer": issuer,
                    "verified": bool(verified),
                }
                for t, scope, action, params, reason, issuer, verified in audit.rows
            ],
        )
    except (TypeError, ValueError) as exc:
        raise QueryError(f"history query answered an unexpected shape: {exc}") from exc
