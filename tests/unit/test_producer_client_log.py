"""librdkafka's lines go through ``logging``, rate-limited: one clear warning per interval while
the broker is unreachable, never a raw line on the agent's stderr."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agentledger.producers.client_log import DETAIL_LOGGER, ClientLog
from tests.conftest import TEST_CONTROL_KEY, free_port

SUMMARY_LOGGER = "agentledger.producers.client_log"
REFUSED = (
    "FAIL",
    "rdkafka#producer-1",
    "[thrd:127.0.0.1:9/bootstrap]: 127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: "
    "Connection refused (after 0ms in state CONNECT)",
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def summary(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == SUMMARY_LOGGER]


def test_an_outage_is_said_once_per_interval_with_what_to_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    client_log = ClientLog("127.0.0.1:9", interval_s=30.0, clock=clock)
    caplog.set_level(logging.DEBUG)
    for _ in range(65):  # a line a second for 65 s, as librdkafka retries
        client_log.log(logging.ERROR, "%s [%s] %s", *REFUSED)
        clock.now += 1.0
    warnings = summary(caplog)
    assert [r.levelno for r in warnings] == [logging.WARNING] * 3  # at 0 s, 30 s, 60 s
    first, second = warnings[0].getMessage(), warnings[1].getMessage()
    assert "cannot reach Kafka at 127.0.0.1:9 (connection refused)" in first
    assert "AGENTLEDGER_KAFKA" in first and "spooled" in first
    assert "[thrd:" not in first and "rdkafka#" not in first
    assert "29 more such client messages in the last 30 s" in second
    # Every line is still there for whoever turns the detail logger to DEBUG.
    detail = [r for r in caplog.records if r.name == DETAIL_LOGGER]
    assert len(detail) == 65 and all(r.levelno == logging.DEBUG for r in detail)
    assert client_log.lines == 65 and client_log.warnings == 3


def test_other_client_errors_are_limited_per_facility_not_hidden_by_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    client_log = ClientLog("b:9093", interval_s=30.0, clock=clock)
    caplog.set_level(logging.DEBUG)
    ssl = ("SSL", "rdkafka#consumer-2", "[thrd:b:9093/bootstrap]: SSL handshake failed")
    for _ in range(3):
        client_log.log(logging.ERROR, "%s [%s] %s", *REFUSED)
        client_log.log(logging.ERROR, "%s [%s] %s", *ssl)
        client_log.log(logging.INFO, "%s [%s] %s", "CONFWARN", "rdkafka#consumer-2", "fyi")
    messages = [(r.levelno, r.getMessage()) for r in summary(caplog)]
    assert len(messages) == 2
    assert messages[0][0] == logging.WARNING and "cannot reach Kafka at b:9093" in messages[0][1]
    level, text = messages[1]
    assert level == logging.ERROR
    assert "rdkafka#consumer-2 (SSL): SSL handshake failed" in text and "[thrd:" not in text


CHILD = textwrap.dedent(
    """
    import sys, time
    from agentledger.producers import Ledger
    from agentledger.producers.client_log import ClientLog, client_log

    ClientLog.INTERVAL_S = float(sys.argv[1])
    ledger = Ledger.from_env()  # the control listener too: a consumer, and a producer
    agent = ledger.agent("noisy", pool="p")
    ledger.wait_for_control(0.1)
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        with agent.call(provider="openai", model="gpt-4o-mini") as call:
            call.record(input_tokens=10, output_tokens=5)
        time.sleep(0.05)
    ledger.close()
    shared = client_log(ledger.settings.kafka)
    print(shared.lines, shared.warnings, ledger.transport.stats.spooled)
    """
)


def test_with_the_broker_down_stderr_gets_warnings_not_librdkafka_lines(tmp_path: Path) -> None:
    interval_s, run_s = 2.0, 8.0
    env = {
        **os.environ,
        "AGENTLEDGER_KAFKA": f"127.0.0.1:{free_port()}",  # nothing listens: connection refused
        "AGENTLEDGER_HOME": str(tmp_path / "home"),
        "AGENTLEDGER_CONTROL_KEY": TEST_CONTROL_KEY,
        "AGENTLEDGER_TOPIC_PREFIX": "down.",
    }
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    done = subprocess.run(
        [sys.executable, str(script), str(interval_s), str(run_s)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines, warnings, spooled = (int(x) for x in done.stdout.split())
    stderr = done.stderr.splitlines()
    raw = [ln for ln in stderr if "[thrd:" in ln or "rdkafka#" in ln or ln.startswith("FAIL ")]
    assert not raw, f"librdkafka lines reached stderr: {raw[:3]}"
    outage = [ln for ln in stderr if "cannot reach Kafka at" in ln]
    # Once per interval: more than once over the run, never more often than the interval.
    assert 2 <= len(outage) <= run_s / interval_s + 1, stderr
    assert lines > 2 * len(outage), "librdkafka said too little for the limit to be tested"
    assert spooled > 0
    print(
        f"\n{run_s:.0f} s with the broker down: {lines} librdkafka lines, {warnings} logged, "
        f"{len(stderr)} stderr lines, {len(outage)} outage warnings"
    )
