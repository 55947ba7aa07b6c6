"""The sink's start when ClickHouse is unreachable: retry with backoff and a clear log line."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import pytest

from agentledger.sinks.database import ClickHouse, ClickHouseError
from agentledger.sinks.service import open_with_retry


def test_start_retries_until_clickhouse_opens_then_migrates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[str] = []

    def flaky_open(dsn: str) -> ClickHouse:
        attempts.append(dsn)
        if len(attempts) < 3:
            raise ClickHouseError("Cannot lock file .../status. Another server instance", 76)
        return ClickHouse.open(dsn)

    caplog.set_level(logging.INFO, logger="agentledger.sinks.service")
    database = open_with_retry(
        f"chdb://{tmp_path / 'ch'}", threading.Event(), opener=flaky_open, initial_s=0.01
    )
    assert database is not None
    try:
        tables = database.writer_query("SELECT name FROM system.tables WHERE name = 'calls'")
        assert tables.rows == [["calls"]]
    finally:
        database.close()
    assert len(attempts) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "unreachable at start (attempt 1), retrying in 0.0s" in warnings[0]
    assert "Another server instance" in warnings[0]


def test_start_against_a_dead_server_waits_until_stopped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A real connection attempt to a port nothing listens on; credentials are not logged.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    try:
        result = open_with_retry(
            f"http://user:s3cret@127.0.0.1:{port}", stop, initial_s=0.05, max_s=0.2
        )
    finally:
        timer.cancel()
    assert result is None
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "agentledger.sinks.service"
    ]
    assert warnings, "no retry was logged"
    assert all(f"127.0.0.1:{port}" in w and "s3cret" not in w for w in warnings)
