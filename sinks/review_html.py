"""The review as one self-contained HTML file: inline CSS and SVG plots, no script, no CDN.

Deterministic for a given Review (no clock, no random ids), so its structure is snapshot-tested.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape

from agentledger.schemas import nano_to_usd

from .insights import MIN_CALLS_FOR_REMAP, Review, Spender, SpendPoint

__all__ = ["render_html"]

_WIDTH = 720
_BAR_HEIGHT = 22

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.up { color: #b00020; } .down { color: #1b5e20; }
svg text { font-size: 12px; fill: #333; }
"""


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")


def _usd(nano: int | None) -> str:
    return "-" if nano is None else f"${nano_to_usd(nano):.6f}"


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _change(now: int, before: int | None) -> str:
    if not before:
        return '<span class="up">new</span>' if now else "-"
    change = 100 * (now - before) / before
    css = "up" if change > 0 else "down"
    return f'<span class="{css}">{change:+.0f}%</span>'


def spend_svg(series: list[SpendPoint]) -> str:
    """Spend over time as a bar chart, one bar per bucket."""
    height = 160
    if not series:
        return '<p class="empty">no spend in this period</p>'
    peak = max(p.cost_nano_usd for p in series) or 1
    step = _WIDTH / len(series)
    bars = []
    for i, point in enumerate(series):
        h = round(height * point.cost_nano_usd / peak, 1)
        bars.append(
            f'<rect x="{i * step:.1f}" y="{height - h:.1f}" width="{max(step - 1, 1):.1f}" '
            f'height="{h:.1f}" fill="#3f51b5"><title>{_utc(point.bucket_ms)} '
            f"{_usd(point.cost_nano_usd)}</title></rect>"
        )
    return (
        f'<svg class="spend-over-time" width="{_WIDTH}" '
        f'height="{height + 20}" role="img" aria-label="spend over time">'
        + "".join(bars)
        + f'<text x="0" y="{height + 15}">{_utc(series[0].bucket_ms)}</text>'
        + f'<text x="{_WIDTH}" y="{height + 15}" text-anchor="end">'
        f"{_utc(series[-1].bucket_ms)}</text>"
        f'<text x="0" y="12">peak {_usd(peak)}</text></svg>'
    )


def spender_svg(spenders: list[Spender], previous: dict[str, Spender]) -> str:
    """Horizontal bars per spender; a thin mark shows the previous period's spend."""
    if not spenders:
        return '<p class="empty">no spenders</p>'
    label_w = 180
    plot_w = _WIDTH - label_w - 120
    peak = max(
        [s.cost_nano_usd for s in spenders]
        + [previous[s.key].cost_nano_usd for s in spenders if s.key in previous]
    )
    peak = peak or 1
    parts = []
    for i, s in enumerate(spenders):
        y = i * (_BAR_HEIGHT + 6)
        w = round(plot_w * s.cost_nano_usd / peak, 1)
        parts.append(
            f'<text x="0" y="{y + 15}">{escape(s.key or "(none)")}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w}" height="{_BAR_HEIGHT}" fill="#3f51b5"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{_usd(s.cost_nano_usd)}</text>'
        )
        before = previous.get(s.key)
        if before is not None:
            x = round(label_w + plot_w * before.cost_nano_usd / peak, 1)
            parts.append(
                f'<line class="previous" x1="{x}" x2="{x}" y1="{y - 2}" '
                f'y2="{y + _BAR_HEIGHT + 2}" stroke="#ff9800" stroke-width="3"/>'
            )
    height = len(spenders) * (_BAR_HEIGHT + 6)
    return (
        f'<svg class="spenders" width="{_WIDTH}" '
        f'height="{height}" role="img" aria-label="spend per spender">' + "".join(parts) + "</svg>"
    )


def _spender_rows(review: Review) -> str:
    rows = []
    for s in review.current:
        p = review.previous.get(s.key)
        cells = [
            escape(s.key or "(none)"),
            _usd(s.cost_nano_usd),
            _change(s.cost_nano_usd, p.cost_nano_usd if p else None),
            str(s.calls),
            f"{_pct(s.share(s.retry_cost_nano_usd))} / "
            f"{_pct(p.share(p.retry_cost_nano_usd)) if p else '-'}",
            f"{_pct(s.share(s.failed_cost_nano_usd))} / "
            f"{_pct(p.share(p.failed_cost_nano_usd)) if p else '-'}",
            f"{_pct(s.share(s.expensive_cost_nano_usd))} / "
            f"{_pct(p.share(p.expensive_cost_nano_usd)) if p else '-'}",
            f"{s.max_spawn_depth} / {s.max_fan_out}",
            f"{_usd(s.cost_per_ok_task_nano)} / {_usd(p.cost_per_ok_task_nano) if p else '-'}",
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(rows)


def _remap_rows(review: Review) -> str:
    return "\n".join(
        "<tr>"
        + "".join(
            f"<td>{c}</td>"
            for c in (
                escape(f"{r.scope_kind}:{r.scope}"),
                escape(f"{r.from_model} → {r.to_model}"),
                f"{r.from_calls} / {r.to_calls}",
                f"{100 * r.from_success:.1f}% → {100 * r.to_success:.1f}%",
                f"{r.from_p50_ms:.0f} → {r.to_p50_ms:.0f}",
                _usd(r.saving_nano_usd),
            )
        )
        + "</tr>"
        for r in review.remaps
    )


def render_html(review: Review) -> str:
    by = escape(review.by)
    remaps = (
        '<table class="remaps"><tr><th>scope</th><th>from → to</th><th>calls (from / to)</th>'
        "<th>success</th><th>p50 ms</th><th>saving</th></tr>\n" + _remap_rows(review) + "\n</table>"
        if review.remaps
        else "<p>none: no cheaper model with enough evidence of comparable results</p>"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>agentledger review {_utc(review.since_ms)} .. {_utc(review.until_ms)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>Spend review by {by}</h1>
<p class="window">{_utc(review.since_ms)} .. {_utc(review.until_ms)} UTC, compared with
{_utc(review.previous_since_ms)} .. {_utc(review.since_ms)} UTC
(source: {escape(review.source)})</p>
<p class="total">Total {_usd(review.total_nano_usd)} over {review.total_calls} calls
(previous period {_usd(review.previous_total_nano_usd)}).</p>
<h2>Spend over time</h2>
{spend_svg(review.series)}
<h2>Top spenders</h2>
{spender_svg(review.current, review.previous)}
<table class="spenders">
<tr><th>{by}</th><th>cost</th><th>vs previous</th><th>calls</th><th>retry share (now / prev)</th>
<th>failed-call share</th><th>expensive-model share</th><th>spawn depth / fan-out</th>
<th>cost per successful task</th></tr>
{_spender_rows(review)}
</table>
<p>Expensive models (cost per token at least 3x the median):
{escape(", ".join(review.expensive)) or "none"}.</p>
<h2>Model remap recommendations</h2>
<p>Only where both models have at least {MIN_CALLS_FOR_REMAP} calls in the same scope, the cheaper
one's success rate is within 2 points and its p50 latency within 1.25x.</p>
{remaps}
</body>
</html>
"""
