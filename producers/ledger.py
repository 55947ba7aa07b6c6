"""The shim's front door: ``Ledger`` -> ``AgentLedger`` -> ``with agent.call(...) as call``.

Each call emits one CallEvent to the calls topic (keyed by agent id) after the block, and is
refused with BudgetExceeded before the block when a signed STOP stands for one of its scopes.
Nothing here connects to Kafka until the first agent or call, and no broker problem ever raises
into the agent.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from contextvars import Token
from dataclasses import dataclass
from functools import lru_cache
from types import TracebackType
from typing import Any, Self

from pydantic import TypeAdapter, ValidationError

from agentledger.config import Settings
from agentledger.schemas import (
    HOLDER_HEADER,
    CallEvent,
    CallStatus,
    ControlAction,
    ControlCommand,
    dead_letter,
    nano_to_usd,
    subtree_scope,
    uuid7,
)
from agentledger.schemas.events import Identifier
from agentledger.schemas.topics import ALLOWANCE_PARTITIONS

from .allowance import Allowances, Lease, Shortfall, new_holder_id
from .allowance_kafka import AllowanceListener, KafkaRequestSender
from .budget_directory import BudgetDirectory
from .control import ControlState, KafkaControlListener
from .errors import (
    AllowanceRefused,
    BudgetExceeded,
    ControlPlaneUnavailable,
    NewWorkRefused,
    ThrottleTimeout,
    UnpricedModelWarning,
)
from .event_json import agent_fragment, call_event_json, event_id
from .linear_price import LinearPrices
from .pricing import Price, PriceOverride, Pricer
from .reservation import SpendBook
from .scope import _CURRENT, TaskScope
from .spool import Spool
from .throttle import Limits, SlotTable
from .transport import EventTransport, Headers, KafkaTransport

__all__ = [
    "AgentLedger",
    "AsyncCallRecorder",
    "CallRecorder",
    "Ledger",
    "TaskUnit",
    "wall_clock_ms",
]

log = logging.getLogger(__name__)

_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)
_MAX_TOKENS = 100_000_000
# A call waiting for an allowance answer re-checks this often.
_WAIT_SLICE_S = 0.05


STAT_NAMES = (
    "events",
    "unpriced",
    "refused",
    "refused_new_work",
    "throttled",
    "throttle_timeouts",
    "refused_local",
    "refused_allowance",
    "waited_allowance",
    "admitted_unlicensed",
    "refused_fail_closed",
    "routed",
    "bad_commands",
    "dead_lettered",
)

# Which standing command wins when several scopes have one: the narrowest first.
_SCOPE_ORDER = {"agent": 0, "subtree": 1, "task_type": 2, "workflow": 3, "pool": 4}


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@lru_cache(maxsize=4096)
def _is_identifier(value: str) -> bool:
    # Cached: the same few providers, models and ids come back on every call.
    try:
        _IDENTIFIER.validate_python(value)
    except ValidationError:
        return False
    return True


def _check_id(field: str, value: str) -> str:
    if isinstance(value, str) and _is_identifier(value):
        return value
    raise ValueError(
        f"{field} must be 1-200 characters from A-Z a-z 0-9 . _ : / @ + - (no spaces), "
        f"got {value!r}"
    )


def _check_optional_id(field: str, value: str | None) -> str | None:
    return None if value is None else _check_id(field, value)


def _check_tokens(field: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_TOKENS:
        raise ValueError(f"{field} must be an int from 0 to {_MAX_TOKENS:,}, got {value!r}")
    return value


class Ledger:
    """One per agent process (thread-safe); hands out ``AgentLedger`` handles."""

    def __init__(
        self,
        settings: Settings,
        *,
        transport: EventTransport | None = None,
        control: ControlState | None = None,
        clock: Callable[[], int] = wall_clock_ms,
        start_control_listener: bool = True,
        price_overrides: Mapping[str, PriceOverride] | None = None,
        throttle_max_wait_s: float | None = None,
        default_max_output_tokens: int = 4096,
        fail_closed_after_s: float | None = None,
        allowances: Allowances | None = None,
        budgets: BudgetDirectory | None = None,
        allowance_wait_s: float = 5.0,
    ) -> None:
        if fail_closed_after_s is not None and not fail_closed_after_s > 0:
            raise ValueError(
                f"fail_closed_after_s must be None (fail open) or > 0 seconds, "
                f"got {fail_closed_after_s!r}"
            )
        self.fail_closed_after_s = fail_closed_after_s
        self.default_max_output_tokens = _check_tokens(
            "default_max_output_tokens", default_max_output_tokens
        )
        if throttle_max_wait_s is not None and not throttle_max_wait_s >= 0:
            raise ValueError(
                f"throttle_max_wait_s must be None (wait as long as it takes) or >= 0 seconds, "
                f"got {throttle_max_wait_s!r}"
            )
        self.throttle_max_wait_s = throttle_max_wait_s
        self.settings = settings
        # Typed as librdkafka config, not as KafkaTransport's own keyword arguments.
        client_config: dict[str, Any] = settings.kafka_client_config()
        self.transport: EventTransport = (
            transport
            if transport is not None
            else KafkaTransport(
                settings.kafka,
                spool=Spool(settings.home / "spool"),
                **client_config,
            )
        )
        self._control = control
        self.clock = clock
        self._start_listener = start_control_listener
        self._pricer = Pricer(price_overrides)
        self._linear = LinearPrices(self._pricer)
        self._topics = settings.topics
        self._calls_topic = settings.topics.calls
        self._dlq_topic = settings.topics.dlq
        self._lock = threading.Lock()
        self._listener: KafkaControlListener | None = None
        self._closed = False
        if not allowance_wait_s >= 0:
            raise ValueError(f"allowance_wait_s must be >= 0 seconds, got {allowance_wait_s!r}")
        self.allowance_wait_s = allowance_wait_s
        #: Which scopes are budgeted (from the policies topic), and this process's allowances
        #: in them; both None-free once built. Without a broker (tests) they come injected.
        self.budgets = budgets if budgets is not None else BudgetDirectory()
        self.allowances = allowances
        if allowances is not None:
            self.budgets.on_change = allowances.policies_changed
        self._allowance_listener: AllowanceListener | None = None
        self._unlicensed_warned = False
        self._holder_headers: Headers | None = None
        self.slots = SlotTable()
        self.spend_book = SpendBook()
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        # A weak reference, so registering does not keep a dropped ledger alive.
        atexit.register(_close_at_exit, weakref.ref(self))

    @classmethod
    def from_env(cls, **kwargs: Any) -> Ledger:
        """A ledger configured from AGENTLEDGER_* environment variables."""
        return cls(Settings(), **kwargs)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def control(self) -> ControlState:
        # Built on first use: reading the key may create <home>/control.key, which must not
        # happen merely because a Ledger was constructed.
        state = self._control
        if state is None:
            with self._lock:
                if self._control is None:
                    self._control = ControlState.from_settings(self.settings)
                state = self._control
        return state

    @property
    def holder_headers(self) -> Headers | None:
        """The header naming this process on events of calls made under an allowance."""
        allowances = self.allowances
        if allowances is None:
            return None
        headers = self._holder_headers
        if headers is None:
            headers = self._holder_headers = [(HOLDER_HEADER, allowances.holder.encode())]
        return headers

    def _ensure_listener(self) -> KafkaControlListener | None:
        if not self._start_listener or self._closed:
            return self._listener
        if self._listener is None:
            state = self.control
            with self._lock:
                if self._listener is None and not self._closed:
                    self._listener = KafkaControlListener(self.settings, state)
                    self._listener.start()
                    self._start_allowances()
        return self._listener

    def _start_allowances(self) -> None:
        """Follow the policies and this process's answers, and send requests through the
        transport's producer (Kafka transports only). Called with the lock held."""
        produce = getattr(self.transport, "produce_now", None)
        if self.allowances is not None or produce is None:
            return
        sender = KafkaRequestSender(produce, self._topics.allowance_requests)
        self.allowances = Allowances(
            new_holder_id(),
            sender,
            reply_partitions=ALLOWANCE_PARTITIONS,
            clock_ms=self.clock,
            ttl_fallback_s=self.settings.allowance_ttl_s,
            policies_at=self.budgets.positions,
        )
        self.budgets.on_change = self.allowances.policies_changed
        self._allowance_listener = AllowanceListener(
            self.settings, self.budgets, self.allowances, sender
        )
        self._allowance_listener.start()
        self.allowances.start()

    def wait_for_control(self, timeout_s: float) -> bool:
        """Block until every control command that stood when listening began is known.

        Returns False on timeout (for example while the broker is down) or when no listener
        runs; calls then go ahead on what is known so far.
        """
        listener = self._ensure_listener()
        if listener is None:
            return False
        deadline = time.monotonic() + timeout_s
        if not listener.wait_caught_up(timeout_s):
            return False
        if self._allowance_listener is not None:
            left = max(deadline - time.monotonic(), 0.0)
            return self.budgets.loaded.wait(left) and self._allowance_listener.ready.wait(
                max(deadline - time.monotonic(), 0.0)
            )
        return True

    def agent(
        self,
        agent_id: str,
        *,
        workflow: str | None = None,
        pool: str | None = None,
        task_type: str | None = None,
    ) -> AgentLedger:
        handle = AgentLedger(
            self,
            agent_id=_check_id("agent_id", agent_id),
            workflow=_check_optional_id("workflow", workflow),
            pool=_check_optional_id("pool", pool),
            task_type=_check_optional_id("task_type", task_type),
        )
        self._ensure_listener()
        return handle

    def check_control_plane(self) -> None:
        """Fail-closed: raise ControlPlaneUnavailable once the control topic has not answered
        for ``fail_closed_after_s`` (fail-open, the default, never raises)."""
        limit = self.fail_closed_after_s
        if limit is None:
            return
        listener = self._ensure_listener()
        if listener is None:
            return
        silent = listener.unreachable_for_s()
        if silent > limit:
            self._count("refused_fail_closed")
            raise ControlPlaneUnavailable(
                "control-plane",
                f"the control topic has been unreachable for {silent:.1f}s "
                f"(fail-closed after {limit}s)",
            )

    def commands(self, scopes: tuple[str, ...]) -> list[ControlCommand]:
        """The unlapsed commands standing for ``scopes``, narrowest scope first."""
        state = self.control
        if not state.has_standing:  # the usual case, without the lock
            return []
        found = state.standing(scopes, now_ms=self.clock())
        if len(found) > 1:
            found.sort(key=lambda c: _SCOPE_ORDER.get(c.scope.partition(":")[0], 9))
        return found

    def standing_stop(self, scopes: tuple[str, ...]) -> ControlCommand | None:
        for command in self.commands(scopes):
            if command.action is ControlAction.STOP:
                return command
        return None

    def throttle_limit(self, command: ControlCommand) -> int | None:
        """A THROTTLE's concurrency, or None (counted as a bad command) when it has none."""
        raw = command.params.get("concurrency")
        try:
            limit = int(raw) if raw is not None else 0
        except ValueError:
            limit = 0
        if limit >= 1:
            return limit
        self._count("bad_commands")
        log.debug("agentledger: THROTTLE for %s without a concurrency >= 1", command.scope)
        return None

    def throttle_limits(self, commands: list[ControlCommand]) -> dict[str, int]:
        limits: dict[str, int] = {}
        for command in commands:
            if command.action is ControlAction.THROTTLE:
                limit = self.throttle_limit(command)
                if limit is not None:
                    limits[command.scope] = limit
        return limits

    def current_limits(self, scopes: tuple[str, ...]) -> dict[str, int]:
        return self.throttle_limits(self.control.standing(scopes, now_ms=self.clock()))

    def _count(self, stat: str) -> None:
        with self._lock:
            self.stats[stat] += 1

    def emit(self, fields: dict[str, Any], headers: Headers | None = None) -> CallEvent | None:
        """Validate and send one call; an event that does not validate goes to the dlq."""
        try:
            event = CallEvent(**fields)
        except ValidationError as exc:
            self._dead_letter(fields, exc)
            return None
        self.transport.send(
            self._calls_topic, event.agent_id.encode(), event.model_dump_json().encode(), headers
        )
        self._count("events")
        return event

    def emit_json(self, key: bytes, value: bytes, headers: Headers | None = None) -> None:
        """Send one call event already serialised by ``event_json.call_event_json``."""
        self.transport.send(self._calls_topic, key, value, headers)
        self._count("events")

    def _dead_letter(self, fields: dict[str, Any], exc: ValidationError) -> None:
        # Arguments are checked when the call starts and when usage is recorded, so this is a
        # shim bug; the record still reaches the dlq instead of vanishing.
        problems = exc.errors(include_url=False, include_input=False)
        reason = f"shim built an invalid CallEvent: {problems}"
        log.error("agentledger: %s", reason)
        payload = TypeAdapter(dict[str, Any]).dump_json(fields)
        record = dead_letter(
            topic=self._calls_topic,
            partition=0,
            offset=0,
            reason=reason,
            component="shim",
            detected_at_ms=max(self.clock(), 0),
            key=str(fields.get("agent_id", "")).encode(),
            payload=payload,
        )
        self.transport.send(self._dlq_topic, record.key, record.value)
        self._count("dead_lettered")

    def price(
        self,
        provider: str,
        model: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int,
        at_ms: int,
    ) -> Price:
        price = self._pricer.price(
            provider,
            model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
            at_ms=at_ms,
        )
        if not price.priced:
            self._count("unpriced")
        return price

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop listening, deliver queued events (waiting up to ``timeout_s``), close the
        transport. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listener = self._listener
        if listener is not None:
            # Only signalled here: its thread may be in a metadata request to a dead broker,
            # and ends while the transport closes (joined below), not before.
            listener.stop(timeout_s=0)
        allowances = self.allowances
        if allowances is not None:
            # Give back what is unused, before the transport closes: another process may
            # need it now rather than after the TTL.
            allowances.release_all()
            allowances.stop()
        allowance_listener = self._allowance_listener
        if allowance_listener is not None:
            allowance_listener.stop(timeout_s=0)
        # What is still queued after this, the transport's close spools or counts, and says.
        self.transport.flush(timeout_s)
        self.transport.close()
        if listener is not None:
            listener.stop()
        if allowance_listener is not None:
            allowance_listener.stop()


