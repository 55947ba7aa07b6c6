"""One dashboard snapshot: a JSON-ready dict built from what the sources returned.

Pure: no I/O, the time is passed in. The browser page and `agentledger top` render the same
snapshot. Money is carried as integer nano-USD plus an exact decimal USD string.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agentledger.schemas import Alert, ControlCommand, PauseRecord, nano_to_usd

from .forecast import SpendSamples, forecast
from .sources import History

__all__ = [
    "SORT_KEYS",
    "RateTracker",
    "alert_json",
    "build_snapshot",
    "command_json",
    "pause_json",
    "scope_row",
    "sort_scopes",
]

SORT_KEYS = ("spend", "pct", "rate", "forecast", "scope")


def _usd(nano: int | None) -> str | None:
    return None if nano is None else f"{nano_to_usd(nano):f}"


def _hundredths(spend: int, limit: int | None) -> int | None:
    return None if not limit else spend * 10_000 // limit


class RateTracker:
    """Spend samples per scope, fed by every processor poll."""

    def __init__(self) -> None:
        self._samples: dict[str, SpendSamples] = {}

    def add(self, scope: str, now_ms: int, period_start_ms: int, spend_nano: int) -> None:
        self._samples.setdefault(scope, SpendSamples()).add(now_ms, period_start_ms, spend_nano)

    def rate(self, scope: str) -> int | None:
        samples = self._samples.get(scope)
        return samples.rate_nano_per_hour() if samples is not None else None


def _period(raw: Mapping[str, Any]) -> dict[str, Any]:
    spend = int(raw["spend_nano_usd"])
    limit = raw.get("limit_nano_usd")
    limit = int(limit) if limit is not None else None
    return {
        "period": str(raw["period"]),
        "start_ms": int(raw["start_ms"]),
        "end_ms": int(raw["end_ms"]),
        "spend_nano": spend,
        "spend_usd": _usd(spend),
        "limit_nano": limit,
        "limit_usd": _usd(limit),
        "pct_hundredths": _hundredths(spend, limit),
        "policy": raw.get("policy"),
        "thresholds": [
            {"at_percent": str(t["at_percent"]), "action": str(t["action"])}
            for t in raw.get("thresholds") or []
        ],
    }


def command_json(command: ControlCommand) -> dict[str, Any]:
    return {
        "scope": command.scope,
        "action": command.action.value,
        "params": dict(command.params),
        "reason": command.reason,
        "issuer": command.issuer,
        "issued_at_ms": command.issued_at_ms,
        "until_ms": command.until_ms,
    }


def scope_row(
    report: Mapping[str, Any],
    now_ms: int,
    rates: RateTracker,
    standing: ControlCommand | None,
) -> dict[str, Any]:
    """One scope: its governed periods, the headline (most used) one, rate and forecast.
    Raises KeyError/ValueError/TypeError on a malformed report."""
    scope = str(report["scope"])
    periods = [_period(p) for p in report["periods"]]
    governed = [p for p in periods if p["limit_nano"] is not None]
    shown = governed or [p for p in periods if p["period"] == "day"] or periods[:1]
    headline = max(shown, key=lambda p: (p["pct_hundredths"] or 0, -p["end_ms"]))
    rates.add(scope, now_ms, headline["start_ms"], headline["spend_nano"])
    projection = forecast(
        spend_nano=headline["spend_nano"],
        limit_nano=headline["limit_nano"],
        start_ms=headline["start_ms"],
        end_ms=headline["end_ms"],
        now_ms=now_ms,
        recent_rate_nano_per_hour=rates.rate(scope),
    )
    return {
        "scope": scope,
        "kind": scope.partition(":")[0],
        "periods": shown,
        "headline": headline["period"],
        "spend_nano": headline["spend_nano"],
        "spend_usd": headline["spend_usd"],
        "limit_usd": headline["limit_usd"],
        "pct_hundredths": headline["pct_hundredths"],
        "rate_nano_per_hour": projection.rate_nano_per_hour,
        "rate_usd_per_hour": _usd(projection.rate_nano_per_hour),
        "rate_source": projection.rate_source,
        "forecast_nano": projection.projected_nano,
        "forecast_usd": _usd(projection.projected_nano),
        "forecast_pct_hundredths": _hundredths(projection.projected_nano, headline["limit_nano"]),
        "exhausts_at_ms": projection.exhausts_at_ms,
        "standing": command_json(standing) if standing is not None else None,
    }


def sort_scopes(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Rows ordered by ``key`` (one of SORT_KEYS), largest first; scope name breaks ties."""
    if key not in SORT_KEYS:
        raise ValueError(f"sort key must be one of {', '.join(SORT_KEYS)}, got {key!r}")
    if key == "scope":
        return sorted(rows, key=lambda r: r["scope"])
    field = {
        "spend": "spend_nano",
        "pct": "pct_hundredths",
        "rate": "rate_nano_per_hour",
        "forecast": "forecast_nano",
    }[key]
    by_name = sorted(rows, key=lambda r: r["scope"])
    return sorted(by_name, key=lambda r: r[field] if r[field] is not None else -1, reverse=True)


