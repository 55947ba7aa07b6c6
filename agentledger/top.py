"""`agentledger top`: the dashboard's view, live in the terminal (rich), sortable."""

from __future__ import annotations

import argparse
import logging
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from agentledger.config import Settings
from agentledger.schemas import format_usd, usd_to_nano

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.text import Text

# rich is imported where it is used: the CLI builds its parser (and so imports this module) for
# every command, and rich is in the dashboard extra, not the base install.

__all__ = ["add_top_parser", "render_top", "run_top"]

BAR_WIDTH = 20


def _usd(value: str | None) -> str:
    if value is None:
        return "-"
    return format_usd(usd_to_nano(Decimal(value)))


def _pct(hundredths: int | None) -> str:
    return "-" if hundredths is None else f"{hundredths // 100}.{hundredths % 100:02d}%"


def _utc(ms: int | None) -> str:
    return "-" if ms is None else time.strftime("%m-%d %H:%M", time.gmtime(ms / 1000)) + "Z"


def _bar(row: dict[str, Any]) -> Text:
    """A text bar to 100% of the limit: '|' marks warn thresholds, red past the limit."""
    from rich.text import Text

    used = row["pct_hundredths"]
    if used is None:
        return Text("no budget", style="dim")
    headline = next(p for p in row["periods"] if p["period"] == row["headline"])
    filled = min(BAR_WIDTH, used * BAR_WIDTH // 10_000)
    cells = ["#"] * filled + ["."] * (BAR_WIDTH - filled)
    for threshold in headline["thresholds"]:
        if threshold["action"] == "stop":
            continue
        at = int(Decimal(threshold["at_percent"]) * BAR_WIDTH // 100)
        if 0 < at < BAR_WIDTH:
            cells[at] = "|"
    style = "red" if used >= 10_000 else "yellow" if used >= 8_000 else "green"
    return Text("[" + "".join(cells) + "]", style=style)


def _standing(command: dict[str, Any] | None) -> Text:
    from rich.text import Text

    if command is None:
        return Text("")
    params = " ".join(f"{k}={v}" for k, v in sorted(command["params"].items()))
    label = command["action"].upper() + (f" {params}" if params else "")
    style = "bold red" if command["action"] == "stop" else "bold yellow"
    return Text.assemble((label, style), f" {command['issuer']}: {command['reason']}"[:80])


def render_top(snapshot: dict[str, Any], sort: str, *, live: bool = False) -> RenderableType:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from agentledger.dashboard.view import sort_scopes

    scopes = Table(title="spend against budget", expand=True, title_justify="left")
    for name, justify in [
        ("scope", "left"),
        ("period", "left"),
        ("spend", "right"),
        ("limit", "right"),
        ("used", "right"),
        ("", "left"),
        ("burn/h", "right"),
        ("forecast", "right"),
        ("standing", "left"),
    ]:
        scopes.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in sort_scopes(list(snapshot.get("scopes", [])), sort):
        scopes.add_row(
            row["scope"],
            row["headline"],
            _usd(row["spend_usd"]),
            _usd(row["limit_usd"]),
            _pct(row["pct_hundredths"]),
            _bar(row),
            _usd(row["rate_usd_per_hour"]),
            _usd(row["forecast_usd"])
            + (
                f" ({_pct(row['forecast_pct_hundredths'])})"
                if row["forecast_pct_hundredths"] is not None
                else ""
            ),
            _standing(row["standing"]),
        )
    parts: list[RenderableType] = [scopes]
    orphans = snapshot.get("standing_without_spend", [])
    if orphans:
        idle = Table(title="standing commands on scopes without spend", title_justify="left")
        idle.add_column("scope")
        idle.add_column("command")
        for command in orphans:
            idle.add_row(command["scope"], _standing(command))
        parts.append(idle)
    alerts = Table(title="recent alerts", title_justify="left", expand=True)
    alerts.add_column("when")
    alerts.add_column("kind")
    alerts.add_column("message")
    for alert in snapshot.get("alerts", [])[:5]:
        alerts.add_row(_utc(alert["issued_at_ms"]), alert["kind"], alert["message"][:120])
    parts.append(alerts)
    top = Table(title="top agents today", title_justify="left")
    top.add_column("agent")
    top.add_column("spend", justify="right")
    top.add_column("calls", justify="right")
    for agent in snapshot.get("top_agents", [])[:5]:
        top.add_row(agent["agent_id"], _usd(agent["spend_usd"]), str(agent["calls"]))
    parts.append(top)
    problems = [f"{k}: {v}" for k, v in snapshot.get("health", {}).items() if v]
    footer = f"updated {_utc(snapshot.get('now_ms'))} UTC, sorted by {sort}"
    if live:
        footer += "; Ctrl-C quits"
    parts.append(Text(" | ".join(problems), style="yellow") if problems else Text(""))
    parts.append(Text(footer, style="dim"))
    return Group(*parts)


def run_top(settings: Settings, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from agentledger.dashboard import Collector

    # librdkafka would print every failed reconnect over the live view; a feed's last error
    # is shown in the view's health line instead.
    logging.getLogger("agentledger.dashboard.feeds.librdkafka").setLevel(logging.CRITICAL)
    collector = Collector(settings)
    collector.start()
    try:
        if args.once:
            # One frame, once the topic feeds have read what stood when they started.
            for feed in collector.feeds:
                feed.caught_up.wait(10.0)
            collector.refresh_history()
            Console().print(render_top(collector.refresh(), args.sort))
            return 0
        with Live(console=Console(), refresh_per_second=4, screen=False) as live:
            while True:
                _version, snapshot = collector.snapshot()
                live.update(render_top(snapshot, args.sort, live=True))
                time.sleep(args.interval)
    finally:
        collector.stop()


def add_top_parser(sub: Any) -> None:
    """Register `top` on the CLI's subparsers."""
    from agentledger.dashboard.view import SORT_KEYS

    top = sub.add_parser("top", help="live spend against budget per scope, in the terminal")
    top.add_argument("--sort", choices=SORT_KEYS, default="pct", help="order (default pct)")
    top.add_argument("--interval", type=float, default=0.5, help="seconds between redraws")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(run=run_top)
