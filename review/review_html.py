"""The review as one self-contained HTML file: inline CSS and SVG plots, no script, no CDN.

Deterministic for a given Review (no clock, no random ids), so its structure is snapshot-tested.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape

from agentledger.schemas import format_usd

from .escalation import Escalations
from .forecast import BudgetForecast
from .insights import MIN_CALLS_FOR_REMAP, Review, Spender, SpendPoint

__all__ = ["budget_svg", "render_html", "spend_svg", "spender_svg"]

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
    return "-" if nano is None else format_usd(nano)


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


def _bar(nano: int, limit: int, plot_w: int) -> float:
    # Display only: a float width is fine here, the money itself stays integer.
    return round(min(nano / limit, 1.5) * plot_w * 2 / 3, 1)


def budget_svg(budgets: list[BudgetForecast]) -> str:
    """One bar per budget, scaled to its own limit: spent (solid), forecast at the period end
    (light, behind it), and the limit as a vertical line at the same x for every budget."""
    if not budgets:
        return '<p class="empty">no budgets given</p>'
    label_w = 220
    plot_w = _WIDTH - label_w - 150
    # The limit sits at 2/3 of the plot so overshoots up to 1.5x the limit stay visible.
    limit_x = label_w + round(plot_w * 2 / 3, 1)
    parts = []
    for i, f in enumerate(budgets):
        y = i * (_BAR_HEIGHT + 6)

        fill = "#b00020" if f.over else "#3f51b5"
        forecast = _bar(f.forecast_nano_usd, f.limit_nano_usd, plot_w)
        spent = _bar(f.spent_nano_usd, f.limit_nano_usd, plot_w)
        parts.append(
            f'<text x="0" y="{y + 15}">{escape(f.scope)} ({escape(f.period)})</text>'
            f'<rect class="forecast" x="{label_w}" y="{y}" width="{forecast}" '
            f'height="{_BAR_HEIGHT}" fill="{fill}" fill-opacity="0.3"/>'
            f'<rect class="spent" x="{label_w}" y="{y}" width="{spent}" '
            f'height="{_BAR_HEIGHT}" fill="{fill}"/>'
            f'<text x="{label_w + plot_w + 6}" y="{y + 15}">'
            f"{f.percent(f.forecast_nano_usd):.0f}% of {_usd(f.limit_nano_usd)}</text>"
        )
    height = len(budgets) * (_BAR_HEIGHT + 6)
    parts.append(
        f'<line class="limit" x1="{limit_x}" x2="{limit_x}" y1="0" y2="{height}" '
        'stroke="#222" stroke-width="2"/>'
    )
    return (
        f'<svg class="budgets" width="{_WIDTH}" height="{height}" role="img" '
        'aria-label="spend and forecast against each budget">' + "".join(parts) + "</svg>"
    )


def _budget_rows(budgets: list[BudgetForecast]) -> str:
    return "\n".join(
        "<tr>"
        + "".join(
            f"<td>{c}</td>"
            for c in (
                escape(f.scope),
                escape(f.period),
                f"{_utc(f.start_ms)} .. {_utc(f.end_ms)}",
                _usd(f.spent_nano_usd),
                _usd(f.forecast_nano_usd),
                _usd(f.limit_nano_usd),
                f'<span class="{"up" if f.over else "down"}">'
                f"{f.percent(f.forecast_nano_usd):.0f}%</span>",
            )
        )
        + "</tr>"
        for f in budgets
    )


def _escalation_rows(review: Review) -> str:
    rows = []
    for s in review.current:
        now = review.escalations.get(s.key, Escalations())
        before = review.previous_escalations.get(s.key, Escalations())
        if not (now.escalated or before.escalated):
            continue
        cells = [
            escape(s.key or "(none)"),
            f"{now.escalated} / {before.escalated}",
            f"{now.failed} / {before.failed}",
            _usd(now.failed_cost_nano_usd),
            f"{now.needless} / {before.needless}",
            _usd(now.needless_cost_nano_usd),
            _pct(s.share(now.failed_cost_nano_usd + now.needless_cost_nano_usd)),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(rows)


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
    escalation_rows = _escalation_rows(review)
    escalation_table = (
        '<table class="escalations"><tr><th>'
        + by
        + "</th><th>escalations (now / prev)</th><th>failed (now / prev)</th>"
        "<th>failed cost</th><th>needless (now / prev)</th><th>needless cost</th>"
        "<th>share of cost</th></tr>\n" + escalation_rows + "\n</table>"
        if escalation_rows
        else "<p>none among the top spenders</p>"
    )
    budget_table = (
        '<table class="budgets"><tr><th>scope</th><th>period</th><th>from .. to</th>'
        "<th>spent</th><th>forecast</th><th>limit</th><th>forecast / limit</th></tr>\n"
        + _budget_rows(review.budgets)
        + "\n</table>"
        if review.budgets
        else ""
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
<h2>Escalations</h2>
<p>A call of a task on a pricier model (cost per token) than the task's previous call.
Failed: the previous call failed and this one failed too. Needless: the previous call had
succeeded.</p>
{escalation_table}
<h2>Budgets</h2>
<p>Spend so far (solid) and forecast at the period end (light) at the period's average burn rate,
against each budget's limit (the line).</p>
{budget_svg(review.budgets)}
{budget_table}
<h2>Model remap recommendations</h2>
<p>Only where both models have at least {MIN_CALLS_FOR_REMAP} calls in the same scope, the cheaper
one's success rate is within 2 points and its p50 latency within 1.25x.</p>
{remaps}
</body>
</html>
"""
