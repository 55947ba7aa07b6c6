"""The shim's allowances against the processor's real grant core, behind an in-memory channel:
local admission, the bound for many threads, refusals, fail-open and fail-closed, renewals,
idle and closing returns, and what unbudgeted scopes cost (nothing)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.producers import (
    AllowanceRefused,
    BudgetExceeded,
    ControlPlaneUnavailable,
    ControlState,
    InMemoryTransport,
    Ledger,
)
from agentledger.producers.allowance import Allowances
from agentledger.producers.budget_directory import BudgetDirectory
from agentledger.schemas import (
    AllowanceKind,
    AllowanceRequest,
    BudgetPolicy,
    CallEvent,
    Period,
    usd_to_nano,
)
from agentledger.stream_processors.allowances import grant_allowance
from agentledger.stream_processors.fold import SpendFold
from agentledger.stream_processors.precedence import matching_policies
from agentledger.stream_processors.state import SpendState
from tests.conftest import TEST_CONTROL_KEY

HEADER = "agentledger-holder"
# gpt-4o-mini: 1,000 output tokens = $0.0006
COST = usd_to_nano(Decimal("0.0006"))


class Authority:
    """The processor's grant core (stream_processors/allowances.py) for one scope state per
    scope, answering requests from a thread, and counting the calls the shim emits (with their
    holder header) into those states, a few at a time, as a lagging processor would."""

    def __init__(self, transport: InMemoryTransport, policies: list[BudgetPolicy]) -> None:
        self.transport = transport
        self.policies = policies
        self.states: dict[str, SpendState] = {}
        self.requests: list[AllowanceRequest] = []
        self._pending: list[AllowanceRequest] = []
        self._lock = threading.Lock()
        self._seen = 0
        self.silent = False
        self.allowances: Allowances | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._offset = 0

    def send(self, request: AllowanceRequest) -> bool:
        with self._lock:
            self.requests.append(request)
            if not self.silent:
                self._pending.append(request)
        return True

    def now(self) -> int:
        return time.time_ns() // 1_000_000

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.count_events()
            with self._lock:
                pending, self._pending = self._pending, []
            for request in pending:
                state = self.states.get(request.scope, SpendState())
                governing = matching_policies(self.policies, request.scope)
                state, grant = grant_allowance(state, request, governing, self.now(), ttl_ms=30_000)
                self.states[request.scope] = state
                assert self.allowances is not None
                self.allowances.on_grant(grant)

    def count_events(self) -> None:
        messages = self.transport.messages[self._seen :]
        headers = self.transport.headers[self._seen : self._seen + len(messages)]
        self._seen += len(messages)
        for (_, _, value), header in zip(messages, headers, strict=True):
            event = CallEvent.model_validate_json(value)
            holder = dict(header or {}).get(HEADER)
            self._offset += 1
            for scope in (f"agent:{event.agent_id}", f"pool:{event.pool}"):
                state = self.states.get(scope, SpendState())
                fold = SpendFold(state, now_ms=self.now())
                fold.add_cost(
                    event_id=event.event_id.hex,
                    event_time_ms=event.event_time_ms,
                    cost_nano_usd=event.cost_nano_usd,
                    partition=0,
                    offset=self._offset,
                    holder=None if holder is None else bytes(holder).decode(),
                )
                self.states[scope] = fold.result()

    def start(self, allowances: Allowances) -> None:
        self.allowances = allowances
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


class Rig:
    def __init__(self, tmp_path: Path, policies: list[BudgetPolicy], **ledger_options: object):
        self.transport = InMemoryTransport()
        self.authority = Authority(self.transport, policies)
        self.directory = BudgetDirectory()
        for policy in policies:
            self.directory.apply(policy.key.encode(), policy.model_dump_json().encode())
        self.directory.loaded.set()
        self.allowances = Allowances(
            "holder-1",
            self.authority.send,
            reply_partitions=6,
            clock_ms=self.authority.now,
        )
        settings = Settings(
            home=tmp_path / "home", topic_prefix="unit.", control_key=SecretStr(TEST_CONTROL_KEY)
        )
        self.ledger = Ledger(
            settings,
            transport=self.transport,
            control=ControlState(TEST_CONTROL_KEY.encode()),
            start_control_listener=False,
            allowances=self.allowances,
            budgets=self.directory,
            **ledger_options,  # type: ignore[arg-type]
        )
        self.authority.start(self.allowances)
        self.allowances.start()

    def spent(self) -> int:
        return sum(
            CallEvent.model_validate_json(v).cost_nano_usd for _, _, v in self.transport.messages
        )

    def close(self) -> None:
        self.ledger.close()
        self.authority.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made: list[Rig] = []

    def make(limit: str = "0.06", **options: object) -> Rig:
        policy = BudgetPolicy(scope="agent:a", period=Period.DAY, limit_usd=Decimal(limit))
        made.append(Rig(tmp_path / str(len(made)), [policy], **options))
        return made[-1]

    yield make  # type: ignore[misc]
    for one in made:
        one.close()


def one_call(agent, output: int = 1000) -> None:  # type: ignore[no-untyped-def]
    with agent.call(provider="openai", model="gpt-4o-mini", max_tokens=output) as call:
        call.record(input_tokens=0, output_tokens=output)


def test_calls_are_admitted_against_the_allowance_and_refused_at_the_limit(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    agent = r.ledger.agent("a")
    with pytest.raises(AllowanceRefused) as refused:
        for _ in range(1000):
            one_call(agent)
    # $0.06 / $0.0006 = exactly 100 calls fit; not one more.
    assert r.spent() == usd_to_nano(Decimal("0.06"))
    assert len(r.transport.messages) == 100
    stop = refused.value
    assert isinstance(stop, BudgetExceeded)
    assert stop.scope == "agent:a"
    assert stop.limit_usd == Decimal("0.06")
    assert stop.resets_at_ms is not None
    assert "allowance refused" in str(stop)
    assert r.ledger.stats["refused_allowance"] == 1


def test_sixteen_threads_never_pass_the_limit(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig(limit="0.3")
    agent = r.ledger.agent("a")
    refusals: list[BaseException] = []

    def work() -> None:
        try:
            while True:
                one_call(agent)
        except AllowanceRefused as exc:
            refusals.append(exc)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(refusals) == 16
    assert r.spent() <= usd_to_nano(Decimal("0.3"))
    # Nothing is stranded by the fair-share sizing: every call that fit was made.
    assert r.spent() == usd_to_nano(Decimal("0.3"))


def test_steady_callers_ask_rarely(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig(limit="100")
    agent = r.ledger.agent("a")
    for _ in range(3000):
        one_call(agent)
    asked = [q for q in r.authority.requests if q.kind is AllowanceKind.ACQUIRE]
    assert len(asked) < 3000 / 100


def test_an_unbudgeted_scope_asks_for_nothing(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    one_call(r.ledger.agent("someone-else"))
    assert r.authority.requests == []
    assert r.transport.headers == [None]


def test_an_unanswered_request_fails_open_after_the_wait(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig(allowance_wait_s=0.3)
    r.authority.silent = True
    one_call(r.ledger.agent("a"))
    assert r.ledger.stats["admitted_unlicensed"] == 1
    assert len(r.transport.messages) == 1


def test_an_unanswered_request_fails_closed_when_asked_to(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig(allowance_wait_s=0.3, fail_closed_after_s=5)
    r.authority.silent = True
    with pytest.raises(ControlPlaneUnavailable):
        one_call(r.ledger.agent("a"))
    assert r.transport.messages == []


def test_events_name_their_holder_and_close_gives_the_rest_back(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig(limit="10")
    one_call(r.ledger.agent("a"))
    assert r.transport.headers == [[(HEADER, b"holder-1")]]
    r.ledger.close()
    release = r.authority.requests[-1]
    assert release.kind is AllowanceKind.RELEASE
    (claim,) = release.claims
    assert claim.used_nano_usd == COST


def test_async_calls_wait_for_the_first_grant(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    agent = r.ledger.agent("a")

    async def main() -> None:
        async with agent.acall(provider="openai", model="gpt-4o-mini", max_tokens=1000) as call:
            call.record(output_tokens=1000)

    asyncio.run(main())
    assert r.spent() == COST
    assert r.ledger.stats["waited_allowance"] == 1


def test_a_request_says_how_far_its_holder_read_the_policies() -> None:
    """The processor answers a request only under the policies its holder had read: after a
    lowered limit, the RELEASE asking afresh carries the position of the record that lowered
    it (set before the change is announced)."""
    sent: list[AllowanceRequest] = []

    def send(request: AllowanceRequest) -> bool:
        sent.append(request)
        return True

    directory = BudgetDirectory()
    now = time.time_ns() // 1_000_000
    allowances = Allowances(
        "holder-p",
        send,
        reply_partitions=6,
        clock_ms=lambda: now,
        policies_at=directory.positions,
    )
    directory.on_change = allowances.policies_changed
    policy = BudgetPolicy(scope="agent:a", period=Period.DAY, limit_usd=Decimal("1"))
    directory.apply(policy.key.encode(), policy.model_dump_json().encode(), partition=0, offset=4)
    assert directory.positions() == {0: 5}
    assert not isinstance(allowances.reserve(("agent:a",), COST), tuple)
    (first,) = sent
    assert (first.kind, first.policies_at, first.schema_version) == (
        AllowanceKind.ACQUIRE,
        {0: 5},
        2,
    )
    _, answer = grant_allowance(SpendState(), first, [policy], now, ttl_ms=30_000)
    allowances.on_grant(answer)
    assert isinstance(allowances.reserve(("agent:a",), COST), tuple)
    lowered = BudgetPolicy(scope="agent:a", period=Period.DAY, limit_usd=Decimal("0.5"))
    directory.apply(lowered.key.encode(), lowered.model_dump_json().encode(), partition=0, offset=9)
    # A record on another partition that changes nothing still moves the position on.
    directory.apply(lowered.key.encode(), lowered.model_dump_json().encode(), partition=1, offset=2)
    release = sent[-1]
    assert release.kind is AllowanceKind.RELEASE
    assert release.policies_at == {0: 10}
    assert directory.positions() == {0: 10, 1: 3}


def test_a_version_1_request_is_still_read_but_cannot_carry_positions() -> None:
    old = AllowanceRequest.model_validate_json(
        '{"schema_version": 1, "holder": "h", "seq": 1, "scope": "agent:a",'
        ' "reply_partition": 0, "sent_at_ms": 5}'
    )
    assert old.policies_at == {}
    with pytest.raises(ValueError, match="policies_at needs schema_version 2"):
        AllowanceRequest(
            schema_version=1,
            holder="h",
            seq=1,
            scope="agent:a",
            reply_partition=0,
            sent_at_ms=5,
            policies_at={0: 3},
        )
    with pytest.raises(ValueError, match="partitions and offsets are >= 0"):
        AllowanceRequest(
            holder="h", seq=1, scope="agent:a", reply_partition=0, sent_at_ms=5, policies_at={0: -1}
        )
