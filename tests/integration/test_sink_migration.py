"""A rebuild of the rollups in the real sink process over 300k stored calls, while events keep
arriving through the real broker: killed with -9 in the middle of its backfill, restarted, it
resumes and ends with every rollup equal to what `calls` gives (tests/unit/test_sink_migration.py
covers each kind of interruption in-process)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from agentledger.config import Settings
from agentledger.review.query import QueryClient, QueryError
from agentledger.sinks.database import ClickHouse
from agentledger.sinks.migrations import apply_migrations
from agentledger.sinks.rebuild import progress_lines
from tests.integration.rebuild_sink import REBUILD_VERSION
from tests.integration.test_sink_service import SinkProcess, wait_for
from tests.unit.test_sink_migration import assert_rollups_exact, generate_history, live_event

pytestmark = pytest.mark.integration

HISTORY = 300_000
_PROGRESS = re.compile(
    rf"migration {REBUILD_VERSION} rebuilding calls_by_minute, calls_by_hour, calls_by_day, "
    r"workflows_by_minute, workflows_by_hour, workflows_by_day: (\d+)% "
    r"\(([\d.]+k?) of ([\d.]+k) rows, (\d+) of (\d+) ranges\)"
)


class Traffic:
    """Produces live events (every 40th a spool replay of an earlier one) until stopped."""

    def __init__(self, settings: Settings, rate: int = 400) -> None:
        self.settings = settings
        self.rate = rate
        self.sent: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        producer = Producer({"bootstrap.servers": self.settings.kafka, "linger.ms": 5})
        while not self.stop.wait(0.05):
            for _ in range(self.rate // 20):
                n = len(self.sent)
                value = self.sent[n // 2] if n % 40 == 39 else live_event(n)
                self.sent.append(value)
                producer.produce(self.settings.topics.calls, value=value, key=b"k")
            producer.poll(0)
        assert producer.flush(30) == 0

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(timeout=60)
        return len(set(self.sent))


@pytest.fixture
def sink(stack_settings: Settings, tmp_path: Path) -> Iterator[SinkProcess]:
    process = SinkProcess(
        stack_settings,
        tmp_path / "sink.log",
        module="tests.integration.rebuild_sink",
        # 15 ranges of 20k calls: the kill lands between two of them, or inside one.
        extra_env={"AGENTLEDGER_SINK_MIGRATION_RANGE_ROWS": "20000"},
    )
    try:
        yield process
    finally:
        process.kill()


def _progress(client: QueryClient) -> tuple[int, int] | None:
    """(ranges done, ranges planned) of the rebuild while it backfills."""
    try:
        lines = progress_lines(client.query)
    except QueryError:
        return None
    found = [m for line in lines if (m := _PROGRESS.fullmatch(line))]
    return (int(found[0].group(4)), int(found[0].group(5))) if found else None


def _count(client: QueryClient, sql: str) -> int:
    return int(str(client.query(sql).rows[0][0]))


def test_a_rebuild_killed_mid_backfill_resumes_and_every_rollup_is_exact(
    sink: SinkProcess,
) -> None:
    settings = sink.settings
    (settings.home / "clickhouse").mkdir(parents=True, exist_ok=True)
    database = ClickHouse.open(settings.clickhouse_dsn)
    try:
        apply_migrations(database)
        generate_history(database, HISTORY)
    finally:
        database.close()

    traffic = Traffic(settings)
    traffic.thread.start()
    sink.start()
    client = QueryClient.from_settings(settings)
    done, planned = wait_for(
        lambda: (p := _progress(client)) is not None and p[0] >= 3 and p, "3 ranges backfilled"
    )
    assert planned >= 15 and done < planned
    during = _count(client, "SELECT count() FROM calls")
    sink.kill()

    sink.start()
    wait_for(
        lambda: _count(client, "SELECT max(version) FROM schema_migrations") == REBUILD_VERSION,
        "the rebuild swapped in after the restart",
        timeout_s=300,
    )
    assert progress_lines(client.query) == []
    # Resumed, not restarted: the first fence (snapshot, new views) was passed once only.
    assert sink.log_path.read_text().count(f"migration {REBUILD_VERSION}: fence passed") == 1
    unique = traffic.finish()
    assert during > HISTORY, "nothing was ingested while the rebuild ran"
    wait_for(
        lambda: _count(client, "SELECT uniqExact(event_id) FROM calls") == HISTORY + unique,
        "every live event stored",
    )
    assert _count(client, "SELECT count() FROM calls") == HISTORY + unique
    assert_rollups_exact(client.query)
    health = sink.health() or {}
    assert int(str(health.get("duplicates_skipped", 0))) > 0
