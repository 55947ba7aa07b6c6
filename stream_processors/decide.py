"""Settle a scope's state: what to publish for it now, as records, with no I/O.

Both hops decide the same way: the faust hop (pools, workflows, task types) sends the records
with faust, the batch data plane (agents) writes them inside its Kafka transaction. So the
decision, the signing and the bookkeeping of what stands live here once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from agentledger.schemas import Alert, BudgetPolicy, ControlCommand, sign_command

from .decisions import evaluate
from .metrics import ProcessorMetrics
from .policies import PolicyBook
from .precedence import matching_policies
from .state import SpendState

__all__ = ["GOVERNING_CACHE_SIZE", "Decider", "Outgoing"]

log = logging.getLogger(__name__)

# Scopes whose governing policies are kept (an unbounded number of agents may come and go).
GOVERNING_CACHE_SIZE = 100_000


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One record to publish: a signed command or an alert."""

    topic: str
    key: bytes
    value: bytes
    alert: Alert | None = None
    command: ControlCommand | None = None


class Decider:
    """Derives commands and alerts from states against the policy book (one per thread: the
    governing cache is not shared)."""

    def __init__(
        self,
        book: PolicyBook,
        key: bytes,
        *,
        control_topic: str,
        alerts_topic: str,
        metrics: ProcessorMetrics,
        clock: Callable[[], int],
    ) -> None:
        self.book = book
        self._key = key
        self.control_topic = control_topic
        self.alerts_topic = alerts_topic
        self.metrics = metrics
        self.clock = clock
        self._governing_cache: dict[str, list[BudgetPolicy]] = {}
        self._governing_version: tuple[int, int] | None = None

    def governing(self, scope: str) -> list[BudgetPolicy]:
        """``matching_policies`` for ``scope``, kept until the policies change: matching every
        pattern against every key of every batch was a third of a decision."""
        book = self.book
        version = (id(book), book.version)
        if self._governing_version != version:
            self._governing_cache.clear()
            self._governing_version = version
        found = self._governing_cache.get(scope)
        if found is None:
            if len(self._governing_cache) >= GOVERNING_CACHE_SIZE:
                self._governing_cache.clear()
            found = self._governing_cache[scope] = matching_policies(book.policies.values(), scope)
        return found

    def settle(
        self, scope: str, state: SpendState, cause_ms: int | None = None
    ) -> tuple[SpendState, list[Outgoing]]:
        """The state with what is published recorded in it, and the records to publish.

        ``cause_ms``: the event time that led here, for the enforcement latency metric."""
        if not self.book.ready.is_set():
            return state, []  # a missing policy must not look like a lifted budget
        decision = evaluate(state, self.book.policies, scope, self.clock(), self.governing(scope))
        out: list[Outgoing] = []
        for alert in decision.alerts:
            out.append(self.alert(alert))
        if decision.alerted != state.alerted:
            state = replace(state, alerted=decision.alerted)
        for command in decision.subtree_commands:
            out.append(self.command(sign_command(command, self._key), cause_ms))
        if decision.subtrees != state.subtrees:
            state = replace(state, subtrees=decision.subtrees)
        if decision.command is None:
            return state, out
        signed = sign_command(decision.command, self._key)
        out.append(self.command(signed, cause_ms))
        return replace(state, last_command=signed), out

    def alert(self, alert: Alert) -> Outgoing:
        log.warning("alert for %s: %s", alert.scope, alert.message)
        self.metrics.alerts.labels(alert.kind.value).inc()
        return Outgoing(
            self.alerts_topic,
            alert.scope.encode(),
            alert.model_dump_json().encode(),
            alert=alert,
        )

    def command(self, command: ControlCommand, cause_ms: int | None) -> Outgoing:
        log.info("publishing %s for %s: %s", command.action.value, command.scope, command.reason)
        self.metrics.commands.labels(command.action.value).inc()
        if cause_ms is not None:
            self.metrics.enforcement.observe(max(self.clock() - cause_ms, 0) / 1000)
        return Outgoing(
            self.control_topic,
            command.scope.encode(),
            command.model_dump_json().encode(),
            command=command,
        )
