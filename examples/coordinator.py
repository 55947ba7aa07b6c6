"""An example coordinator: hands queued tasks to agents through the cost-aware router, and
reacts to the control and alerts topics.

- Control (signed commands, through the shim's Ledger): a task whose agent is stopped or
  refuses new work is requeued to the agent the router picks now; a task whose only allowed
  agents are throttled is deprioritised (pushed back) instead of piling onto them.
- Alerts (``<prefix>alerts``, unsigned, so only ever used to be more careful): a task type or
  agent with a recent alert is served in budget mode, even when the task asked for speed.

Run it against the local stack (``agentledger up``); it simulates the agents' LLM calls through
the shim, so the processor's stats and budgets apply to them:

    .venv/bin/python examples/coordinator.py --tasks 60 --mode speed
"""

from __future__ import annotations

import argparse
import collections
import heapq
import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_END, Consumer, KafkaError, TopicPartition
from pydantic import ValidationError

from agentledger.config import Settings
from agentledger.producers import Ledger, Router, RoutingDecision, RoutingPolicy
from agentledger.producers.routing import Evidence
from agentledger.schemas import Alert

__all__ = ["AlertWatcher", "Coordinator", "Dispatch", "Task", "main"]

log = logging.getLogger("coordinator")

# How long an alert keeps its scope in budget mode.
ALERT_HOLD_MS = 10 * 60_000
# A deprioritised task goes this many places back per deferral, and is given up after this many.
DEFER_PENALTY = 10
MAX_DEFERRALS = 5


@dataclass(order=True)
class Task:
    priority: int
    seq: int
    task_id: str = field(compare=False)
    task_type: str = field(compare=False)
    mode: str = field(compare=False, default="budget")
    agent: str | None = field(compare=False, default=None)
    deferrals: int = field(compare=False, default=0)


@dataclass(frozen=True)
class Dispatch:
    """What the coordinator did with one task."""

    task: Task
    action: str  # "run", "requeued", "deferred", "dropped"
    agent: str | None
    decision: RoutingDecision
    learning: str | None = None  # why the task went to a candidate still being learned

    def describe(self) -> str:
        head = f"{self.task.task_id} [{self.task.task_type}] {self.action}"
        target = f" -> {self.agent}" if self.agent else ""
        why = self.decision.reasons[0] if self.decision.reasons else ""
        if self.learning:
            why = f"{self.learning}; router: {why}"
        return f"{head}{target}: {why}"