def _close_at_exit(ref: weakref.ref[Ledger]) -> None:
    ledger = ref()
    if ledger is not None:
        ledger.close()


@dataclass(frozen=True, slots=True)
class _AgentCache:
    identity: tuple[object, ...]
    key: bytes
    fragment: str | None
    """the event's agent fields as JSON text, or None when one does not validate"""
    scopes: dict[tuple[str | None, bool], tuple[str, ...]]


class AgentLedger:
    """One agent's identity: every call it records counts toward these scopes."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        agent_id: str,
        workflow: str | None,
        pool: str | None,
        task_type: str | None,
        parent_agent_id: str | None = None,
        spawn_depth: int = 0,
        ancestors: tuple[str, ...] = (),
    ) -> None:
        self.ledger = ledger
        self.agent_id = agent_id
        self.workflow = workflow
        self.pool = pool
        self.task_type = task_type
        self.parent_agent_id = parent_agent_id
        self.spawn_depth = spawn_depth
        #: The agents that spawned this one: parent first, as spawn() chained them.
        self.ancestors = ancestors
        self._cache = _AgentCache((), b"", None, {})

    def _cached(self) -> _AgentCache:
        """The per-agent caches, rebuilt should a caller reassign an attribute. Swapped in as
        one object, so a thread never sees a half-built one."""
        identity = (
            self.agent_id,
            self.pool,
            self.workflow,
            self.parent_agent_id,
            self.spawn_depth,
            self.ancestors,
        )
        cache = self._cache
        if identity != cache.identity:
            ids_ok = all(
                value is None or (isinstance(value, str) and _is_identifier(value))
                for value in identity[:4]
            )
            depth = self.spawn_depth
            depth_ok = type(depth) is int and 0 <= depth <= 1000
            cache = self._cache = _AgentCache(
                identity,
                str(self.agent_id).encode(),
                # None sends this agent's events through the validating path.
                agent_fragment(self.agent_id, self.pool, self.workflow, self.parent_agent_id, depth)
                if ids_ok and depth_ok
                else None,
                {},
            )
        return cache

    def spawn(
        self,
        agent_id: str,
        *,
        workflow: str | None = None,
        pool: str | None = None,
        task_type: str | None = None,
    ) -> AgentLedger:
        """A child agent: records this agent as its parent, one level deeper, and belongs to
        this agent's pool and workflow unless given others."""
        if self.spawn_depth >= 1000:
            raise ValueError(f"spawn depth is limited to 1000; {self.agent_id} is at 1000")
        return AgentLedger(
            self.ledger,
            agent_id=_check_id("agent_id", agent_id),
            workflow=_check_optional_id("workflow", workflow) or self.workflow,
            pool=_check_optional_id("pool", pool) or self.pool,
            task_type=_check_optional_id("task_type", task_type),
            parent_agent_id=self.agent_id,
            spawn_depth=self.spawn_depth + 1,
            ancestors=(self.agent_id, *self.ancestors),
        )

    def current_task(self) -> TaskScope | None:
        """The innermost running ``task()`` of this agent in the caller's context."""
        task = _CURRENT.get()
        return task if task is not None and task.agent_id == self.agent_id else None

    def _task_type(self, task_type: str | None) -> str | None:
        if task_type:
            return task_type
        task = self.current_task()
        return task.task_type if task is not None else self.task_type

    def scopes(self, task_type: str | None = None) -> tuple[str, ...]:
        task = self._task_type(task_type)
        known = self._cached().scopes
        # The subtrees this agent is in count only while a command stands for some subtree:
        # every scope costs each call a lookup, and an agent may have many ancestors.
        control = self.ledger._control
        subtrees = control is not None and control.has_subtree
        found = known.get((task, subtrees))
        if found is None:
            if len(known) >= 1024:  # task types are few; bound them anyway
                known.clear()
            found = known[(task, subtrees)] = self._build_scopes(task, subtrees)
        return found

    def _build_scopes(self, task: str | None, subtrees: bool = False) -> tuple[str, ...]:
        found = [f"agent:{self.agent_id}"]
        if self.pool:
            found.append(f"pool:{self.pool}")
        if self.workflow:
            found.append(f"workflow:{self.workflow}")
            if subtrees:
                found.extend(subtree_scope(self.workflow, a) for a in self.ancestors)
        if task:
            found.append(f"task_type:{task}")
        return tuple(found)

    def standing(self, task_type: str | None = None) -> list[ControlCommand]:
        """Every unlapsed command that stands for this agent's scopes, narrowest scope first."""
        return self.ledger.commands(self.scopes(task_type))

    def check_budget(self, task_type: str | None = None) -> None:
        """Raise BudgetExceeded if a STOP stands for any of this agent's scopes."""
        command = self.ledger.standing_stop(self.scopes(task_type))
        if command is not None:
            self.ledger._count("refused")
            raise BudgetExceeded.from_command(command)

    def model_for(self, task_type: str | None, default: str) -> str:
        """The model to call for ``default``: the target of the narrowest standing ROUTE from
        ``default`` (or from ``*``, every model) in this agent's scopes (with ``task_type``),
        else ``default`` itself."""
        return _route(self.ledger, self.standing(task_type), default)

    def task(self, task_type: str, task_id: str | None = None) -> TaskUnit:
        """A unit of work: calls inside the block carry ``task_type`` and ``task_id`` (a new
        uuid7 when not given). Entering it is refused with BudgetExceeded under a STOP and with
        NewWorkRefused under a REFUSE_NEW_WORK; calls in tasks already running go on."""
        return TaskUnit(
            self,
            _check_id("task_type", task_type),
            _check_optional_id("task_id", task_id),
        )

    def call(
        self,
        *,
        provider: str,
        model: str,
        task_type: str | None = None,
        attempt: int = 1,
        max_tokens: int | None = None,
        estimated_input_tokens: int = 0,
    ) -> CallRecorder:
        """One LLM call: ``with agent.call(...) as call: ... call.record(...)``.

        ``max_tokens`` (the output cap passed to the provider) and ``estimated_input_tokens``
        size the reservation checked against the processor's last spend report; without
        ``max_tokens`` the ledger's ``default_max_output_tokens`` is reserved."""
        if isinstance(attempt, bool) or not isinstance(attempt, int) or not 1 <= attempt <= 10_000:
            raise ValueError(f"attempt must be an int from 1 to 10,000, got {attempt!r}")
        task = self.current_task()
        task_type = _check_optional_id("task_type", task_type)
        return CallRecorder(
            self,
            provider=_check_id("provider", provider),
            model=_check_id("model", model),
            task_type=task_type or (task.task_type if task else None) or self.task_type,
            task_id=task.task_id if task is not None else None,
            attempt=attempt,
            max_tokens=None if max_tokens is None else _check_tokens("max_tokens", max_tokens),
            estimated_input_tokens=_check_tokens("estimated_input_tokens", estimated_input_tokens),
        )

    def record_finished(
        self,
        *,
        provider: str,
        model: str,
        started_ms: int,
        ended_ms: int,
        requested_model: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cached_input_tokens: int = 0,
        reasoning_tokens: int = 0,
        status: CallStatus | str = CallStatus.OK,
        error_type: str | None = None,
        task_type: str | None = None,
        attempt: int = 1,
    ) -> CallEvent | None:
        """Record a call that already ran (for callbacks such as LiteLLM's), priced at
        ``model`` and timed by the given UTC milliseconds; returns the event sent.

        Nothing is enforced: the money is spent, and refusing now would only lose the record.
        The cost still counts toward this process's unconfirmed spend in its scopes."""
        for name, value in (("started_ms", started_ms), ("ended_ms", ended_ms)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int of UTC milliseconds >= 0, got {value!r}")
        call = self.call(
            provider=provider,
            model=requested_model or model,
            task_type=task_type,
            attempt=attempt,
        )
        call.record(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
            reasoning_tokens=reasoning_tokens,
            status=status,
            error_type=error_type,
            used_model=model,
        )
        call._finish_unadmitted(started_ms, max(ended_ms, started_ms))
        return call.event

    def acall(
        self,
        *,
        provider: str,
        model: str,
        task_type: str | None = None,
        attempt: int = 1,
        max_tokens: int | None = None,
        estimated_input_tokens: int = 0,
    ) -> AsyncCallRecorder:
        """``call()`` for coroutines: ``async with agent.acall(...) as call``; a THROTTLE
        wait yields to the event loop instead of blocking it."""
        return AsyncCallRecorder(
            self.call(
                provider=provider,
                model=model,
                task_type=task_type,
                attempt=attempt,
                max_tokens=max_tokens,
                estimated_input_tokens=estimated_input_tokens,
            )
        )


def _route(ledger: Ledger, commands: list[ControlCommand], model: str) -> str:
    for command in commands:
        if command.action is ControlAction.ROUTE and command.params.get("from") in (model, "*"):
            target = command.params.get("to")
            if isinstance(target, str) and _is_identifier(target):
                return target
            ledger._count("bad_commands")
    return model


class TaskUnit:
    """``with agent.task("summarize") as task:``; ``task.task_id`` names the unit."""

    def __init__(self, agent: AgentLedger, task_type: str, task_id: str | None) -> None:
        self._agent = agent
        self.task_type = task_type
        self.task_id = task_id
        self._token: Token[TaskScope | None] | None = None

    def __enter__(self) -> Self:
        agent, ledger = self._agent, self._agent.ledger
        ledger.check_control_plane()
        for command in agent.standing(self.task_type):
            if command.action is ControlAction.STOP:
                ledger._count("refused")
                raise BudgetExceeded.from_command(command)
        for command in agent.standing(self.task_type):
            if command.action is ControlAction.REFUSE_NEW_WORK:
                ledger._count("refused_new_work")
                raise NewWorkRefused.from_command(command)
        if self.task_id is None:
            self.task_id = str(uuid7())
        self._token = _CURRENT.set(TaskScope(agent.agent_id, self.task_type, self.task_id))
        return self

    def __exit__(self, *_: object) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None


class CallRecorder:
    """The context manager of one LLM call; ``record()`` its usage inside the block.

    ``model`` is the model to actually call (a standing ROUTE may have replaced the requested
    one, kept in ``requested_model``)."""

    # One is built per LLM call: slots make that and every attribute access cheaper.
    __slots__ = (
        "_agent",
        "_budgeted",
        "_deadline",
        "_event",
        "_event_json",
        "_held",
        "_leases",
        "_reported",
        "_scopes",
        "_started_ms",
        "_valid_ids",
        "attempt",
        "cached_input_tokens",
        "cost_nano_usd",
        "error_type",
        "estimated_input_tokens",
        "input_tokens",
        "max_tokens",
        "model",
        "output_tokens",
        "provider",
        "reasoning_tokens",
        "requested_model",
        "reserved_nano_usd",
        "status",
        "task_id",
        "task_type",
        "used_model",
    )

    def __init__(
        self,
        agent: AgentLedger,
        *,
        provider: str,
        model: str,
        task_type: str | None,
        attempt: int,
        task_id: str | None = None,
        max_tokens: int | None = None,
        estimated_input_tokens: int = 0,
    ) -> None:
        self._agent = agent
        self.provider = provider
        self.requested_model = model
        self.model = model
        self.used_model = model
        self.task_type = task_type
        self.task_id = task_id
        self.attempt = attempt
        self.input_tokens = 0
        self.output_tokens = 0
        self.cached_input_tokens = 0
        self.reasoning_tokens = 0
        self.status: CallStatus = CallStatus.OK
        self.error_type: str | None = None
        self.cost_nano_usd = 0
        """the cost of the event emitted when the block ended"""
        self._event: CallEvent | None = None
        self._event_json: bytes | None = None
        self._started_ms: int | None = None
        self._held = False
        self.max_tokens = max_tokens
        self.estimated_input_tokens = estimated_input_tokens
        self.reserved_nano_usd = 0
        """the estimated maximum cost reserved when the call started"""
        self._scopes: tuple[str, ...] = ()
        self._leases: tuple[Lease, ...] = ()
        self._reported = 0  # the part of the reservation booked against spend reports
        # The identifiers as checked on the way in (call(), record(), a ROUTE); the event
        # skips re-checking them unless an attribute was reassigned since.
        self._valid_ids = (provider, model, model, task_type, task_id)

    @property
    def event(self) -> CallEvent | None:
        """The event emitted when the block ended (None before, or when it was dead-lettered);
        parsed from the bytes sent, on first access."""
        if self._event is None and self._event_json is not None:
            self._event = CallEvent.model_validate_json(self._event_json)
        return self._event

    def record(
        self,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cached_input_tokens: int = 0,
        reasoning_tokens: int = 0,
        status: CallStatus | str | None = None,
        error_type: str | None = None,
        used_model: str | None = None,
    ) -> None:
        """Set this call's usage (a later call replaces an earlier one).

        ``input_tokens`` is every prompt token, cached ones included; ``output_tokens`` includes
        the reasoning tokens, as the providers bill them. ``used_model`` is the model that
        actually served the call when the provider routed it elsewhere.
        """
        cached, reasoning = cached_input_tokens, reasoning_tokens
        # One inline test for the usual case (this runs on every call); the helper names the
        # field that is wrong.
        if not (
            type(input_tokens) is int
            and type(output_tokens) is int
            and type(cached) is int
            and type(reasoning) is int
            and 0 <= input_tokens <= _MAX_TOKENS
            and 0 <= output_tokens <= _MAX_TOKENS
            and cached >= 0
            and reasoning >= 0
        ):
            input_tokens = _check_tokens("input_tokens", input_tokens)
            output_tokens = _check_tokens("output_tokens", output_tokens)
            cached = _check_tokens("cached_input_tokens", cached)
            reasoning = _check_tokens("reasoning_tokens", reasoning)
        if cached > input_tokens:
            raise ValueError(
                f"cached_input_tokens ({cached}) is part of input_tokens ({input_tokens}) and "
                "cannot exceed it: pass the total prompt tokens as input_tokens"
            )
        if reasoning > output_tokens:
            raise ValueError(
                f"reasoning_tokens ({reasoning}) is part of output_tokens ({output_tokens}) and "
                "cannot exceed it: pass the total completion tokens as output_tokens"
            )
        if status is not None:
            try:
                self.status = CallStatus(status)
            except ValueError:
                allowed = ", ".join(s.value for s in CallStatus)
                raise ValueError(f"status must be one of {allowed}, got {status!r}") from None
        if error_type is not None:
            if not isinstance(error_type, str) or len(error_type) > 200:
                raise ValueError(
                    f"error_type must be a string of at most 200 characters, got {error_type!r:.60}"
                )
            self.error_type = error_type
        if used_model is not None:
            self.used_model = _check_id("used_model", used_model)
            self._valid_ids = (*self._valid_ids[:2], self.used_model, *self._valid_ids[3:])
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.cached_input_tokens = cached
        self.reasoning_tokens = reasoning

    def _admit(self) -> Limits:
        """Refuse under a STOP, apply a ROUTE; return the THROTTLE limits of the scopes."""
        agent = self._agent
        ledger = agent.ledger
        if ledger.fail_closed_after_s is not None:
            ledger.check_control_plane()
        scopes = self._scopes = agent.scopes(self.task_type)
        commands = ledger.commands(scopes)
        if not commands:
            return {}
        for command in commands:
            if command.action is ControlAction.STOP:
                ledger._count("refused")
                raise BudgetExceeded.from_command(command)
        routed = _route(ledger, commands, self.requested_model)
        if routed != self.requested_model:
            ledger._count("routed")
            self.model = self.used_model = routed
            self._valid_ids = (*self._valid_ids[:2], routed, *self._valid_ids[3:])
        return ledger.throttle_limits(commands)

    def _timeout(self, scope: str) -> ThrottleTimeout:
        ledger = self._agent.ledger
        ledger._count("throttle_timeouts")
        found = [
            c
            for c in ledger.control.standing((scope,), now_ms=ledger.clock())
            if c.action is ControlAction.THROTTLE
        ]
        limit = ledger.current_limits((scope,)).get(scope)
        base = BudgetExceeded.from_command(found[0]) if found else None
        return ThrottleTimeout(
            scope,
            f"no slot of {limit} concurrent calls freed up within {ledger.throttle_max_wait_s}s",
            limit_usd=base.limit_usd if base else None,
            spend_usd=base.spend_usd if base else None,
            resets_at_ms=base.resets_at_ms if base else None,
            period=base.period if base else None,
        )

    def _refresher(self) -> Callable[[], Limits]:
        ledger, scopes = self._agent.ledger, self._scopes
        return lambda: ledger.current_limits(scopes)

    def __enter__(self) -> Self:
        limits = self._admit()
        ledger = self._agent.ledger
        if ledger.slots.try_acquire(self._scopes, limits) is not None:
            ledger._count("throttled")
            full = ledger.slots.acquire(self._scopes, self._refresher(), ledger.throttle_max_wait_s)
            if full is not None:
                raise self._timeout(full)
        self._held = True
        shortfall = self._reserve()
        while shortfall is not None:
            if shortfall.waiting:
                ledger.allowances.wait_answer(shortfall.scope, _WAIT_SLICE_S)  # type: ignore[union-attr]
            else:
                time.sleep(_WAIT_SLICE_S)  # others hold the rest: they may give it back
            shortfall = self._retry_allowance(shortfall)
        self._started_ms = ledger.clock()
        return self

    async def _enter_async(self) -> Self:
        limits = self._admit()
        ledger = self._agent.ledger
        if ledger.slots.try_acquire(self._scopes, limits) is not None:
            ledger._count("throttled")
            full = await ledger.slots.acquire_async(
                self._scopes, self._refresher(), ledger.throttle_max_wait_s
            )
            if full is not None:
                raise self._timeout(full)
        self._held = True
        shortfall = self._reserve()
        while shortfall is not None:
            # Never block the event loop waiting for an answer.
            await asyncio.sleep(0.005 if shortfall.waiting else _WAIT_SLICE_S)
            shortfall = self._retry_allowance(shortfall)
        self._started_ms = ledger.clock()
        return self

    def _amount(self, now: int) -> int:
        """The call's estimated maximum cost: ``max_tokens`` (or the default) of output plus
        ``estimated_input_tokens`` of input."""
        ledger = self._agent.ledger
        output = (
            self.max_tokens if self.max_tokens is not None else ledger.default_max_output_tokens
        )
        rates = ledger._linear.rates(self.provider, self.model)
        if rates is not None:
            return ledger._linear.cost(rates, self.estimated_input_tokens, output, 0)
        return ledger._pricer.price(
            self.provider,
            self.model,
            input_tokens=self.estimated_input_tokens,
            output_tokens=output,
            cached_input_tokens=0,
            at_ms=now,
        ).cost_nano_usd

    def _reserve(self) -> Shortfall | None:
        """Reserve the call's estimated maximum cost: from this process's allowances in its
        budgeted scopes, then against the processor's last spend reports. Returns a shortfall
        to wait on (the caller waits, then :meth:`_retry_allowance`), or raises."""
        ledger = self._agent.ledger
        allowances = ledger.allowances
        if allowances is not None:
            budgets = ledger.budgets
            if not budgets.loaded.is_set():
                # Before the policies are known every scope looks unbudgeted; a runaway that
                # starts at once must not pass that gap unbounded.
                budgets.loaded.wait(ledger.allowance_wait_s)
            if not budgets.empty:
                budgeted = budgets.budgeted(self._scopes)
                if budgeted:
                    self._deadline = time.monotonic() + ledger.allowance_wait_s
                    self._budgeted = budgeted
                    self.reserved_nano_usd = self._amount(ledger.clock())
                    shortfall = self._retry_allowance(None)
                    if shortfall is not None:
                        ledger._count("waited_allowance")
                    return shortfall
        self._reserve_reported()
        return None

    def _retry_allowance(self, last: Shortfall | None) -> Shortfall | None:
        """One attempt at the allowances; None once admitted (then the report check runs)."""
        ledger = self._agent.ledger
        allowances = ledger.allowances
        assert allowances is not None
        amount = self.reserved_nano_usd
        result = allowances.reserve(self._budgeted, amount)
        if isinstance(result, tuple):
            self._leases = result
            self._reserve_reported(amount)
            return None
        past_deadline = time.monotonic() >= self._deadline
        silent = allowances.silent_for(result.scope)
        answering = silent < ledger.allowance_wait_s
        # Refused, or waited out while the processor answers: a refusal. Other processes
        # holding the rest may give it back, so their case waits until the deadline.
        if answering and (past_deadline or not (result.waiting or result.others_hold)):
            self.reserved_nano_usd = 0
            ledger._count("refused_allowance")
            self._release()
            raise AllowanceRefused(
                result.scope,
                result.refused
                or f"no allowance for {nano_to_usd(amount)} USD within "
                f"{ledger.allowance_wait_s}s: other processes hold the rest",
                limit_usd=None
                if result.limit_nano_usd is None
                else nano_to_usd(result.limit_nano_usd),
                spend_usd=None
                if result.spend_nano_usd is None
                else nano_to_usd(result.spend_nano_usd),
                resets_at_ms=result.until_ms,
            )
        if not answering:
            # No answer: the control plane is unreachable (or the processor is down).
            if ledger.fail_closed_after_s is not None:
                self.reserved_nano_usd = 0
                self._release()
                ledger._count("refused_fail_closed")
                raise ControlPlaneUnavailable(
                    result.scope,
                    f"no allowance answer for {silent:.1f}s (fail-closed)",
                )
            ledger._count("admitted_unlicensed")
            if not ledger._unlicensed_warned:
                ledger._unlicensed_warned = True
                log.warning(
                    "agentledger: no allowance answer for %s within %.1fs; calls go ahead "
                    "without one (fail-open) until the processor answers. Check that the "
                    "processor runs (agentledger status), or set fail_closed_after_s.",
                    result.scope,
                    ledger.allowance_wait_s,
                )
            self._reserve_reported(amount)
            return None
        return result

    def _reserve_reported(self, amount: int | None = None) -> None:
        ledger = self._agent.ledger
        control = ledger.control
        if not control.has_reports:
            return
        now = ledger.clock()
        reports: dict[str, tuple[int, int, int]] = {}
        for scope in self._scopes:
            report = control.report(scope, now)
            if report is not None and report.spend_nano_usd is not None:
                limit = report.limit_nano_usd
                if limit is not None:
                    reports[scope] = (report.spend_nano_usd, limit, report.issued_at_ms)
        if not reports:
            return
        if amount is None:
            amount = self._amount(now)
        refusal = ledger.spend_book.reserve(self._scopes, reports, amount, now)
        if refusal is None:
            self.reserved_nano_usd = self._reported = amount
            return
        ledger._count("refused_local")
        self._give_back()
        self._release()
        report = control.report(refusal.scope, now)
        raise BudgetExceeded(
            refusal.scope,
            f"local reservation: {nano_to_usd(refusal.reserved_nano_usd)} USD for this call "
            f"would pass the limit",
            limit_usd=nano_to_usd(refusal.limit_nano_usd),
            spend_usd=nano_to_usd(refusal.committed_nano_usd),
            resets_at_ms=None if report is None else report.until_ms,
        )

    def _give_back(self) -> None:
        """Undo the allowance reservation of a call refused after taking it."""
        leases, self._leases = self._leases, ()
        allowances = self._agent.ledger.allowances
        if leases and allowances is not None:
            allowances.settle(leases, self.reserved_nano_usd, 0)
        self.reserved_nano_usd = 0

    def _release(self) -> None:
        if self._held:
            self._held = False
            self._agent.ledger.slots.release(self._scopes)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._emit(exc_type)
        finally:
            self._release()
            if self._started_ms is not None:
                ledger = self._agent.ledger
                leases = self._leases
                if leases:
                    ledger.allowances.settle(  # type: ignore[union-attr]
                        leases, self.reserved_nano_usd, self.cost_nano_usd
                    )
                    self._leases = ()
                ledger.spend_book.settle(
                    self._scopes, self._reported, self.cost_nano_usd, ledger.clock()
                )
                self.reserved_nano_usd = 0
                self._reported = 0

    def _finish_unadmitted(self, started_ms: int, ended_ms: int) -> None:
        ledger = self._agent.ledger
        self._scopes = self._agent.scopes(self.task_type)
        self._started_ms = started_ms
        self._emit(None, ended_ms)
        ledger.spend_book.settle(self._scopes, 0, self.cost_nano_usd, ledger.clock())

    def _emit(self, exc_type: type[BaseException] | None, ended_ms: int | None = None) -> None:
        if self._started_ms is None:
            return
        ledger = self._agent.ledger
        if exc_type is not None:
            # A status the agent recorded itself (timeout, rate_limited) says more than "error".
            if self.status is CallStatus.OK:
                self.status = CallStatus.ERROR
            if self.error_type is None:
                self.error_type = exc_type.__name__[:200]
        if ended_ms is None:
            ended_ms = ledger.clock()
        started = self._started_ms
        provider, used = self.provider, self.used_model
        inp, out, cached = self.input_tokens, self.output_tokens, self.cached_input_tokens
        linear = ledger._linear
        rates = linear.rates(provider, used)
        problem: str | None = None
        version: str | None
        if rates is not None and type(inp) is int and type(out) is int and type(cached) is int:
            # Flat rates: the exact integer cost, without Decimal arithmetic.
            cost, priced, version = linear.cost(rates, inp, out, cached), True, rates.version
        else:
            price = ledger.price(
                provider,
                used,
                input_tokens=inp,
                output_tokens=out,
                cached_input_tokens=cached,
                at_ms=started,
            )
            cost, priced, version, problem = (
                price.cost_nano_usd,
                price.priced,
                price.pricing_version,
                price.problem,
            )
        agent = self._agent
        latency = ended_ms - started if ended_ms > started else 0
        data = None
        task_type, task_id, requested = self.task_type, self.task_id, self.requested_model
        known = agent._cached()
        fragment = known.fragment
        if (
            fragment is not None
            and 0 <= started < 1 << 48
            and (
                (provider, requested, used, task_type, task_id) == self._valid_ids
                or (
                    _is_identifier(provider)
                    and _is_identifier(requested)
                    and _is_identifier(used)
                    and (task_type is None or _is_identifier(task_type))
                    and (task_id is None or _is_identifier(task_id))
                )
            )
        ):
            data = call_event_json(
                event_id(started),
                started,
                fragment,
                task_type,
                task_id,
                provider,
                requested,
                used,
                inp,
                out,
                cached,
                self.reasoning_tokens,
                cost,
                priced,
                version,
                latency,
                self.status,
                self.attempt,
                self.error_type,
            )
        headers = ledger.holder_headers if self._leases else None
        if data is not None:
            ledger.emit_json(known.key, data, headers)
            self._event_json = data
            self.cost_nano_usd = cost
        else:
            # Something the plain path does not vouch for: validate, send or dead-letter.
            self._event = ledger.emit(
                {
                    # A clock outside uuid7's range makes the event invalid (dlq), not the call
                    # fail.
                    "event_id": uuid7(started) if 0 <= started < 1 << 48 else uuid7(),
                    "event_time_ms": started,
                    "agent_id": agent.agent_id,
                    "pool": agent.pool,
                    "workflow_id": agent.workflow,
                    "parent_agent_id": agent.parent_agent_id,
                    "spawn_depth": agent.spawn_depth,
                    "task_type": self.task_type,
                    "task_id": self.task_id,
                    "provider": self.provider,
                    "requested_model": self.requested_model,
                    "used_model": self.used_model,
                    "input_tokens": self.input_tokens,
                    "output_tokens": self.output_tokens,
                    "cached_input_tokens": self.cached_input_tokens,
                    "reasoning_tokens": self.reasoning_tokens,
                    "cost_nano_usd": cost,
                    "priced": priced,
                    "pricing_version": version,
                    "latency_ms": latency,
                    "status": self.status,
                    "attempt": self.attempt,
                    "error_type": self.error_type,
                },
                headers,
            )
            if self._event is not None:
                self.cost_nano_usd = self._event.cost_nano_usd
        if not priced:
            # After the event is sent, so an agent that turns warnings into errors still has
            # the call on record.
            warnings.warn(
                f"no price known for model {self.used_model!r} of provider {self.provider!r}: "
                f"the call is recorded with priced=False and cost 0 ({problem})",
                UnpricedModelWarning,
                stacklevel=3,
            )


class AsyncCallRecorder:
    """``async with agent.acall(...) as call``: yields the underlying ``CallRecorder``."""

    def __init__(self, recorder: CallRecorder) -> None:
        self.recorder = recorder

    async def __aenter__(self) -> CallRecorder:
        return await self.recorder._enter_async()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.recorder.__exit__(exc_type, exc, tb)
