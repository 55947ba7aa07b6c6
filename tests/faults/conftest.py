"""Fixtures of the fault-injection suite (`make faults`): every test here is marked `faults`
and is not collected by a plain `pytest` (testpaths leave tests/faults out)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agentledger.config import Settings
from tests.faults.harness import FaultStack
from tests.integration.test_processor_worker import avoid_midnight
from tests.integration.test_producer_spool import private_broker

__all__ = ["fault_stack", "private_broker"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in item.nodeid:
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def fault_stack(stack_settings: Settings) -> Iterator[FaultStack]:
    """Processor and sink on the session broker; a test's events all fall on one UTC day
    except the deliberately late ones, so a run never straddles midnight."""
    avoid_midnight()
    stack = FaultStack(stack_settings)
    stack.up()
    try:
        yield stack
    finally:
        stack.down()
