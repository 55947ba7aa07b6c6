"""The dashboard's pure parts: forecast, snapshot rows, sorting, operator commands, the command
board and the terminal view; and its history queries against a real embedded chDB."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from rich.console import Console

from agentledger.config import Settings
from agentledger.dashboard.feeds import AlertLog, CommandBoard
from agentledger.dashboard.forecast import HOUR_MS, SpendSamples, forecast
from agentledger.dashboard.operator import operator_command
from agentledger.dashboard.sources import fetch_history, processor_ports
from agentledger.dashboard.view import RateTracker, build_snapshot, scope_row, sort_scopes
from agentledger.review.query import QueryClient, QueryResult
from agentledger.schemas import (
    Alert,
    AlertKind,
    CallEvent,
    ControlAction,
    ControlCommand,
    sign_command,
    verify_command,
)
from agentledger.sinks.database import ClickHouse
from agentledger.sinks.rows import SourcePosition, call_to_row
from agentledger.sinks.store import SinkTables
from agentledger.sinks.streams import calls_stream
from agentledger.top import render_top

KEY = b"dashboard-test-key-0123456789abcdef"
DAY = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


# -- forecast ----------------------------------------------------------------------------------


def test_forecast_at_the_recent_rate_reaches_the_limit_within_the_period() -> None:
    f = forecast(
        spend_nano=2_000_000_000,
        limit_nano=5_000_000_000,
        start_ms=T0,
        end_ms=T0 + DAY,
        now_ms=T0 + 12 * HOUR_MS,
        recent_rate_nano_per_hour=1_000_000_000,
    )
    assert f.rate_source == "recent"
    assert f.projected_nano == 2_000_000_000 + 12 * 1_000_000_000
    assert f.exhausts_at_ms == T0 + 15 * HOUR_MS


def test_forecast_falls_back_to_the_period_average_and_may_never_exhaust() -> None:
    f = forecast(
        spend_nano=600,
        limit_nano=10_000,
        start_ms=T0,
        end_ms=T0 + DAY,
        now_ms=T0 + 6 * HOUR_MS,
        recent_rate_nano_per_hour=None,
    )
    assert (f.rate_source, f.rate_nano_per_hour, f.projected_nano) == ("period", 100, 2400)
    assert f.exhausts_at_ms is None  # 2400 < 10000 by the period's end


def test_forecast_over_the_limit_exhausted_now_and_bad_period_refused() -> None:
    f = forecast(
        spend_nano=11,
        limit_nano=10,
        start_ms=T0,
        end_ms=T0 + DAY,
        now_ms=T0 + 5,
        recent_rate_nano_per_hour=0,
    )
    assert f.exhausts_at_ms == T0 + 5 and f.projected_nano == 11
    with pytest.raises(ValueError, match="end_ms"):
        forecast(
            spend_nano=0,
            limit_nano=None,
            start_ms=T0,
            end_ms=T0,
            now_ms=T0,
            recent_rate_nano_per_hour=None,
        )


def test_samples_rate_window_and_period_reset() -> None:
    samples = SpendSamples(window_ms=60_000)
    samples.add(T0, T0, 0)
    samples.add(T0 + 2_000, T0, 100)
    assert samples.rate_nano_per_hour() is None  # 2 s is too short a span
    samples.add(T0 + 10_000, T0, 1_000)
    assert samples.rate_nano_per_hour() == 1_000 * HOUR_MS // 10_000
    # Samples older than the window drop out: the rate follows the recent slope.
    samples.add(T0 + 100_000, T0, 1_000)
    samples.add(T0 + 110_000, T0, 1_000)
    assert samples.rate_nano_per_hour() == 0
    # A new period starts afresh (the spend fell to its new bucket).
    samples.add(T0 + 120_000, T0 + DAY, 5)
    assert samples.rate_nano_per_hour() is None


# -- snapshot rows -----------------------------------------------------------------------------


def report(
    scope: str, day_spend: int, day_limit: int | None, week_spend: int = 0
) -> dict[str, Any]:
    def period(name: str, start: int, end: int, spend: int, limit: int | None) -> dict[str, Any]:
        return {
            "period": name,
            "start_ms": start,
            "end_ms": end,
            "spend_nano_usd": spend,
            "limit_nano_usd": limit,
            "policy": scope if limit else None,
            "thresholds": (
                [{"at_percent": "80", "action": "alert"}, {"at_percent": "100", "action": "stop"}]
                if limit
                else []
            ),
        }

    return {
        "scope": scope,
        "now_ms": T0 + 6 * HOUR_MS,
        "periods": [
            period("day", T0, T0 + DAY, day_spend, day_limit),
            period("week", T0 - 3 * DAY, T0 + 4 * DAY, week_spend, None),
            period("month", T0, T0 + 31 * DAY, week_spend, None),
        ],
        "last_command": None,
        "alerted": [],
    }


def command(scope: str, action: ControlAction, at: int, **extra: Any) -> ControlCommand:
    return sign_command(
        ControlCommand(scope=scope, action=action, reason="r", issued_at_ms=at, **extra), KEY
    )


def test_scope_row_headline_percent_forecast_and_standing() -> None:
    stop = command("agent:a", ControlAction.STOP, T0, issuer="operator:alice")
    row = scope_row(
        report("agent:a", 750_000_000, 1_000_000_000), T0 + 6 * HOUR_MS, RateTracker(), stop
    )
    assert row["headline"] == "day" and [p["period"] for p in row["periods"]] == ["day"]
    assert (row["spend_usd"], row["limit_usd"], row["pct_hundredths"]) == (
        "0.750000000",
        "1.000000000",
        7500,
    )
    # Period average: 0.75 USD in 6 h is 0.125 USD/h, so 3.0 USD by the day's end.
    assert row["rate_usd_per_hour"] == "0.125000000" and row["forecast_usd"] == "3.000000000"
    assert row["forecast_pct_hundredths"] == 30_000
    assert row["exhausts_at_ms"] == T0 + 8 * HOUR_MS
    assert row["standing"]["action"] == "stop" and row["standing"]["issuer"] == "operator:alice"
    # No budget: the day is shown, without percent or exhaustion.
    free = scope_row(report("pool:p", 5, None, 9), T0 + HOUR_MS, RateTracker(), None)
    assert (free["headline"], free["pct_hundredths"], free["exhausts_at_ms"]) == ("day", None, None)


def test_sort_scopes_by_each_key_and_unknown_key_refused() -> None:
    rates = RateTracker()
    now = T0 + 6 * HOUR_MS
    rows = [
        scope_row(report("agent:b", 900, 1000), now, rates, None),
        scope_row(report("agent:a", 5000, 100_000), now, rates, None),
        scope_row(report("agent:c", 10, None), now, rates, None),
    ]
    assert [r["scope"] for r in sort_scopes(rows, "pct")] == ["agent:b", "agent:a", "agent:c"]
    assert [r["scope"] for r in sort_scopes(rows, "spend")] == ["agent:a", "agent:b", "agent:c"]
    assert [r["scope"] for r in sort_scopes(rows, "scope")] == ["agent:a", "agent:b", "agent:c"]
    with pytest.raises(ValueError, match="sort key must be one of"):
        sort_scopes(rows, "cost")


def test_build_snapshot_lists_idle_standing_and_reports_malformed_input() -> None:
    board = CommandBoard(KEY)
    board.apply(
        command("agent:idle", ControlAction.THROTTLE, T0, params={"concurrency": 2})
        .model_dump_json()
        .encode()
    )
    alerts = AlertLog()
    alerts.apply(
        Alert(kind=AlertKind.THRESHOLD, scope="agent:a", message="80%", issued_at_ms=T0)
        .model_dump_json()
        .encode()
    )
    snap = build_snapshot(
        now_ms=T0 + HOUR_MS,
        scopes_body={"scopes": [report("agent:a", 1, 10), {"scope": "agent:broken"}]},
        standing=board.standing(T0 + HOUR_MS),
        alerts=alerts.latest(),
        history=None,
        rates=RateTracker(),
        health={"processor": None},
    )
    assert [r["scope"] for r in snap["scopes"]] == ["agent:a"]
    assert [c["scope"] for c in snap["standing_without_spend"]] == ["agent:idle"]
    assert snap["alerts"][0]["message"] == "80%"
    assert "malformed" in snap["health"]["processor"]


# -- the command board and operator commands ---------------------------------------------------


def test_board_keeps_the_newest_verified_command_per_scope() -> None:
    board = CommandBoard(KEY)
    board.apply(command("agent:a", ControlAction.STOP, T0 + 10).model_dump_json().encode())
    # Older, forged, unsigned and malformed ones change nothing.
    board.apply(command("agent:a", ControlAction.RESUME, T0).model_dump_json().encode())
    forged = sign_command(
        ControlCommand(
            scope="agent:a", action=ControlAction.RESUME, reason="x", issued_at_ms=T0 + 20
        ),
        b"another-key-0123456789abcdef0123",
    )
    board.apply(forged.model_dump_json().encode())
    board.apply(b"{not json")
    assert board.rejected == 2
    assert board.standing(T0 + 30)["agent:a"].action is ControlAction.STOP
    board.apply(command("agent:a", ControlAction.RESUME, T0 + 40).model_dump_json().encode())
    assert board.standing(T0 + 50) == {}
    # A lapsed command no longer stands.
    board.apply(
        command("pool:p", ControlAction.STOP, T0, until_ms=T0 + 100).model_dump_json().encode()
    )
    assert "pool:p" in board.standing(T0 + 99) and "pool:p" not in board.standing(T0 + 100)


def test_operator_command_is_signed_with_the_operator_as_issuer() -> None:
    cmd = operator_command(
        scope="pool:research",
        action="throttle",
        now_ms=T0,
        key=KEY,
        operator="alice",
        concurrency=3,
        until_ms=T0 + HOUR_MS,
    )
    verify_command(cmd, KEY)
    assert (cmd.issuer, cmd.action, cmd.params, cmd.until_ms) == (
        "operator:alice",
        ControlAction.THROTTLE,
        {"concurrency": 3},
        T0 + HOUR_MS,
    )
    assert cmd.reason == "throttle by operator alice"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"action": "route"}, "action must be one of stop, throttle, resume"),
        ({"action": "throttle"}, "throttle needs concurrency >= 1"),
        ({"concurrency": 2}, "concurrency applies to throttle only"),
        ({"operator": "al ice"}, "operator must be"),
        ({"until_ms": T0}, "must be in the future"),
    ],
)
def test_operator_command_refuses_bad_input(changes: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {
        "scope": "agent:a",
        "action": "stop",
        "now_ms": T0,
        "key": KEY,
        "operator": "alice",
        **changes,
    }
    with pytest.raises(ValueError, match=message):
        operator_command(**values)


def test_an_operator_can_lift_a_subtree_stop() -> None:
    cmd = operator_command(
        scope="subtree:wf-1|lead-1", action="resume", now_ms=T0, key=KEY, operator="alice"
    )
    verify_command(cmd, KEY)
    assert (cmd.schema_version, cmd.action) == (2, ControlAction.RESUME)
    plain = operator_command(scope="agent:a", action="stop", now_ms=T0, key=KEY, operator="al")
    assert plain.schema_version == 1  # still readable by shims from before subtrees


def test_operator_command_refuses_a_bad_scope_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="scope"):
        operator_command(scope="agents:x", action="stop", now_ms=T0, key=KEY, operator="alice")


# -- the terminal view -------------------------------------------------------------------------


def test_top_renders_scopes_in_the_chosen_order_with_standing_and_alerts() -> None:
    rates = RateTracker()
    now = T0 + 6 * HOUR_MS
    stop = command("agent:runaway", ControlAction.STOP, T0, issuer="operator:bob")
    snap = build_snapshot(
        now_ms=now,
        scopes_body={
            "scopes": [
                report("agent:runaway", 1_200_000_000, 1_000_000_000),
                report("agent:calm", 3_000_000_000, 10_000_000_000),
            ]
        },
        standing={"agent:runaway": stop},
        alerts=[
            Alert(
                kind=AlertKind.THRESHOLD,
                scope="agent:runaway",
                message="runaway at 100%",
                issued_at_ms=now,
            )
        ],
        history=None,
        rates=rates,
        health={"history": "the sink is not running"},
    )
    console = Console(record=True, width=200)
    console.print(render_top(snap, "spend"))
    text = console.export_text()
    assert text.index("agent:calm") < text.index("agent:runaway")
    assert "120.00%" in text and "$1.20 " in text
    assert "STOP operator:bob" in text
    assert "runaway at 100%" in text and "the sink is not running" in text
    console = Console(record=True, width=200)
    console.print(render_top(snap, "pct"))
    text = console.export_text()
    assert text.index("agent:runaway") < text.index("agent:calm")


# -- history queries on a real chDB ------------------------------------------------------------


class LocalClient(QueryClient):
    def __init__(self, db: ClickHouse) -> None:
        self.db = db

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        return self.db.readonly_query(sql, parameters)


def test_history_series_top_agents_and_audit_from_chdb(db: ClickHouse) -> None:
    now = T0 + 10 * HOUR_MS + 30 * 60_000
    events = [
        CallEvent.model_validate(
            {
                "event_id": uuid.UUID(int=i + 1),
                "event_time_ms": t,
                "agent_id": agent,
                "provider": "openai",
                "requested_model": "gpt-4o",
                "used_model": "gpt-4o",
                "input_tokens": 10,
                "output_tokens": 5,
                "cost_nano_usd": cost,
                "latency_ms": 100,
            }
        )
        for i, (t, agent, cost) in enumerate(
            [
                (now - 5 * 60_000, "big", 3_000_000_001),
                (now - 5 * 60_000 + 1, "big", 2_000_000_000),
                (now - 60_000, "small", 7),
                (now - 2 * HOUR_MS, "small", 11),  # today, outside the hour
                (T0 - HOUR_MS, "yesterday", 10**12),  # yesterday: in neither
            ]
        )
    ]
    rows = [call_to_row(e, SourcePosition("x.calls", 0, i), 0) for i, e in enumerate(events)]
    stream = calls_stream(Settings(topic_prefix="x.", control_key=SecretStr("k" * 32)))
    SinkTables(db).insert(stream, rows, f"x.calls:0:0-{len(rows) - 1}")
    history = fetch_history(LocalClient(db), now)
    minute = (now - 5 * 60_000) // 60_000 * 60_000
    assert history.series == [(minute, 5_000_000_001), (minute + 4 * 60_000, 7)]
    assert history.top_agents == [("big", 5_000_000_001, 2), ("small", 18, 2)]
    assert history.audit == []


def test_processor_ports_follow_the_recorded_stack_shape(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, processor_port=7000)
    assert processor_ports(settings) == [7000]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stack.json").write_text('{"processors": 3}')
    assert processor_ports(settings) == [7000, 7010, 7020]
    # An explicit count wins over the recorded one.
    assert processor_ports(Settings(home=tmp_path, processor_port=7000, processors=2)) == [
        7000,
        7010,
    ]
