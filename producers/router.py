"""The shim-side router: which agent or model should take a task, under the constraint of
the moment (``budget``, ``speed`` or ``balanced``).

```python
router = Router(ledger)
decision = router.choose("summarize", ["summarizer-small", "summarizer-large"], mode="budget")
target = decision.chosen  # None with status insufficient_evidence / none_allowed
print(decision.explain())
```

It reads the stats the processor keeps on the compacted stats topic (a daemon thread started
on first use, like the control listener) and the commands standing in the ledger's control
state: a STOP or REFUSE_NEW_WORK on a candidate's scopes excludes it, a THROTTLE ranks it
after the others, and a candidate whose expected cost per success exceeds what a reported
budget has left is excluded. The decision logic itself is in routing.py.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from agentledger.schemas import ControlAction, StatsSummary, TaskStats, summarize
from agentledger.schemas.stats import stats_group

from .control import KafkaControlListener
from .ledger import AgentLedger, Ledger, _check_id, _check_optional_id
from .routing import (
    CandidateView,
    DecisionStatus,
    Mode,
    RandomSource,
    RoutingDecision,
    RoutingPolicy,
    decide,
)

__all__ = [
    "Candidate",
    "DecisionStatus",
    "Mode",
    "Router",
    "RoutingDecision",
    "RoutingPolicy",
    "StatsBook",
]

log = logging.getLogger(__name__)


class StatsBook:
    """The latest partial stats per stats-topic key. Thread-safe: the listener writes, the
    router reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[str, dict[int, TaskStats]] = {}
        self.metrics = {"accepted": 0, "rejected_invalid": 0, "stale": 0}

    def apply(self, value: bytes, /) -> bool:
        try:
            stats = TaskStats.model_validate_json(value)
        except ValidationError as exc:
            with self._lock:
                self.metrics["rejected_invalid"] += 1
            log.warning(
                "agentledger: ignoring malformed stats record: %s",
                exc.errors(include_url=False, include_input=False),
            )
            return False
        return self.add(stats)

    def add(self, stats: TaskStats) -> bool:
        """Keep ``stats`` unless the same partial is already known at a later offset."""
        group = stats_group(stats.subject, stats.task_type)
        with self._lock:
            partials = self._groups.setdefault(group, {})
            known = partials.get(stats.source_partition)
            if known is not None and known.source_offset > stats.source_offset:
                self.metrics["stale"] += 1
                return False
            partials[stats.source_partition] = stats
            self.metrics["accepted"] += 1
        return True

    def summary(self, subject: str, task_type: str | None) -> StatsSummary | None:
        with self._lock:
            partials = list(self._groups.get(stats_group(subject, task_type), {}).values())
        return summarize(partials)


@dataclass(frozen=True)
class Candidate:
    """An agent (with the pool and workflow its work counts toward) or a model."""

    id: str
    kind: Literal["agent", "model"] = "agent"
    pool: str | None = None
    workflow: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("agent", "model"):
            raise ValueError(f"Candidate kind must be 'agent' or 'model', got {self.kind!r}")
        _check_id(f"{self.kind} id", self.id)
        _check_optional_id("pool", self.pool)
        _check_optional_id("workflow", self.workflow)

    @property
    def subject(self) -> str:
        return f"{self.kind}:{self.id}"


