from __future__ import annotations

from pathlib import Path

import pytest

from agentledger.config import Settings
from agentledger.durations import parse_duration_ms
from agentledger.tables import render_table
from agentledger.traces import load_trace


def test_durations() -> None:
    assert parse_duration_ms("24h") == 86_400_000
    assert parse_duration_ms("90m") == 5_400_000
    assert parse_duration_ms("1w") == 604_800_000
    with pytest.raises(ValueError, match="use a number and a unit"):
        parse_duration_ms("yesterday")


def test_table_alignment() -> None:
    text = render_table(
        ["agent", "cost"], [["a", "$1.5"], ["longer", "$10.25"]], right_align=[False, True]
    )
    assert text.splitlines() == [
        "agent     cost",
        "------  ------",
        "a         $1.5",
        "longer  $10.25",
    ]


def test_settings_from_env_and_secret_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTLEDGER_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("AGENTLEDGER_KAFKA", "127.0.0.1:19092")
    monkeypatch.setenv("AGENTLEDGER_TOPIC_PREFIX", "x.")
    monkeypatch.delenv("AGENTLEDGER_CONTROL_KEY", raising=False)
    monkeypatch.delenv("AGENTLEDGER_CLICKHOUSE", raising=False)
    settings = Settings()
    assert settings.kafka_port == 19092
    assert settings.topics.calls == "x.calls"
    assert settings.clickhouse_dsn == f"chdb://{(tmp_path / 'h' / 'clickhouse').resolve()}"
    key = settings.control_key_bytes()
    assert len(key) == 64 and settings.control_key_bytes() == key
    assert (tmp_path / "h" / "control.key").stat().st_mode & 0o777 == 0o600


def test_clickhouse_dsn_is_secret_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTLEDGER_CLICKHOUSE", "https://user:hunter2@ch.example:8443/db")
    settings = Settings()
    assert "hunter2" not in repr(settings)
    assert not settings.embedded_clickhouse


def test_trace_loader_reads_real_sizes() -> None:
    calls = load_trace("conv", limit=3)
    assert [(c.input_tokens, c.output_tokens) for c in calls] == [(374, 44), (396, 109), (879, 55)]
    assert calls[0].arrival_ms == 1_700_158_546_680
