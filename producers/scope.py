"""The task unit a call belongs to, carried in a context variable.

A ``contextvars.ContextVar`` follows the code that runs in it: asyncio tasks copy it when they
are created, and a thread started with ``contextvars.copy_context().run(...)`` (or an executor
given such a callable) sees the task that was current where it was submitted.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["TaskScope", "current_task"]


@dataclass(frozen=True, slots=True)
class TaskScope:
    agent_id: str
    task_type: str
    task_id: str


_CURRENT: ContextVar[TaskScope | None] = ContextVar("agentledger_task", default=None)


def current_task() -> TaskScope | None:
    """The innermost ``agent.task(...)`` block the caller runs in, if any."""
    return _CURRENT.get()
