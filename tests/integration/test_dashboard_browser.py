"""The dashboard in a real browser: headless Debian chromium driven by Playwright, against the
real stack (broker, processor, sink, dashboard as processes) while a workload runs.

It checks that the page updates live, that STOP pressed on the page reaches the control topic
signed by the operator and the running agent refuses, that a framework call paused by that STOP
is listed in the Paused panel, that the sink audits it in ClickHouse,
that `agentledger top` and `agentledger control resume` work on the same stack, and that the
API refuses missing tokens and cross-site POSTs. A screenshot is saved to tests/artifacts/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from agentledger.budgets import apply_policies
from agentledger.config import Settings
from agentledger.deploy.stack import Stack
from agentledger.producers import BudgetExceeded, Ledger
from agentledger.producers.framework import Pause, admit, pause_stats
from agentledger.review.query import QueryClient
from agentledger.schemas import BudgetPolicy, ControlCommand, PolicyFile, verify_command
from tests.conftest import TEST_CONTROL_KEY

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
RUNAWAY = "agent:dash-runaway"
# Real call sizes from the Azure conversation trace (as in test_end_to_end).
SIZES = [(374, 44), (396, 109), (879, 55), (91, 16), (2738, 232), (733, 178)]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Workload:
    """Two agents calling in a loop on a thread; the runaway's refusals are counted."""

    def __init__(self, ledger: Ledger) -> None:
        self.runaway = ledger.agent("dash-runaway", pool="dash-pool", workflow="wf-dash")
        self.steady = ledger.agent("dash-steady", pool="dash-pool", workflow="wf-dash")
        self.refused = 0
        self.calls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            tokens_in, tokens_out = SIZES[n % len(SIZES)]
            n += 1
            try:
                with self.runaway.call(provider="openai", model="gpt-4o") as call:
                    call.record(input_tokens=tokens_in, output_tokens=tokens_out)
                self.calls += 1
            except BudgetExceeded:
                self.refused += 1
            with self.steady.call(provider="openai", model="gpt-4o-mini") as call:
                call.record(input_tokens=tokens_in, output_tokens=tokens_out)
            self._stop.wait(0.1)

    def __enter__(self) -> Workload:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def control_commands(settings: Settings) -> list[ControlCommand]:
    topic = settings.topics.control
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka, "group.id": "dash-test", "enable.auto.commit": False}
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        found = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            value = msg.value() if msg is not None and msg.error() is None else None
            if value:
                found.append(ControlCommand.model_validate_json(value))
        return found
    finally:
        consumer.close()