class Router:
    """Chooses among candidates with the processor's stats and the ledger's control state."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        policy: RoutingPolicy | None = None,
        stats: StatsBook | None = None,
        rng: RandomSource | None = None,
        start_listener: bool = True,
    ) -> None:
        self.ledger = ledger
        self.policy = policy or RoutingPolicy()
        self.stats = stats if stats is not None else StatsBook()
        self.rng: RandomSource = rng if rng is not None else random.Random()  # noqa: S311 - exploration, not security
        self._start_listener = start_listener
        self._listener: KafkaControlListener | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _ensure_listener(self) -> KafkaControlListener | None:
        if not self._start_listener or self._closed:
            return self._listener
        with self._lock:
            if self._listener is None and not self._closed:
                settings = self.ledger.settings
                self._listener = KafkaControlListener(
                    settings,
                    self.stats,
                    topic=settings.topics.stats,
                    **{"client.id": "agentledger-shim-stats"},
                )
                self._listener.start()
        return self._listener

    def wait_for_stats(self, timeout_s: float) -> bool:
        """Block until every stats record published before listening began is known."""
        listener = self._ensure_listener()
        return listener is not None and listener.wait_caught_up(timeout_s)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            listener = self._listener
        if listener is not None:
            listener.stop()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def choose(
        self,
        task_type: str | None,
        candidates: Sequence[str | Candidate],
        mode: Mode | str = Mode.BUDGET,
        *,
        kind: Literal["agent", "model"] = "agent",
        caller: AgentLedger | None = None,
    ) -> RoutingDecision:
        """Choose one of ``candidates`` (ids of ``kind``, or Candidate objects) for a task of
        ``task_type``. For models, ``caller`` is the agent that will make the call: its scopes
        are the ones checked for commands and remaining budget."""
        try:
            mode = Mode(mode)
        except ValueError:
            allowed = ", ".join(m.value for m in Mode)
            raise ValueError(f"mode must be one of {allowed}, got {mode!r}") from None
        task_type = _check_optional_id("task_type", task_type)
        items = [c if isinstance(c, Candidate) else Candidate(c, kind) for c in candidates]
        self._ensure_listener()
        views = [self._view(c, task_type, caller) for c in items]
        return decide(task_type, views, mode, self.policy, self.ledger.clock(), self.rng)

    def _scopes(
        self, candidate: Candidate, task_type: str | None, caller: AgentLedger | None
    ) -> tuple[str, ...]:
        if candidate.kind == "model":
            if caller is not None:
                return caller.scopes(task_type)
            return (f"task_type:{task_type}",) if task_type else ()
        found = [f"agent:{candidate.id}"]
        if candidate.pool:
            found.append(f"pool:{candidate.pool}")
        workflow = candidate.workflow or (caller.workflow if caller is not None else None)
        if workflow:
            found.append(f"workflow:{workflow}")
        if task_type:
            found.append(f"task_type:{task_type}")
        return tuple(found)

    def _view(
        self, candidate: Candidate, task_type: str | None, caller: AgentLedger | None
    ) -> CandidateView:
        ledger = self.ledger
        scopes = self._scopes(candidate, task_type, caller)
        blocked: list[str] = []
        throttled: list[str] = []
        for command in ledger.commands(scopes):
            action = command.action
            if action is ControlAction.STOP:
                blocked.append(f"STOP on {command.scope}: {command.reason}")
            elif action is ControlAction.REFUSE_NEW_WORK:
                blocked.append(f"refusing new work on {command.scope}: {command.reason}")
            elif action is ControlAction.THROTTLE:
                limit = command.params.get("concurrency")
                throttled.append(f"throttled to {limit} concurrent calls on {command.scope}")
            elif (
                action is ControlAction.ROUTE
                and candidate.kind == "model"
                and command.params.get("from") in (candidate.id, "*")
            ):
                blocked.append(
                    f"ROUTE on {command.scope} sends {candidate.id} calls to "
                    f"{command.params.get('to')}"
                )
        remaining, scope = self._remaining(scopes)
        return CandidateView(
            name=candidate.id,
            stats=self.stats.summary(candidate.subject, task_type),
            blocked=tuple(blocked),
            throttled=tuple(throttled),
            remaining_nano_usd=remaining,
            remaining_scope=scope,
        )

    def _remaining(self, scopes: Iterable[str]) -> tuple[int | None, str | None]:
        """The least budget left over ``scopes`` that reported spend and limit, counting this
        process's spend the report cannot include yet."""
        ledger = self.ledger
        control = ledger.control
        if not control.has_reports:
            return None, None
        now = ledger.clock()
        least: tuple[int | None, str | None] = (None, None)
        for scope in scopes:
            report = control.report(scope, now)
            if report is None or report.spend_nano_usd is None or report.limit_nano_usd is None:
                continue
            unconfirmed = ledger.spend_book.unconfirmed(scope, report.issued_at_ms, now)
            left = report.limit_nano_usd - report.spend_nano_usd - unconfirmed
            if least[0] is None or left < least[0]:
                least = (left, scope)
        return least
