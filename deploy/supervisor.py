"""`agentledger supervise`: keep the local stack running.

Every few seconds it looks at each component of the stack `agentledger up` started: the broker
processes (when the stack runs them), and each worker's pid and /health on 127.0.0.1. The
decisions (restart now? how long to back off?) are deploy/supervision.py's; this module
observes, acts and logs. It binds nothing: it only connects to the components on loopback.

A component stopped on purpose (`agentledger down`, Stack.stop_service) is left alone; `down`
stops the supervisor before the components.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType

from agentledger.config import Settings

from .kafka_broker import BrokerError, KafkaBroker
from .stack import Stack, StackError
from .supervision import Observation, Policy, Restart, Step, Track, decide

__all__ = ["Supervisor", "run_supervisor"]

Progress = Callable[[str], None]
Clock = Callable[[], float]


def _log(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"{stamp} {message}", file=sys.stderr, flush=True)


class Supervisor:
    """One supervisor over one stack. ``check`` is one round; ``run`` repeats it."""

    def __init__(
        self,
        stack: Stack,
        policy: Policy,
        *,
        clock: Clock = time.monotonic,
        progress: Progress = _log,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.stack = stack
        self.policy = policy
        self.clock = clock
        self.progress = progress
        self.stop_timeout_s = stop_timeout_s
        self.tracks: dict[str, Track] = {}
        # One object per broker for the supervisor's lifetime: it holds the process handle of
        # a broker it restarts, so the process is reaped rather than leaked.
        self.brokers: dict[str, KafkaBroker] = {}
        if stack.manages_kafka:
            nodes = stack.cluster.brokers
            for i, broker in enumerate(nodes):
                self.brokers["kafka" if len(nodes) == 1 else f"kafka-{i + 1}"] = broker

    def observe(self) -> list[Observation]:
        seen = [
            # A broker counts as healthy while its process runs: a broker that is slow to
            # answer is still electing or recovering, and restarting it would only set it back.
            Observation(name, running, running, detail="" if running else "not running")
            for name, broker in self.brokers.items()
            for running in [broker.running_pid() is not None]
        ]
        for service in self.stack.services:
            name = service.name
            if self.stack.stopped_on_purpose(name):
                seen.append(Observation(name, False, False, stopped_on_purpose=True))
                continue
            if self.stack.pid_of(name) is None:
                seen.append(Observation(name, False, False, answered=False, detail="not running"))
                continue
            answered, healthy, detail = self.stack.probe(name)
            seen.append(Observation(name, True, healthy, answered=answered, detail=detail))
        return seen

    def check(self) -> Step:
        step = decide(self.policy, self.tracks, self.observe(), self.clock())
        self.tracks = step.tracks
        restarting = {r.name for r in step.restarts}
        for seen in step.turned_unhealthy:
            if seen.name in restarting:
                continue  # the restart line says why
            if seen.running:
                self.progress(
                    f"{seen.name} unhealthy ({seen.detail}); restarting it unless it recovers "
                    f"within {self.policy.grace_s:g}s"
                )
            else:
                self.progress(f"{seen.name} exited; restarting it once its backoff has passed")
        for name in step.turned_healthy:
            # A broker is watched by its process only (see observe).
            self.progress(f"{name} {'running' if name in self.brokers else 'healthy'}")
        for restart in step.restarts:
            self._restart(restart)
        return step

    def _restart(self, restart: Restart) -> None:
        name = restart.name
        broker = self.brokers.get(name)
        log = broker.log_file if broker is not None else self.stack.log_file(name)
        self.progress(
            f"restarting {name} (restart {restart.attempt} in a row): {restart.reason}; "
            f"its log: {log}"
        )
        try:
            if broker is not None:
                broker.launch(self.progress)
            else:
                self.stack.restart_service(
                    name, stop=restart.stop.value, timeout_s=self.stop_timeout_s
                )
        except (OSError, StackError, BrokerError) as exc:
            self.progress(
                f"could not restart {name}: {exc}; trying again in {restart.next_wait_s:.0f}s"
            )
            return
        if restart.attempt >= 3:
            self.progress(
                f"{name} keeps failing ({restart.attempt} restarts in a row, next one waits "
                f"{restart.next_wait_s:.0f}s): read {log} for the cause; `agentledger down` "
                "stops the stack and this supervisor"
            )

    def run(self, every_s: float, stop: threading.Event) -> None:
        while not stop.is_set():
            self.check()
            stop.wait(every_s)


def run_supervisor(settings: Settings, progress: Progress = _log) -> int:
    """The foreground loop of `agentledger supervise` (also what `up --supervise` runs in the
    background), until SIGTERM or Ctrl-C. Returns the exit code."""
    stack = Stack(settings, progress)
    if not stack.shape_recorded():
        raise StackError(
            f"nothing to supervise: no stack was started under {stack.home}; start one with "
            "`agentledger up --supervise` (or `agentledger up`, then `agentledger supervise`)"
        )
    other = stack.supervisor_pid()
    if other is not None and other != os.getpid():
        raise StackError(
            f"a supervisor already watches this stack (pid {other}); `agentledger status` "
            "shows it, `agentledger down` stops it with the stack"
        )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stack.supervisor_pid_file.write_text(f"{os.getpid()}\n")
    policy = Policy.from_settings(settings)
    progress(
        f"supervising {stack.home} (pid {os.getpid()}): a check every "
        f"{settings.supervise_every_s:g}s; a component that exits is restarted, one whose "
        f"/health fails for {policy.grace_s:g}s too (new ones get {policy.start_grace_s:g}s to "
        f"start), backing off up to {policy.backoff_max_s:g}s. `agentledger down` stops it"
    )
    try:
        Supervisor(stack, policy, progress=progress).run(settings.supervise_every_s, stop)
    finally:
        if stack.supervisor_pid_file_names_me():
            stack.supervisor_pid_file.unlink(missing_ok=True)
        progress("supervisor stopped; the components keep running")
    return 0
