"""Integration fixtures: the whole stack (broker from the session, processor, sink and
dashboard as processes) on this test's topics."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agentledger.config import Settings
from agentledger.deploy.stack import Stack


@pytest.fixture
def stack(stack_settings: Settings) -> Iterator[Stack]:
    stack = Stack(stack_settings, progress=lambda _m: None, manage_kafka=False)
    try:
        stack.up(timeout_s=180)
        yield stack
    finally:
        stack.down()