def audited(settings: Settings, issuer: str) -> list[list[Any]]:
    result = QueryClient.from_settings(settings).query(
        "SELECT action, verified, reason FROM control_commands "
        "WHERE scope = {scope:String} AND issuer = {issuer:String} ORDER BY issued_at",
        {"scope": RUNAWAY, "issuer": issuer},
    )
    return result.rows


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        {
            "AGENTLEDGER_KAFKA": settings.kafka,
            "AGENTLEDGER_HOME": str(settings.home),
            "AGENTLEDGER_TOPIC_PREFIX": settings.topic_prefix,
            "AGENTLEDGER_CONTROL_KEY": TEST_CONTROL_KEY,
            "AGENTLEDGER_API_TOKEN": settings.api_token_value(),
            "AGENTLEDGER_PROCESSOR_PORT": str(settings.processor_port),
            "AGENTLEDGER_SINK_PORT": str(settings.sink_port),
            "COLUMNS": "220",
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "agentledger", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: run `make browser`")
def test_dashboard_live_in_chromium_with_operator_stop(stack: Stack, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    settings = stack.settings
    apply_policies(
        settings,
        PolicyFile(
            budgets=[
                BudgetPolicy.model_validate(
                    {
                        "scope": RUNAWAY,
                        "limit_usd": "5",
                        "thresholds": [
                            {"at_percent": 1, "action": "alert"},
                            {"at_percent": 100, "action": "stop"},
                        ],
                    }
                )
            ]
        ),
    )
    base = f"http://127.0.0.1:{settings.dashboard_port}"
    # The processor's /scopes (the dashboard's live source) wants the token too.
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"http://127.0.0.1:{settings.processor_port}/scopes", timeout=10)
    assert denied.value.code == 401
    ledger = Ledger(settings)
    try:
        assert ledger.wait_for_control(30)
        pausing = ledger.agent("dash-runaway", pool="dash-pool", workflow="wf-dash")

        def wait_paused() -> None:
            call = admit(
                lambda: pausing.call(provider="openai", model="gpt-4o"),
                pausing,
                Pause(timeout_s=300),
            )
            call.__exit__(None, None, None)

        paused = threading.Thread(target=wait_paused, daemon=True)
        with Workload(ledger) as work, sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),  # a fresh --user-data-dir
                executable_path=str(CHROMIUM),
                headless=True,
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
                viewport={"width": 1400, "height": 1000},
            )
            try:
                page = browser.new_page()
                page.goto(base + "/")
                # Logged out: the API refuses, the page asks for the token.
                page.wait_for_selector("#login:not([hidden])")
                assert page.request.get(base + "/api/snapshot").status == 401
                page.fill("#token", "wrong-token")
                page.click("#login-submit")
                page.wait_for_selector("#login-failed:not([hidden])")
                page.fill("#token", settings.api_token_value())
                page.click("#login-submit")

                # Live: the runaway's row appears and its spend moves while the page stays open.
                row = page.locator(f'tr[data-scope="{RUNAWAY}"]')
                row.wait_for(timeout=60_000)
                label = row.locator(".barlabel")
                first = label.inner_text()
                updates = page.evaluate("window.__agentledger.events")
                wait_for(
                    "the runaway's spend to change on the page", lambda: label.inner_text() != first
                )
                assert page.evaluate("window.__agentledger.events") > updates
                assert page.locator("#conn").inner_text() == "live"
                # Warn mark (1% alert) and limit mark drawn on the bar; the alert listed.
                assert row.locator(".warn-mark").count() == 1
                assert row.locator(".limit-mark").count() == 1
                page.locator("#alerts li", has_text=RUNAWAY).first.wait_for(timeout=60_000)
                # History from ClickHouse: the spend chart and the top agents.
                page.locator("#series rect").first.wait_for(timeout=60_000)
                page.locator("#top text", has_text="dash-runaway").wait_for(timeout=60_000)

                # A cross-site POST with the session cookie is refused before anything is sent.
                forged = page.request.post(
                    base + "/api/control",
                    data={"scope": RUNAWAY, "action": "resume"},
                    headers={"Origin": "http://evil.example"},
                )
                assert forged.status == 401

                # Throttle the pool to 2 from the page: the agents see it; then resume it.
                pool = page.locator('tr[data-scope="pool:dash-pool"]')
                pool.locator("input.n").fill("2")
                pool.locator('button[data-action="throttle"]').click()
                pool.locator(".standing", has_text="THROTTLE concurrency=2").wait_for(
                    timeout=30_000
                )

                def throttles() -> list[ControlCommand]:
                    return [
                        c
                        for c in work.steady.standing()
                        if c.action.value == "throttle" and c.scope == "pool:dash-pool"
                    ]

                assert wait_for("the shim to see the THROTTLE", throttles)[0].params == {
                    "concurrency": 2
                }
                pool.locator('button[data-action="resume"]').click()
                wait_for("the shim to see the pool resumed", lambda: not throttles())
                pool.locator(".standing", has_text="THROTTLE").wait_for(
                    state="detached", timeout=30_000
                )

                # The operator stops the runaway from the page.
                page.fill("#reason", "browser test: runaway stopped by hand")
                clicked = time.monotonic()
                row.locator('button[data-action="stop"]').click()
                page.locator("#action-result", has_text=f"STOP for {RUNAWAY} published").wait_for()
                published_s = time.monotonic() - clicked

                def refused() -> bool:
                    try:
                        work.runaway.check_budget()
                    except BudgetExceeded:
                        return True
                    return False

                wait_for("the shim to refuse the runaway", refused, timeout_s=30)
                refused_s = time.monotonic() - clicked
                row.locator(".standing", has_text="STOP").wait_for(timeout=30_000)
                shown_s = time.monotonic() - clicked
                # A framework call in pause mode waits out the STOP: the page lists it (until
                # the CLI's resume below lets it go).
                paused.start()
                page.locator(f'#paused li[data-scope="{RUNAWAY}"]', has_text="PAUSED 1").wait_for(
                    timeout=30_000
                )
                row.locator(".standing .badge.paused", has_text="PAUSED 1").wait_for()
                mine = wait_for(
                    "the operator's STOP on the control topic",
                    lambda: [
                        c
                        for c in control_commands(settings)
                        if c.scope == RUNAWAY and c.issuer == "operator:dashboard"
                    ],
                )
                assert mine[-1].action.value == "stop"
                assert mine[-1].reason == "browser test: runaway stopped by hand"
                verify_command(mine[-1], TEST_CONTROL_KEY.encode())

                refused_before = work.refused
                wait_for("the workload to be refused", lambda: work.refused > refused_before)
                work.steady.check_budget()  # the other agent goes on

                lags = sorted(page.evaluate("window.__agentledger.lags"))
                # Measured, not asserted (speed belongs to benchmarks); printed with -s.
                print(
                    f"\ndashboard: {len(lags)} snapshots drawn, age when drawn median "
                    f"{lags[len(lags) // 2]} ms, max {lags[-1]} ms; STOP click -> broker ack "
                    f"{published_s * 1000:.0f} ms, -> checked refused by the shim (on or after) "
                    f"{refused_s * 1000:.0f} ms, -> badge on the page {shown_s * 1000:.0f} ms"
                )
                page.locator("#audit li", has_text=f"operator:dashboard STOP {RUNAWAY}").wait_for(
                    timeout=60_000
                )
                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                ARTIFACTS.mkdir(exist_ok=True)
                shutil.copy(shot, ARTIFACTS / "dashboard.png")
            finally:
                browser.close()

            # Audited in ClickHouse with the operator as issuer.
            rows = wait_for("the audit row", lambda: audited(settings, "operator:dashboard"))
            assert rows == [["stop", True, "browser test: runaway stopped by hand"]]

            # The terminal view shows the same standing STOP.
            top = cli(settings, "top", "--once", "--sort", "spend")
            assert top.returncode == 0, top.stderr
            assert "dash-runaway" in top.stdout and "STOP" in top.stdout

            # The CLI lifts it; the agent calls again.
            resumed = cli(
                settings, "control", "resume", RUNAWAY, "--reason", "ok now", "--operator", "alice"
            )
            assert resumed.returncode == 0, resumed.stderr
            assert "RESUME for agent:dash-runaway" in resumed.stdout
            wait_for("the shim to allow the runaway again", lambda: not refused(), timeout_s=30)
            paused.join(60)
            assert not paused.is_alive() and pause_stats(ledger).resumed == 1
            calls_before = work.calls
            wait_for("the runaway to call again", lambda: work.calls > calls_before)
            rows = wait_for("the CLI's audit row", lambda: audited(settings, "operator:alice"))
            assert rows == [["resume", True, "ok now"]]
    finally:
        ledger.close()
