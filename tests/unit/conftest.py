"""Fixtures for unit tests that need a real (embedded) ClickHouse."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agentledger.sinks.database import ClickHouse
from agentledger.sinks.migrations import apply_migrations


@pytest.fixture
def db(tmp_path: Path) -> Iterator[ClickHouse]:
    """A migrated chDB in this test's temp dir; only one connection per path may be open."""
    database = ClickHouse.open(f"chdb://{tmp_path / 'ch'}")
    try:
        apply_migrations(database)
        yield database
    finally:
        database.close()
