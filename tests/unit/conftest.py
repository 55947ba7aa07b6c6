"""Unit-test fixtures: a real (embedded) ClickHouse, and the shim's in-memory harness."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agentledger.sinks.database import ClickHouse
from agentledger.sinks.migrations import apply_migrations
from tests.unit.test_producer_ledger import Harness


@pytest.fixture
def db(tmp_path: Path) -> Iterator[ClickHouse]:
    """A migrated chDB in this test's temp dir; only one connection per path may be open."""
    database = ClickHouse.open(f"chdb://{tmp_path / 'ch'}")
    try:
        apply_migrations(database)
        yield database
    finally:
        database.close()


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    """A ledger on an in-memory transport, a fake clock and locally applied commands."""
    return Harness(tmp_path)
