"""`agentledger spend --period`: every period a policy can have, on reports built by the
processor's own spend_report from a real state."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agentledger.cli import main
from agentledger.schemas import BudgetPolicy
from agentledger.spend_cli import PeriodChoice, period_arg, spend_lines
from agentledger.stream_processors.counting import apply_cost
from agentledger.stream_processors.report import spend_report
from agentledger.stream_processors.state import SpendState
from agentledger.stream_processors.tracking import plan_for

MIN = 60_000
NOW = int(datetime(2026, 3, 4, 12, 0, tzinfo=UTC).timestamp() * 1000)


def report(scope: str, *policies: dict[str, Any], spends: tuple[int, ...] = ()) -> dict[str, Any]:
    book = {p.key: p for p in (BudgetPolicy.model_validate(raw) for raw in policies)}
    plan = plan_for(book.values())
    state = SpendState()
    for offset, back_ms in enumerate(spends):
        state = apply_cost(
            state,
            event_id=f"e{offset}",
            event_time_ms=NOW - back_ms,
            cost_nano_usd=1_000_000,  # $0.001 each
            partition=0,
            offset=offset,
            now_ms=NOW - back_ms,
            plan=plan,
        )
    return spend_report(state, book, scope, NOW)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("day", PeriodChoice("day", text="day")),
        ("run", PeriodChoice("run", text="run")),
        ("rolling", PeriodChoice("rolling", text="rolling")),
        ("24h", PeriodChoice("rolling", 86_400_000, "rolling:24h")),
        ("rolling:90m", PeriodChoice("rolling", 5_400_000, "rolling:90m")),
    ],
)
def test_period_arg_accepts_every_period_a_policy_can_have(
    text: str, expected: PeriodChoice
) -> None:
    assert period_arg(text) == expected


def test_a_bad_period_is_refused_by_the_cli_naming_the_choices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["spend", "agent:a", "--period", "fortnight"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "period must be day, week, month, run, rolling, or a rolling window" in err
    assert "'fortnight'" in err


def test_rolling_windows_are_chosen_by_duration_whatever_the_spelling() -> None:
    live = report(
        "agent:a",
        {"scope": "agent:a", "period": "rolling", "window": "24h", "limit_usd": "0.01"},
        {"scope": "agent:*", "period": "rolling", "window": "1h", "limit_usd": "0.01"},
        {"scope": "agent:a", "period": "day", "timezone": "Europe/Paris", "limit_usd": "1"},
        spends=(30 * MIN, 2 * 60 * MIN),
    )
    lines = spend_lines(live, period_arg("1440m"))  # the 24h window, spelled in minutes
    assert lines[0] == "agent:a at 2026-03-04 12:00:00Z"
    (row,) = lines[3:-1]
    assert row.split()[0] == "rolling:24h"
    assert row.split()[-4:] == ["0.002000000", "0.01", "20.00", "agent:a"]
    (hour,) = spend_lines(live, period_arg("1h"))[3:-1]
    # The spend of two hours ago has slid out of the hour.
    assert hour.split()[-4:] == ["0.001000000", "0.01", "10.00", "agent:*"]
    both = [line.split()[0] for line in spend_lines(live, period_arg("rolling"))[3:-1]]
    assert both == ["rolling:1h", "rolling:24h"]
    (day,) = spend_lines(live, period_arg("day"))[3:-1]
    assert day.startswith("day (Europe/Paris)  2026-03-03 23:00:00Z  2026-03-04 23:00:00Z")
    everything = spend_lines(live, None)
    assert [line.split()[0] for line in everything[3:-1]] == [
        "day",
        "week",
        "month",
        "rolling:1h",
        "rolling:24h",
    ]
    with pytest.raises(ValueError, match=r"no rolling:7d budget governs agent:a"):
        spend_lines(live, period_arg("7d"))
    with pytest.raises(ValueError, match=r"holds: day, week, month, rolling:1h, rolling:24h"):
        spend_lines(live, period_arg("run"))


def test_a_workflow_run_shows_its_spend_and_when_none_is_in_progress() -> None:
    run = {"scope": "workflow:w", "period": "run", "idle": "30m", "limit_usd": "0.004"}
    live = report("workflow:w", run, spends=(20 * MIN, 10 * MIN, 5 * MIN))
    lines = spend_lines(live, period_arg("run"))
    (row,) = lines[3:-1]
    # The run started 20 minutes ago and ends 30 idle minutes after its last event.
    assert row.split()[:5] == ["run", "2026-03-04", "11:40:00Z", "2026-03-04", "12:25:00Z"]
    assert row.split()[-4:] == ["0.003000000", "0.004", "75.00", "workflow:w"]
    assert lines[-1] == "standing: none (calls proceed)"
    idle = report("workflow:w", run, spends=(2 * 60 * MIN,))
    lines = spend_lines(idle, period_arg("run"))
    assert lines[3].split()[:3] == ["run", "-", "-"]
    assert lines[4] == "run: no run in progress (the next event starts one at zero)"


class _StateServer:
    """A loopback HTTP server answering ``GET /state/<scope>`` with one report, as the
    processor does (bearer token checked), so the CLI runs end to end."""

    def __init__(self, answer: dict[str, Any], token: str) -> None:
        body = json.dumps(answer).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = self.headers.get("Authorization") == f"Bearer {token}"
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body if ok else b'{"error": "wrong token"}')

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def zoned_report(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[dict[str, Any]]:
    """A real report (a zoned day, a rolling window) served where the CLI looks for it."""
    live = report(
        "agent:a",
        {"scope": "agent:a", "period": "rolling", "window": "24h", "limit_usd": "0.01"},
        {"scope": "agent:a", "period": "day", "timezone": "Europe/Paris", "limit_usd": "1"},
        spends=(30 * MIN, 2 * 60 * MIN),
    )
    server = _StateServer(live, "spend-cli-token")
    monkeypatch.setenv("AGENTLEDGER_HOME", str(tmp_path))
    monkeypatch.setenv("AGENTLEDGER_PROCESSOR_PORT", str(server.port))
    monkeypatch.setenv("AGENTLEDGER_API_TOKEN", "spend-cli-token")
    try:
        yield live
    finally:
        server.close()


def _json_out(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["spend", "agent:a", "--json", *argv]) == 0
    printed: dict[str, Any] = json.loads(capsys.readouterr().out)
    return printed


def test_spend_json_without_a_period_prints_the_whole_report(
    zoned_report: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _json_out(capsys) == zoned_report


@pytest.mark.parametrize(
    ("period", "names", "bucket_kinds"),
    [
        # The state counts every calendar period in UTC and in each zone a policy names.
        ("day", ["day"], {"day", "day@Europe/Paris"}),
        ("week", ["week"], {"week", "week@Europe/Paris"}),
        ("month", ["month"], {"month", "month@Europe/Paris"}),
        ("rolling", ["rolling:24h"], set()),
        ("1440m", ["rolling:24h"], set()),
    ],
)
def test_spend_json_prints_only_the_chosen_period_and_its_buckets(
    zoned_report: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    period: str,
    names: list[str],
    bucket_kinds: set[str],
) -> None:
    printed = _json_out(capsys, "--period", period)
    assert [p["period"] for p in printed["periods"]] == names
    chosen = [p for p in zoned_report["periods"] if p["period"] in names]
    assert printed["periods"] == chosen  # the processor's own rows, unchanged
    assert {key.rpartition(":")[0] for key in printed["buckets"]} == bucket_kinds
    assert all(printed["buckets"][k] == zoned_report["buckets"][k] for k in printed["buckets"])
    assert printed["scope"] == "agent:a"
    assert printed["last_command"] == zoned_report["last_command"]


def test_spend_json_for_a_period_nothing_governs_is_the_same_error_as_the_table(
    zoned_report: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["spend", "agent:a", "--json", "--period", "run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no run budget governs agent:a (the processor holds: day, week, month" in captured.err
