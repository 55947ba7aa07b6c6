"""`agentledger review`: spend per agent and model, top spenders with the reasons their spend
grew against the previous period, model remap recommendations, and an optional HTML report."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from agentledger.config import Settings
from agentledger.schemas import format_usd
from agentledger.tables import render_table

if TYPE_CHECKING:
    from agentledger.review.forecast import BudgetLine
    from agentledger.review.insights import Review, Spender
    from agentledger.schemas import BudgetPolicy

__all__ = ["budget_lines", "print_review", "render_review", "review_table", "run_review"]


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def review_table(
    settings: Settings, since_ms: int, until_ms: int, workflow_id: str | None = None
) -> str:
    from agentledger.review.query import QueryClient
    from agentledger.review.spend import spend_by_agent_model

    client = QueryClient.from_settings(settings)
    try:
        rows = spend_by_agent_model(client, since_ms, until_ms, workflow_id=workflow_id)
    finally:
        client.close()
    total = sum(r.cost_nano_usd for r in rows)
    body = render_table(
        ["agent", "model", "calls", "failed", "input tok", "output tok", "cost (USD)", "share"],
        [
            [
                r.agent_id,
                r.used_model,
                r.calls,
                r.failures,
                r.input_tokens,
                r.output_tokens,
                format_usd(r.cost_nano_usd),
                f"{100 * r.cost_nano_usd / total:.1f}%" if total else "-",
            ]
            for r in rows
        ],
        right_align=[False, False, True, True, True, True, True, True],
    )
    scope = f" in workflow {workflow_id}" if workflow_id else ""
    header = f"spend per agent and model{scope}, {_utc(since_ms)} .. {_utc(until_ms)}"
    return f"{header}\n{body}\ntotal: {format_usd(total)} over {sum(r.calls for r in rows)} calls"


def print_review(
    settings: Settings, since_ms: int, until_ms: int, workflow_id: str | None = None
) -> None:
    print(review_table(settings, since_ms, until_ms, workflow_id))


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _change(now: int, before: int | None) -> str:
    if before is None or before == 0:
        return "new" if now else "-"
    return f"{100 * (now - before) / before:+.0f}%"


def _usd(nano: int | None) -> str:
    return "-" if nano is None else format_usd(nano)


def render_review(review: Review) -> str:
    """Top spenders with the reasons their spend grew, then model remap recommendations."""
    from agentledger.review.insights import MIN_CALLS_FOR_REMAP

    lines = [
        f"top spenders by {review.by}, {_utc(review.since_ms)} .. {_utc(review.until_ms)} "
        f"vs the previous {_duration(review.until_ms - review.since_ms)} "
        f"(from {review.source})",
    ]
    rows = []
    for s in review.current:
        p = review.previous.get(s.key)
        rows.append(
            [
                s.key or "(none)",
                _usd(s.cost_nano_usd),
                _change(s.cost_nano_usd, p.cost_nano_usd if p else None),
                s.calls,
                _shares(s, p, "retry_cost_nano_usd"),
                _shares(s, p, "failed_cost_nano_usd"),
                _shares(s, p, "expensive_cost_nano_usd"),
                f"{s.max_spawn_depth}/{s.max_fan_out}",
                f"{_usd(s.cost_per_ok_task_nano)} ({_usd(p.cost_per_ok_task_nano) if p else '-'})",
            ]
        )
    lines.append(
        render_table(
            [
                review.by,
                "cost (USD)",
                "vs prev",
                "calls",
                "retry share (prev)",
                "failed share (prev)",
                "expensive models (prev)",
                "depth/fan-out",
                "cost per ok task (prev)",
            ],
            rows,
            right_align=[False, True, True, True, True, True, True, True, True],
        )
    )
    lines.append(
        f"total: {format_usd(review.total_nano_usd)} over {review.total_calls} calls "
        f"(previous period {format_usd(review.previous_total_nano_usd)}); expensive models "
        f"(cost per token >= 3x the median): {', '.join(review.expensive) or 'none'}"
    )
    lines.append("")
    lines.extend(_escalation_lines(review))
    lines.append("")
    lines.append(
        f"model remap recommendations (both models >= {MIN_CALLS_FOR_REMAP} calls in the same "
        "scope, success rate within 2 points, p50 latency within 1.25x):"
    )
    if review.remaps:
        lines.append(
            render_table(
                ["scope", "from -> to", "calls (from/to)", "success", "p50 ms", "saving (USD)"],
                [
                    [
                        f"{r.scope_kind}:{r.scope}",
                        f"{r.from_model} -> {r.to_model}",
                        f"{r.from_calls}/{r.to_calls}",
                        f"{100 * r.from_success:.1f}% -> {100 * r.to_success:.1f}%",
                        f"{r.from_p50_ms:.0f} -> {r.to_p50_ms:.0f}",
                        _usd(r.saving_nano_usd),
                    ]
                    for r in review.remaps
                ],
                right_align=[False, False, True, True, True, True],
            )
        )
    else:
        lines.append("none: no cheaper model with enough evidence of comparable results")
    lines.append("")
    lines.extend(_budget_lines(review))
    return "\n".join(lines)


def _escalation_lines(review: Review) -> list[str]:
    """Tasks moved to a pricier model: failed (the pricier model failed too) and needless (the
    cheaper call had succeeded), with their cost, for the top spenders, now and before."""
    from agentledger.review.escalation import Escalations

    head = (
        "escalations (a task's call on a pricier model than its previous call): failed = the "
        "previous call failed and so did this one; needless = the previous call had succeeded"
    )
    rows = []
    for s in review.current:
        now = review.escalations.get(s.key, Escalations())
        before = review.previous_escalations.get(s.key, Escalations())
        if not (now.escalated or before.escalated):
            continue
        wasted = now.failed_cost_nano_usd + now.needless_cost_nano_usd
        rows.append(
            [
                s.key or "(none)",
                f"{now.escalated} ({before.escalated})",
                f"{now.failed} ({before.failed})",
                _usd(now.failed_cost_nano_usd),
                f"{now.needless} ({before.needless})",
                _usd(now.needless_cost_nano_usd),
                _pct(s.share(wasted)),
            ]
        )
    if not rows:
        return [head + ":", "none among the top spenders"]
    table = render_table(
        [
            review.by,
            "escalations (prev)",
            "failed (prev)",
            "failed cost (USD)",
            "needless (prev)",
            "needless cost (USD)",
            "share of cost",
        ],
        rows,
        right_align=[False, True, True, True, True, True, True],
    )
    return [head + ":", table]


def _budget_lines(review: Review) -> list[str]:
    if not review.budgets:
        return ["budgets: none given (published policies with a limit are forecast here)"]
    rows = [
        [
            f.scope,
            f.period,
            f"{_utc(f.start_ms)} .. {_utc(f.end_ms)}",
            _usd(f.spent_nano_usd),
            _usd(f.forecast_nano_usd),
            _usd(f.limit_nano_usd),
            f"{f.percent(f.forecast_nano_usd):.0f}%",
            "OVER" if f.over else "ok",
        ]
        for f in review.budgets
    ]
    table = render_table(
        ["scope", "period", "from .. to", "spent", "forecast", "limit", "forecast/limit", ""],
        rows,
        right_align=[False, False, False, True, True, True, True, False],
    )
    return [
        f"budget forecast at {_utc(review.until_ms)} (the period's average burn rate so far, "
        "carried to its end):",
        table,
    ]


def _shares(now: Spender, before: Spender | None, part: str) -> str:
    mine = _pct(now.share(getattr(now, part)))
    theirs = _pct(before.share(getattr(before, part))) if before is not None else "-"
    return f"{mine} ({theirs})"


def _duration(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)):
        if ms % size == 0 and ms >= size:
            return f"{ms // size}{unit}"
    return f"{ms / 1000:g}s"


def budget_lines(policies: list[BudgetPolicy], as_of_ms: int) -> list[BudgetLine]:
    """The budgets to forecast at `as_of_ms`: each policy with a limit, over its calendar period
    holding the window's last millisecond (in the policy's timezone), or its rolling window
    ending there (nothing left to project). Per-run budgets have no calendar end: skipped."""
    from agentledger.review.forecast import BudgetLine
    from agentledger.schemas import Period
    from agentledger.stream_processors.periods import period_window

    lines = []
    for policy in policies:
        if policy.limit_usd is None or policy.period is Period.RUN:
            continue
        if policy.period is Period.ROLLING:
            start, end = as_of_ms - policy.window_ms, as_of_ms
        else:
            window = period_window(policy.period, as_of_ms - 1, policy.timezone)
            start, end = window.start_ms, window.end_ms
        lines.append(
            BudgetLine(policy.scope, policy.period_name, start, end, policy.limit_nano_usd)
        )
    return lines


def run_review(
    settings: Settings,
    since_ms: int,
    until_ms: int,
    by: str = "agent",
    html_path: Path | None = None,
    policies: list[BudgetPolicy] | None = None,
) -> str:
    """The text of `agentledger review`; writes the HTML report too when html_path is given.
    `policies` (as `agentledger budgets list` reads them) are forecast at `until_ms`."""
    from agentledger.review.insights import build_review
    from agentledger.review.query import QueryClient

    spend = review_table(settings, since_ms, until_ms)
    client = QueryClient.from_settings(settings)
    try:
        review = build_review(
            client, since_ms, until_ms, by=by, budgets=budget_lines(policies or [], until_ms)
        )
    finally:
        client.close()
    text = f"{spend}\n\n{render_review(review)}"
    if html_path is not None:
        from agentledger.review.review_html import render_html

        html_path.write_text(render_html(review), encoding="utf-8")
        text += f"\n\nHTML report: {html_path}"
    return text