def alert_json(alert: Alert) -> dict[str, Any]:
    return {
        "scope": alert.scope,
        "kind": alert.kind.value,
        "severity": alert.severity.value,
        "message": alert.message,
        "issued_at_ms": alert.issued_at_ms,
        "action": alert.action,
    }


def pause_json(record: PauseRecord) -> dict[str, Any]:
    return {
        "scope": record.scope,
        "process": record.process,
        "host": record.host,
        "pid": record.pid,
        "agents": list(record.agents),
        "calls": record.calls,
        "reason": record.reason,
        "since_ms": record.since_ms,
        "waits_until_ms": record.waits_until_ms,
        "resets_at_ms": record.resets_at_ms,
        "updated_at_ms": record.updated_at_ms,
    }


def build_snapshot(
    *,
    now_ms: int,
    scopes_body: Mapping[str, Any] | None,
    standing: Mapping[str, ControlCommand],
    alerts: list[Alert],
    paused: Sequence[PauseRecord] = (),
    history: History | None,
    rates: RateTracker,
    health: Mapping[str, str | None],
) -> dict[str, Any]:
    """The whole view. ``health`` maps a source name to its last error (None when fine);
    ``paused`` are the live pause records (calls shims hold waiting on a scope)."""
    paused_calls: dict[str, int] = {}
    for record in paused:
        paused_calls[record.scope] = paused_calls.get(record.scope, 0) + record.calls
    rows: list[dict[str, Any]] = []
    errors = dict(health)
    seen: set[str] = set()
    for report in (scopes_body or {}).get("scopes", []):
        try:
            row = scope_row(report, now_ms, rates, standing.get(str(report["scope"])))
        except (KeyError, TypeError, ValueError) as exc:
            errors["processor"] = f"a scope report was malformed: {exc!r}"[:300]
            continue
        row["paused_calls"] = paused_calls.get(row["scope"], 0)
        rows.append(row)
        seen.add(row["scope"])
    # A command can stand for a scope the processor holds no spend for (an operator STOP on an
    # idle agent, or a glob scope); it is listed anyway.
    orphans = [command_json(c) for s, c in sorted(standing.items()) if s not in seen]
    return {
        "now_ms": now_ms,
        "scopes": sort_scopes(rows, "pct"),
        "standing": [command_json(c) for _, c in sorted(standing.items())],
        "standing_without_spend": orphans,
        "alerts": [alert_json(a) for a in alerts],
        "paused": [pause_json(r) for r in paused],
        "series": [
            {"t": t, "nano": n, "usd": _usd(n)} for t, n in (history.series if history else [])
        ],
        "top_agents": [
            {"agent_id": a, "spend_nano": n, "spend_usd": _usd(n), "calls": c}
            for a, n, c in (history.top_agents if history else [])
        ],
        "operator_audit": history.audit if history else [],
        "health": errors,
    }
