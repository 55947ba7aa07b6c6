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
from agentledger.sinks.query import QueryClient, QueryError

__all__ = ["History", "fetch_history", "fetch_scopes"]

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


def fetch_scopes(settings: Settings, timeout_s: float = 2.0) -> dict[str, Any]:
    """The processor's ``GET /scopes``; raise RuntimeError saying what went wrong."""
    request = urllib.request.Request(f"http://127.0.0.1:{settings.processor_port}/scopes")
    request.add_header("Authorization", f"Bearer {settings.api_token_value()}")
    try:
        # Fixed http scheme and loopback host.
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            body: Any = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"processor answered {exc.code} for /scopes") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RuntimeError(
            f"processor not reachable at 127.0.0.1:{settings.processor_port} ({reason})"
        ) from None
    except json.JSONDecodeError:
        raise RuntimeError("processor answered non-JSON for /scopes") from None
    if not isinstance(body, dict) or not isinstance(body.get("scopes"), list):
        raise RuntimeError("processor answered /scopes without a 'scopes' list")
    return body


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
