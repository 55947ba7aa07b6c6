"""Named points where the fault tests make the data plane die, from an environment variable.

``AGENTLEDGER_FAILPOINTS=before_commit=kill@3`` sends SIGKILL to this process the 3rd time the
data plane reaches ``before_commit`` (its records produced and flushed, the transaction not
committed). Unset, every check is one dict lookup that finds nothing. The tests need the crash
at an exact step, which no external kill can hit reliably.
"""

from __future__ import annotations

import os
import signal

__all__ = ["FAILPOINTS_ENV", "Failpoints"]

FAILPOINTS_ENV = "AGENTLEDGER_FAILPOINTS"
ACTIONS = ("kill",)


class Failpoints:
    def __init__(self, spec: str | None = None) -> None:
        self._at: dict[str, int] = {}
        self._hits: dict[str, int] = {}
        spec = os.environ.get(FAILPOINTS_ENV, "") if spec is None else spec
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, rule = item.partition("=")
            action, _, count = rule.partition("@")
            if action not in ACTIONS or not count.isdigit() or int(count) < 1:
                raise ValueError(
                    f"{FAILPOINTS_ENV}: {item!r} is not NAME=kill@N with N >= 1 "
                    "(e.g. before_commit=kill@3)"
                )
            self._at[name] = int(count)

    @property
    def armed(self) -> bool:
        return bool(self._at)

    def hit(self, name: str) -> None:
        at = self._at.get(name)
        if at is None:
            return
        self._hits[name] = hits = self._hits.get(name, 0) + 1
        if hits >= at:
            os.kill(os.getpid(), signal.SIGKILL)
