"""`agentledger spend SCOPE [--period P]`: what the processor's live state holds for a scope,
per period: the calendar periods (day, week, month, in the governing policy's timezone), each
rolling window and the current workflow run that a policy governs the scope by."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

from agentledger.config import Settings
from agentledger.schemas.policy import duration_ms
from agentledger.tables import render_table

__all__ = [
    "PERIOD_HELP",
    "PeriodChoice",
    "chosen_report",
    "period_arg",
    "run_spend",
    "spend_lines",
]

PERIOD_HELP = (
    "only this period: day, week, month, run (the workflow's current run), rolling (every "
    "rolling window), or one rolling window such as 24h or rolling:24h"
)
_NAMED = ("day", "week", "month", "run", "rolling")


@dataclass(frozen=True)
class PeriodChoice:
    """A ``--period`` value: a period kind, or one rolling window (``window_ms``)."""

    name: str
    window_ms: int | None = None
    text: str = ""

    def matches(self, period: str) -> bool:
        """Whether the report's ``period`` (``day``, ``run``, ``rolling:24h``...) is chosen."""
        kind, _, window = period.partition(":")
        if kind != self.name:
            return False
        if self.window_ms is None:
            return True
        try:
            return duration_ms(window) == self.window_ms
        except ValueError:
            return False

    def __str__(self) -> str:
        return self.text or self.name


def period_arg(text: str) -> PeriodChoice:
    """Parse ``--period``; argparse reports the ValueError's message."""
    value = text.strip()
    if value in _NAMED:
        return PeriodChoice(value, text=value)
    window = value.removeprefix("rolling:")
    try:
        ms = duration_ms(window)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"period must be day, week, month, run, rolling, or a rolling window such as 24h "
            f"or rolling:24h (a number and one of s, m, h, d), got {text!r}"
        ) from None
    return PeriodChoice("rolling", ms, f"rolling:{window}")


def _utc(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"


def _label(period: dict[str, Any]) -> str:
    zone = period.get("timezone") or "UTC"
    name = str(period["period"])
    return name if zone == "UTC" else f"{name} ({zone})"


def _chosen_periods(report: dict[str, Any], choice: PeriodChoice | None) -> list[dict[str, Any]]:
    """The report's periods that ``choice`` names (all of them for None). Raises ValueError
    when it names a period no policy governs the scope by."""
    held = [p for p in report.get("periods", []) if isinstance(p, dict)]
    periods = [p for p in held if choice is None or choice.matches(str(p.get("period")))]
    if not periods:
        names = ", ".join(str(p.get("period")) for p in held) or "none"
        raise ValueError(
            f"no {choice} budget governs {report.get('scope')} (the processor holds: {names}); "
            "rolling windows and runs show only when a policy of that period governs the scope"
        )
    return periods


def chosen_report(report: dict[str, Any], choice: PeriodChoice | None) -> dict[str, Any]:
    """What ``agentledger spend --json`` prints: the processor's report narrowed to the periods
    ``choice`` names, and to the calendar buckets of that kind (``day:<ms>`` and
    ``day@<zone>:<ms>`` for ``day``; none for a rolling window or a run, which are summed from
    slots the report does not list). The whole report for None. Raises ValueError like
    :func:`spend_lines`."""
    if choice is None:
        return report
    narrowed = dict(report)
    narrowed["periods"] = _chosen_periods(report, choice)
    buckets = report.get("buckets")
    if isinstance(buckets, dict):
        narrowed["buckets"] = {
            key: value
            for key, value in buckets.items()
            if key.partition(":")[0].partition("@")[0] == choice.name
        }
    return narrowed


def spend_lines(report: dict[str, Any], choice: PeriodChoice | None) -> list[str]:
    """The text ``agentledger spend`` prints for a ``GET /state/<scope>`` report. Raises
    ValueError when ``choice`` names a period no policy governs the scope by."""
    scope = report.get("scope")
    periods = _chosen_periods(report, choice)
    lines = [f"{scope} at {_utc(report.get('now_ms'))}"]
    table = render_table(
        ["period", "from", "until", "spend (USD)", "limit (USD)", "% used", "policy"],
        [
            [
                _label(p),
                _utc(p.get("start_ms")),
                _utc(p.get("end_ms")),
                p["spend_usd"],
                p.get("limit_usd") or "-",
                p.get("percent_used") or "-",
                p.get("policy") or "-",
            ]
            for p in periods
        ],
        right_align=[False, False, False, True, True, True, False],
    )
    lines.extend(table.splitlines())
    for p in periods:
        if p["period"] == "run" and p.get("start_ms") is None:
            lines.append("run: no run in progress (the next event starts one at zero)")
    command = report.get("last_command")
    if command and command.get("action") != "resume":
        params = command.get("params") or {}
        extra = f" {json.dumps(params, sort_keys=True)}" if params else ""
        lines.append(
            f"standing: {command['action'].upper()}{extra} until {_utc(command.get('until_ms'))}"
            f": {command.get('reason')}"
        )
    else:
        lines.append("standing: none (calls proceed)")
    for subtree in report.get("stopped_subtrees", []):
        lines.append(f"stopped subtree: {subtree}")
    return lines


def run_spend(settings: Settings, args: argparse.Namespace) -> int:
    from agentledger.stream_processors.client import fetch_state

    report = fetch_state(settings, args.scope)
    if args.json:
        print(json.dumps(chosen_report(report, args.period), indent=2, sort_keys=True))
        return 0
    print("\n".join(spend_lines(report, args.period)))
    return 0
