"""The batch review on real chDB (numbers checked against an independent computation in Python)
and its HTML report (snapshot of the structure on fixed data)."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.review.escalation import Escalations
from agentledger.review.forecast import BudgetForecast
from agentledger.review.insights import (
    MIN_CALLS_FOR_REMAP,
    KeyModelStats,
    Remap,
    Review,
    Spender,
    SpendPoint,
    build_review,
    key_model_stats,
    recommend_remaps,
    rollup_pieces,
    source_for,
    spend_over_time,
)
from agentledger.review.query import QueryClient, QueryResult
from agentledger.review.review_html import render_html
from agentledger.review_report import render_review
from agentledger.schemas import CallEvent, CallStatus
from agentledger.sinks.database import ClickHouse
from agentledger.sinks.rows import SourcePosition, call_to_row
from agentledger.sinks.store import SinkTables
from agentledger.sinks.streams import calls_stream

DAY = 86_400_000
T0 = 1_735_689_600_000  # 2025-01-01T00:00:00Z, the start of the current window
SNAPSHOT = Path(__file__).parent / "snapshots" / "review_report.html"


class LocalClient(QueryClient):
    def __init__(self, db: ClickHouse) -> None:
        self.db = db

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        return self.db.readonly_query(sql, parameters)


def workload() -> list[CallEvent]:
    """Previous day: 'coder' spends moderately. Current day: 'coder' retries a lot and fails on
    the big model; 'writer' uses small and big models with the same results (a remap case with
    40 calls each); 'thin' has 5 calls per model (too little evidence)."""
    events: list[CallEvent] = []

    def add(
        agent: str,
        model: str,
        cost: int,
        *,
        t: int,
        attempt: int = 1,
        ok: bool = True,
        task: str | None = None,
        latency: int = 100,
        parent: str | None = None,
        depth: int = 0,
        task_type: str = "code",
    ) -> None:
        events.append(
            CallEvent(
                event_id=uuid.uuid4(),
                event_time_ms=t,
                agent_id=agent,
                parent_agent_id=parent,
                spawn_depth=depth,
                task_type=task_type,
                task_id=task,
                provider="p",
                requested_model=model,
                used_model=model,
                input_tokens=1000,
                output_tokens=100,
                cost_nano_usd=cost,
                latency_ms=latency,
                attempt=attempt,
                status=CallStatus.OK if ok else CallStatus.ERROR,
            )
        )

    for i in range(10):
        add("coder", "small", 1_000_003, t=T0 - DAY + i * 1000, task=f"old-{i}")
    for i in range(20):
        add("coder", "small", 1_000_003, t=T0 + i * 1000, task=f"c-{i // 2}", attempt=1 + i % 2)
    for i in range(6):
        add("coder", "big", 30_000_007, t=T0 + 50_000 + i, ok=i % 3 != 0, task=f"c-{i}")
    for i in range(40):
        add("writer", "big", 30_000_007, t=T0 + 3_600_000 + i, task_type="prose", latency=200)
        add("writer", "small", 1_000_003, t=T0 + 7_200_000 + i, task_type="prose", latency=210)
    for i in range(5):
        add("thin", "big", 30_000_007, t=T0 + 9_000_000 + i, task_type="misc")
        add("thin", "small", 1_000_003, t=T0 + 9_100_000 + i, task_type="misc")
    for i in range(3):
        add(f"child-{i}", "small", 5, t=T0 + 9_500_000 + i, parent="coder", depth=2)
    return events


def load(db: ClickHouse, events: list[CallEvent]) -> None:
    rows = [call_to_row(e, SourcePosition("x.calls", 0, i), 0) for i, e in enumerate(events)]
    stream = calls_stream(Settings(topic_prefix="x.", control_key=SecretStr("k" * 32)))
    SinkTables(db).insert(stream, rows, f"x.calls:0:0-{len(rows) - 1}")


def test_review_matches_an_independent_recomputation(db: ClickHouse) -> None:
    events = workload()
    load(db, events)
    review = build_review(LocalClient(db), T0, T0 + DAY, by="agent")
    assert review.source == "calls_by_day"
    current = [e for e in events if T0 <= e.event_time_ms < T0 + DAY]
    assert review.total_nano_usd == sum(e.cost_nano_usd for e in current)
    assert review.total_calls == len(current)
    assert review.previous_total_nano_usd == 10 * 1_000_003
    spenders = {s.key: s for s in review.current}
    assert [s.key for s in review.current][:2] == ["writer", "coder"]
    coder = [e for e in current if e.agent_id == "coder"]
    c = spenders["coder"]
    assert c.cost_nano_usd == sum(e.cost_nano_usd for e in coder)
    assert c.retry_cost_nano_usd == sum(e.cost_nano_usd for e in coder if e.attempt > 1)
    assert c.failed_cost_nano_usd == sum(
        e.cost_nano_usd for e in coder if e.status != CallStatus.OK
    )
    assert review.expensive == ["big"]
    assert c.expensive_cost_nano_usd == 6 * 30_000_007
    # Successful tasks: c-0..c-9 have ok calls (c-0 and c-3 failed on big but ok on small).
    assert c.ok_tasks == 10
    assert c.cost_per_ok_task_nano == c.cost_nano_usd // 10
    # 'coder' spawned three children at depth 2.
    assert (c.max_fan_out, spenders["child-0"].max_spawn_depth) == (3, 2)
    assert review.previous["coder"].cost_nano_usd == 10 * 1_000_003
    # One remap: writer's big -> small (40 calls each, same success, p50 within 1.25x); the
    # task-type scope 'prose' is the same evidence; 'thin' (5 calls) gives nothing.
    saving = 40 * 30_000_007 - 40 * 1_000_003
    assert [
        (r.scope_kind, r.scope, r.from_model, r.to_model, r.from_calls, r.saving_nano_usd)
        for r in review.remaps
    ] == [
        ("task_type", "prose", "big", "small", 40, saving),
        ("agent", "writer", "big", "small", 40, saving),
    ]
    text = render_review(review)
    assert re.search(r"^coder\s+\S+\s+\+\d+%\s+26\s", text, re.M), text


def test_rollups_and_raw_calls_give_the_same_numbers(db: ClickHouse) -> None:
    load(db, workload())
    client = LocalClient(db)
    for by in ("agent", "pool", "workflow", "task_type", "model"):
        for since, until in ((T0, T0 + DAY), (T0 - DAY, T0 + DAY), (T0 + 3_600_000, T0 + DAY)):
            assert source_for(since, until) is not None
            via_rollups = key_model_stats(client, by, since, until)
            raw = key_model_stats(client, by, since, until, use_rollups=False)
            assert via_rollups == raw, (by, since, until)
    assert source_for(T0 + 1, T0 + DAY) is None
    # Windows on a minute but not on an hour or a day read several rollups at once.
    minute, hour = 60_000, 3_600_000
    for since, until in (
        (T0 - DAY + 7 * minute, T0 + DAY - 3 * hour + minute),
        (T0 - DAY + 7 * minute, T0 + DAY + 3 * hour + minute),
        (T0 + hour - minute, T0 + 2 * hour + 5 * minute),
        (T0 + 3 * minute, T0 + 4 * minute),
    ):
        for by in ("agent", "task_type", "workflow"):
            via_rollups = key_model_stats(client, by, since, until)
            raw = key_model_stats(client, by, since, until, use_rollups=False)
            assert via_rollups == raw, (by, since, until)


def test_a_window_is_split_into_days_hours_and_minutes() -> None:
    minute, hour = 60_000, 3_600_000
    since, until = T0 - DAY + 7 * minute, T0 + DAY + 3 * hour + minute
    assert rollup_pieces(since, until) == [
        ("day", T0, T0 + DAY),
        ("hour", T0 - DAY + hour, T0),
        ("minute", since, T0 - DAY + hour),
        ("hour", T0 + DAY, T0 + DAY + 3 * hour),
        ("minute", T0 + DAY + 3 * hour, until),
    ]
    assert rollup_pieces(T0, T0 + 2 * DAY) == [("day", T0, T0 + 2 * DAY)]
    assert rollup_pieces(T0 + minute, T0 + 2 * minute) == [("minute", T0 + minute, T0 + 2 * minute)]
    assert rollup_pieces(T0 + 1, T0 + DAY) is None


def test_thin_evidence_recommends_nothing() -> None:
    def stats(model: str, calls: int, cost_each: int, failures: int = 0) -> KeyModelStats:
        return KeyModelStats("a", model, calls, failures, 0, calls, calls * cost_each, 0, 0, 100.0)

    n = MIN_CALLS_FOR_REMAP
    assert recommend_remaps([stats("big", n, 10), stats("small", n - 1, 1)], "agent") == []
    assert len(recommend_remaps([stats("big", n, 10), stats("small", n, 1)], "agent")) == 1
    # Cheaper but clearly worse: no recommendation.
    assert recommend_remaps([stats("big", n, 10), stats("small", n, 1, failures=5)], "agent") == []


def fixed_review() -> Review:
    def spender(key: str, cost: int, retry: int, failed: int) -> Spender:
        return Spender(key, 100, cost, retry, failed, cost // 2, 2, 3, 10)

    return Review(
        by="agent",
        since_ms=T0,
        until_ms=T0 + DAY,
        current=[
            spender("coder", 9_000_000_000, 3_000_000_000, 1_000_000_000),
            spender("writer <b>", 2_000_000_000, 0, 0),
        ],
        previous={"coder": spender("coder", 3_000_000_000, 0, 0)},
        expensive=["big"],
        remaps=[
            Remap("agent", "writer <b>", "big", "small", 40, 40, 1.0, 1.0, 200, 210, 1_160_000_160)
        ],
        total_nano_usd=11_000_000_000,
        total_calls=200,
        previous_total_nano_usd=3_000_000_000,
        series=[SpendPoint(T0 + h * 3_600_000, (h + 1) * 100_000_000) for h in range(4)],
        source="calls_by_day",
        escalations={"coder": Escalations(5, 2, 400_000_000, 1, 150_000_000)},
        previous_escalations={"coder": Escalations(1, 0, 0, 1, 50_000_000)},
        budgets=[
            BudgetForecast(
                "agent:coder", "day", T0, T0 + DAY, T0 + DAY // 2, 10**10, 9 * 10**9, 18 * 10**9
            ),
            BudgetForecast(
                "pool:<p>", "week", T0, T0 + 7 * DAY, T0 + DAY, 10**11, 10**9, 7 * 10**9
            ),
        ],
    )


def test_html_report_is_self_contained_and_matches_the_snapshot() -> None:
    html = render_html(fixed_review())
    # Spend over time (4 bars), spenders (2 bars), budgets (spent + forecast bar each).
    assert html.count("<svg") == 3 and html.count("<rect") == 4 + 2 + 2 * 2
    assert "pool:&lt;p&gt;" in html and "<p>)" not in html
    assert '<span class="up">180%</span>' in html  # coder's day budget: forecast over
    assert "<td>5 / 1</td><td>2 / 0</td><td>$0.40</td>" in html
    assert "<script" not in html and "http" not in html and "<link" not in html
    assert "writer &lt;b&gt;" in html and "writer <b>" not in html
    assert '<span class="up">+200%</span>' in html
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(html, encoding="utf-8")
    assert html == SNAPSHOT.read_text(encoding="utf-8"), (
        "the HTML changed; if intended, rerun with UPDATE_SNAPSHOTS=1 and review the diff"
    )


def test_spend_over_time_is_exact_from_rollups_and_from_calls(db: ClickHouse) -> None:
    events = workload()
    load(db, events)
    client = LocalClient(db)
    hourly: dict[int, int] = {}
    for e in events:
        if T0 <= e.event_time_ms < T0 + DAY:
            bucket = e.event_time_ms - e.event_time_ms % 3_600_000
            hourly[bucket] = hourly.get(bucket, 0) + e.cost_nano_usd
    expected = [SpendPoint(b, c) for b, c in sorted(hourly.items())]
    assert spend_over_time(client, T0, T0 + DAY) == expected  # aligned: calls_by_hour
    assert spend_over_time(client, T0, T0 + DAY - 1) == expected  # not aligned: calls


def test_an_empty_previous_period_prints_as_zero_dollars_like_every_other_amount(
    db: ClickHouse,
) -> None:
    load(db, [e for e in workload() if e.event_time_ms >= T0])
    review = build_review(LocalClient(db), T0, T0 + DAY, by="agent")
    assert review.previous_total_nano_usd == 0
    text = render_review(review)
    assert "(previous period $0.00)" in text, text
    assert "E-" not in text
    amounts = re.findall(r"-?\$[0-9][0-9,.]*", text)
    assert amounts
    # Every amount is format_usd's: grouped dollars, then cents or more digits without
    # trailing zeros beyond the cents.
    for amount in amounts:
        assert re.fullmatch(r"-?\$\d{1,3}(,\d{3})*\.\d{2}(\d*[1-9])?", amount), amount
