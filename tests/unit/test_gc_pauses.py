"""The collector watcher logs collections over its threshold, and only those."""

from __future__ import annotations

import gc
import logging

import pytest

from agentledger.gc_pauses import GcPauses


def test_a_collection_over_the_threshold_is_logged_with_its_generation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("test.gc")
    watcher = GcPauses(log, slow_s=0.0).install()
    try:
        with caplog.at_level(logging.INFO, logger="test.gc"):
            gc.collect(2)
    finally:
        watcher.uninstall()
    assert watcher.slow >= 1
    assert watcher.longest_s > 0
    assert any("generation 2" in r.getMessage() for r in caplog.records)


def test_collections_under_the_threshold_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    watcher = GcPauses(logging.getLogger("test.gc"), slow_s=3600.0).install()
    try:
        with caplog.at_level(logging.INFO, logger="test.gc"):
            gc.collect(2)
    finally:
        watcher.uninstall()
    assert watcher.slow == 0
    assert watcher.longest_s > 0  # it was timed
    assert not caplog.records
    assert watcher._on_gc not in gc.callbacks