class AlertWatcher:
    """Follows the alerts topic from its end (only new alerts matter) on a daemon thread."""

    def __init__(self, settings: Settings, clock: Callable[[], int]) -> None:
        self._topic = settings.topics.alerts
        self._clock = clock
        self._config = {
            "bootstrap.servers": settings.kafka,
            "group.id": f"coordinator-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
        self._lock = threading.Lock()
        self._latest: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def note(self, alert: Alert) -> None:
        with self._lock:
            self._latest[alert.scope] = max(self._latest.get(alert.scope, 0), alert.issued_at_ms)

    def alerted(self, scopes: Sequence[str]) -> list[str]:
        """The scopes among ``scopes`` with an alert in the last ALERT_HOLD_MS."""
        now = self._clock()
        with self._lock:
            return [s for s in scopes if now - self._latest.get(s, -ALERT_HOLD_MS) < ALERT_HOLD_MS]

    def _run(self) -> None:
        consumer = Consumer(self._config)
        try:
            meta = consumer.list_topics(self._topic, timeout=10).topics.get(self._topic)
            partitions = list(meta.partitions) if meta is not None and meta.partitions else []
            consumer.assign([TopicPartition(self._topic, p, OFFSET_END) for p in partitions])
            while not self._stop.is_set():
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("alerts: %s", err)
                    continue
                try:
                    self.note(Alert.model_validate_json(msg.value() or b""))
                except ValidationError as exc:
                    log.warning("alerts: ignoring an invalid alert: %s", exc.error_count())
        finally:
            consumer.close()


class Coordinator:
    """A priority queue of tasks, and the candidate agents per task type."""

    def __init__(
        self,
        router: Router,
        agents: dict[str, list[str]],
        alerts: AlertWatcher | None = None,
    ) -> None:
        self.router = router
        self.agents = agents
        self.alerts = alerts
        self._queue: list[Task] = []
        self._seq = itertools.count()
        # Tasks handed to each agent by this coordinator, for the learning phase (see next).
        self._sent: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._queue)

    def submit(
        self, task_type: str, *, mode: str = "budget", priority: int = 0, agent: str | None = None
    ) -> Task:
        """Queue a task; ``agent`` is the one it was meant for (it moves if the router
        prefers another now)."""
        if task_type not in self.agents:
            raise ValueError(f"no agents for task type {task_type!r}; known: {sorted(self.agents)}")
        task = Task(
            priority, next(self._seq), f"task-{uuid.uuid4().hex[:8]}", task_type, mode, agent
        )
        heapq.heappush(self._queue, task)
        return task

    def _requeue(self, task: Task, penalty: int) -> None:
        task.priority += penalty
        task.seq = next(self._seq)
        heapq.heappush(self._queue, task)

    def next(self) -> Dispatch | None:
        """Decide the most urgent task: run it on an agent, requeue or defer it."""
        if not self._queue:
            return None
        task = heapq.heappop(self._queue)
        candidates = self.agents[task.task_type]
        mode = task.mode
        if self.alerts is not None and mode != "budget":
            scopes = [f"task_type:{task.task_type}", *(f"agent:{a}" for a in candidates)]
            if self.alerts.alerted(scopes):
                mode = "budget"  # an alert on the way: be careful with money
        decision = self.router.choose(task.task_type, candidates, mode)
        chosen = decision.chosen
        learning = self._to_learn(decision)
        if learning is not None:
            chosen = learning
        throttled_only = chosen is not None and any(
            "throttled" in r for c in decision.candidates if c.name == chosen for r in c.reasons
        )
        if chosen is None or throttled_only:
            if task.deferrals >= MAX_DEFERRALS:
                return Dispatch(task, "dropped", None, decision)
            task.deferrals += 1
            self._requeue(task, DEFER_PENALTY)
            return Dispatch(task, "deferred", None, decision)
        action = "run" if task.agent in (None, chosen) else "requeued"
        task.agent = chosen
        self._sent[chosen] += 1
        note = None
        if learning is not None:
            note = (
                f"learning {chosen}: {self._sent[chosen]} of "
                f"{self.router.policy.min_samples} tasks sent while its evidence is thin"
            )
        return Dispatch(task, action, chosen, decision, note)

    def _to_learn(self, decision: RoutingDecision) -> str | None:
        """The allowed candidate with thin evidence that this coordinator has sent the fewest
        tasks, while that is under the router's min_samples; None once every candidate has
        had its share. Without this, whichever candidate's stats arrive first is chosen from
        then on, and the other is seen only through the router's rare exploration."""
        thin = [
            c.name
            for c in decision.candidates
            if c.allowed
            and c.evidence is not Evidence.ENOUGH
            and self._sent[c.name] < self.router.policy.min_samples
        ]
        return min(thin, key=lambda name: self._sent[name]) if thin else None


def _simulate(ledger: Ledger, agent_id: str, task: Task, model: str, delay_s: float) -> None:
    agent = ledger.agent(agent_id, pool="coordinated")
    with agent.task(task.task_type, task.task_id), agent.call(provider="openai", model=model) as c:
        time.sleep(delay_s)
        c.record(input_tokens=random.randrange(500, 2000), output_tokens=300)  # noqa: S311


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--mode", choices=["budget", "speed", "balanced"], default="budget")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings()
    # Simulated service times: the cheaper model is the slower one here.
    models = {"writer-mini": ("gpt-4o-mini", 0.10), "writer-4o": ("gpt-4o", 0.04)}
    with Ledger(settings) as ledger, Router(ledger, policy=RoutingPolicy(min_samples=10)) as router:
        ledger.wait_for_control(10)
        router.wait_for_stats(10)
        alerts = AlertWatcher(settings, ledger.clock)
        alerts.start()
        coordinator = Coordinator(router, {"draft": list(models)}, alerts)
        for _ in range(args.tasks):
            coordinator.submit("draft", mode=args.mode)
        done = 0
        while (dispatch := coordinator.next()) is not None:
            log.info(dispatch.describe())
            if dispatch.agent is not None:
                model, delay = models[dispatch.agent]
                _simulate(ledger, dispatch.agent, dispatch.task, model, delay)
                done += 1
            elif dispatch.action == "deferred":
                time.sleep(0.2)  # let a throttle or a stop lapse before trying again
        alerts.stop()
        log.info("%d of %d tasks run", done, args.tasks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
