"""The shim's side of allowances: admit each call locally against what the processor granted.

Per budgeted scope this process holds one allowance per budget instance (a policy's current
period): ``granted`` (cumulative, from the processor's signed answers) and ``used`` (the
actual cost of its ended calls plus the reservations of its running ones). A call goes ahead
only when its reservation fits in ``granted - used`` of every budget of every budgeted scope it
counts toward; that check is local, so admission costs no round trip. A background thread
asks for more ahead of time, renews what is in use, and gives back what sits idle.

Only the answer to this process's latest request for a scope is applied, so an answer that
arrives late (or twice, after a processor restart) never raises what the processor holds for
it above what it granted.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from agentledger.schemas import (
    AllowanceGrant,
    AllowanceKind,
    AllowanceRequest,
    BudgetClaim,
)
from agentledger.schemas.partitioning import crc32_partition

__all__ = [
    "Allowances",
    "Lease",
    "Shortfall",
    "new_holder_id",
]

log = logging.getLogger(__name__)

# Ask for this long of recent spend at a time, and for at least this many reservations, so a
# steady caller asks about once per hundreds of calls while the budget is plentiful.
HORIZON_S = 2.0
CALLS_AHEAD = 256
# Ask again ahead of time once less than this share of the last want is left.
LOW_WATER = 0.5
# An unanswered request may be sent again after this long.
ASK_TIMEOUT_S = 1.0
# Allowances in use are renewed once less than this share of their TTL is left.
RENEW_AT = 0.5
# An allowance no call has reserved from for this long is given back.
IDLE_S = 10.0
TICK_S = 0.1
MIN_ASK_GAP_S = 0.02


def new_holder_id() -> str:
    """A holder id unique to this process: host, pid and a random tail."""
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:60]
    return f"{host or 'host'}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Lease:
    """This process's allowance in one budget instance of one scope."""

    __slots__ = ("budget", "granted", "limit", "outstanding", "spend", "until_ms", "used")

    def __init__(self, budget: str) -> None:
        self.budget = budget
        self.granted = 0
        self.used = 0
        self.limit = 0
        self.spend = 0
        self.outstanding = 0  # every holder's, this one's included, when last answered
        self.until_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Shortfall:
    """Why a reservation was not admitted in ``scope``."""

    scope: str
    waiting: bool
    """True while an answer may still change it; False once the processor refused"""
    refused: str | None
    others_hold: bool
    """other processes held allowances in the scope when it last answered: they may give
    them back (or lose them to expiry), so waiting may still help"""
    limit_nano_usd: int | None
    spend_nano_usd: int | None
    until_ms: int | None


class _Book:
    """One budgeted scope: its leases and the state of its requests."""

    __slots__ = (
        "answered",
        "answered_at",
        "answered_need",
        "asked_at",
        "asked_need",
        "burn",
        "burn_since",
        "last_use",
        "leases",
        "need",
        "refused",
        "scope",
        "sent_at",
        "seq",
        "silent_since",
        "ttl_s",
        "unbudgeted",
        "valid_until",
        "want",
    )

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.leases: dict[str, Lease] = {}
        self.seq = 0  # the latest request sent
        self.answered = 0  # the seq of the latest answer applied
        self.asked_at: float | None = None  # monotonic time of the unanswered request
        self.sent_at: dict[int, float] = {}
        self.valid_until = 0.0  # monotonic; leases are usable until then
        self.last_use = 0.0
        self.refused: str | None = None
        self.unbudgeted = False  # the processor answered that no budget governs the scope
        self.need = 0  # the largest reservation waiting for an answer
        self.want = 0
        self.burn = 0  # reservations admitted since burn_since
        self.burn_since = 0.0
        self.silent_since: float | None = None  # no answer to requests since then
        self.asked_need = 0  # the need the unanswered request carried
        self.answered_need = 0  # the need the latest answer was for
        self.answered_at = 0.0
        self.ttl_s = 0.0


Sender = Callable[[AllowanceRequest], bool]


class Allowances:
    """Every allowance of one shim process. Thread-safe.

    ``send`` delivers a request to the processor (False when it could not be sent);
    answers come back through :meth:`on_grant`.
    """

    def __init__(
        self,
        holder: str,
        send: Sender,
        *,
        reply_partitions: int,
        clock_ms: Callable[[], int],
        monotonic: Callable[[], float] = time.monotonic,
        ttl_fallback_s: float = 30.0,
        policies_at: Callable[[], dict[int, int]] | None = None,
    ) -> None:
        self.holder = holder
        self._policies_at = policies_at
        self._send = send
        self.reply_partition = crc32_partition(holder.encode(), reply_partitions)
        self._clock_ms = clock_ms
        self._monotonic = monotonic
        self._ttl_fallback_s = ttl_fallback_s
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)
        self._books: dict[str, _Book] = {}
        self._seq = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats: dict[str, int] = dict.fromkeys(
            ("requests", "answers", "stale_answers", "send_failures", "releases"), 0
        )

    # -- the call path ------------------------------------------------------------------

    def reserve(self, scopes: tuple[str, ...], amount: int) -> tuple[Lease, ...] | Shortfall:
        """Reserve ``amount`` in every budget of every scope; return the leases reserved
        from, or why not (nothing is reserved then, and a request is on its way)."""
        now = self._monotonic()
        now_ms = self._clock_ms()
        with self._lock:
            taken: list[Lease] = []
            for scope in scopes:
                book = self._books.get(scope)
                if book is None:
                    book = self._books[scope] = _Book(scope)
                    book.burn_since = now
                if book.unbudgeted and now < book.valid_until:
                    continue
                shortfall = self._check(book, amount, now, now_ms)
                if shortfall is not None:
                    return shortfall
                taken.extend(book.leases.values())
            for lease in taken:
                lease.used += amount
            for scope in scopes:
                book = self._books[scope]
                book.last_use = now
                book.burn += amount
                if not book.unbudgeted and self._low(book, amount, now):
                    self._wake.set()
            return tuple(taken)

    def _check(self, book: _Book, amount: int, now: float, now_ms: int) -> Shortfall | None:
        usable = book.answered > 0 and now < book.valid_until
        if usable:
            for lease in book.leases.values():
                if lease.until_ms is not None and now_ms >= lease.until_ms:
                    usable = False  # the period reset: its budget instance is a new one
                    break
                if lease.granted - lease.used < amount:
                    break
            else:
                if book.leases:
                    return None
                usable = False
        book.need = max(book.need, amount)
        # Refused for this much (or more) moments ago: asking again would only repeat it.
        final = (
            usable
            and book.answered == book.seq
            and book.refused is not None
            and book.answered_need >= amount
            and now - book.answered_at < ASK_TIMEOUT_S
        )
        if not final and (book.asked_at is None or now - book.asked_at >= ASK_TIMEOUT_S):
            self._ask_locked(book, now)
        waiting = not final
        first = next(iter(book.leases.values()), None)
        others = any(
            lease.outstanding > max(lease.granted - lease.used, 0) for lease in book.leases.values()
        )
        return Shortfall(
            book.scope,
            waiting=waiting,
            refused=book.refused,
            others_hold=others,
            limit_nano_usd=first.limit if first is not None else None,
            spend_nano_usd=first.spend if first is not None else None,
            until_ms=first.until_ms if first is not None else None,
        )

    def settle(self, leases: tuple[Lease, ...], reserved: int, cost: int) -> None:
        """A call ended: its actual cost replaces its reservation in the leases it used."""
        if not leases:
            return
        delta = cost - reserved
        if delta:
            with self._lock:
                for lease in leases:
                    lease.used += delta

    def wait_answer(self, scope: str, timeout_s: float) -> bool:
        """Block until the latest request for ``scope`` is answered; False on timeout."""
        deadline = self._monotonic() + timeout_s
        with self._lock:
            book = self._books.get(scope)
            while book is not None and book.answered < book.seq:
                left = deadline - self._monotonic()
                if left <= 0:
                    return False
                self._answered.wait(min(left, 0.05))
        return True

    def silent_for(self, scope: str) -> float:
        """Seconds the processor has not answered requests for ``scope`` (0 when it has)."""
        with self._lock:
            book = self._books.get(scope)
            if book is None or book.silent_since is None:
                return 0.0
            return self._monotonic() - book.silent_since

    # -- requests -----------------------------------------------------------------------

    def _low(self, book: _Book, amount: int, now: float) -> bool:
        if book.asked_at is not None and now - book.asked_at < ASK_TIMEOUT_S:
            return False
        # Near the end of a budget each answer grants less; a refusal is not asked again at
        # once, and no scope asks ahead more often than every MIN_ASK_GAP_S.
        gap = ASK_TIMEOUT_S if book.refused is not None else MIN_ASK_GAP_S
        if now - book.answered_at < gap:
            return False
        want = self._want(book, amount, now)
        return any(lease.granted - lease.used < want * LOW_WATER for lease in book.leases.values())

    def _want(self, book: _Book, amount: int, now: float) -> int:
        elapsed = now - book.burn_since
        if elapsed >= 2 * HORIZON_S:  # keep the rate recent
            book.burn_since = now - HORIZON_S
            book.burn = int(book.burn * HORIZON_S / elapsed) if elapsed > 0 else 0
            elapsed = HORIZON_S
        rate = book.burn / elapsed if elapsed > 0 else 0.0
        book.want = max(int(rate * HORIZON_S), CALLS_AHEAD * amount, book.need)
        return book.want

    def _ask_locked(
        self,
        book: _Book,
        now: float,
        kind: AllowanceKind = AllowanceKind.ACQUIRE,
        *,
        want_more: bool = True,
    ) -> None:
        """Send a request for ``book`` (the lock is held; sending only queues a message)."""
        self._seq += 1
        seq = self._seq
        want = self._want(book, max(book.need, 1), now) if want_more else 0
        request = AllowanceRequest(
            holder=self.holder,
            seq=seq,
            scope=book.scope,
            kind=kind,
            want_nano_usd=want,
            need_nano_usd=book.need,
            claims=tuple(
                BudgetClaim(budget=lease.budget, used_nano_usd=lease.used)
                for lease in book.leases.values()
            ),
            reply_partition=self.reply_partition,
            sent_at_ms=max(self._clock_ms(), 0),
            policies_at=self._policies_at() if self._policies_at is not None else {},
        )
        book.seq = seq
        book.asked_at = now
        book.asked_need = book.need
        book.sent_at[seq] = now
        if book.silent_since is None:
            book.silent_since = now
        self.stats["requests"] += 1
        if not self._send(request):
            self.stats["send_failures"] += 1

    def on_grant(self, grant: AllowanceGrant) -> None:
        """Apply a verified answer; one to anything but the latest request is ignored."""
        if grant.holder != self.holder:
            return
        now = self._monotonic()
        with self._lock:
            book = self._books.get(grant.scope)
            if book is None or grant.seq != book.seq:
                self.stats["stale_answers"] += 1
                return
            self.stats["answers"] += 1
            sent = book.sent_at.pop(grant.seq, now)
            book.sent_at = {s: t for s, t in book.sent_at.items() if s > grant.seq}
            book.answered = grant.seq
            book.asked_at = None
            book.silent_since = None
            book.answered_need = book.asked_need
            book.answered_at = now
            if book.need <= book.asked_need:
                book.need = 0
            book.refused = grant.refused
            # Measured from when the request left, so this process stops using the
            # allowance before the processor (which counts from when it answered) reclaims it.
            ttl_s = grant.ttl_ms / 1000 if grant.ttl_ms else self._ttl_fallback_s
            book.valid_until = sent + ttl_s
            book.ttl_s = ttl_s
            book.unbudgeted = not grant.budgets
            leases: dict[str, Lease] = {}
            for budget in grant.budgets:
                lease = book.leases.get(budget.budget) or Lease(budget.budget)
                lease.granted = budget.granted_nano_usd
                lease.limit = budget.limit_nano_usd
                lease.spend = budget.spend_nano_usd
                lease.outstanding = budget.outstanding_nano_usd
                lease.until_ms = budget.until_ms
                leases[budget.budget] = lease
            book.leases = leases
            self._answered.notify_all()

    # -- upkeep -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="agentledger-allowances", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            self.upkeep()

    def upkeep(self) -> None:
        """Ask ahead for scopes running low, renew allowances in use, give back idle ones."""
        now = self._monotonic()
        with self._lock:
            for book in self._books.values():
                if book.unbudgeted or not book.answered:
                    continue
                asking = book.asked_at is not None and now - book.asked_at < ASK_TIMEOUT_S
                if asking:
                    continue
                if book.asked_at is not None:
                    self._ask_locked(book, now)  # unanswered: ask again
                    continue
                idle = now - book.last_use >= IDLE_S
                spare = any(lease.granted > lease.used for lease in book.leases.values())
                if idle:
                    if spare and now < book.valid_until:
                        self._release_locked(book, now)
                    continue
                if self._low(book, 1, now) or book.valid_until - now < book.ttl_s * RENEW_AT:
                    self._ask_locked(book, now)

    def _release_locked(self, book: _Book, now: float) -> None:
        # Stop using it first: what is given back must not be spent meanwhile.
        for lease in book.leases.values():
            lease.granted = min(lease.granted, lease.used)
        self.stats["releases"] += 1
        self._ask_locked(book, now, AllowanceKind.RELEASE, want_more=False)

    def policies_changed(self) -> None:
        """A policy changed: stop using every allowance and ask again. A lowered limit then
        binds this process at once instead of after the processor's revocation arrives; an
        unchanged or raised one is granted back as it was."""
        now = self._monotonic()
        with self._lock:
            for book in self._books.values():
                if not book.answered:
                    continue
                book.unbudgeted = False
                for lease in book.leases.values():
                    lease.granted = min(lease.granted, lease.used)
                # Given back and asked afresh in one request, under the new policies.
                self._ask_locked(book, now, AllowanceKind.RELEASE)

    def release_all(self) -> None:
        """Give back every unused allowance (the ledger is closing)."""
        now = self._monotonic()
        with self._lock:
            for book in self._books.values():
                if book.unbudgeted or not book.answered:
                    continue
                if any(lease.granted > lease.used for lease in book.leases.values()):
                    self._release_locked(book, now)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def snapshot(self) -> dict[str, list[dict[str, int | str | None]]]:
        """What this process holds, per scope (for stats and tests)."""
        with self._lock:
            return {
                scope: [
                    {
                        "budget": lease.budget,
                        "granted_nano_usd": lease.granted,
                        "used_nano_usd": lease.used,
                        "until_ms": lease.until_ms,
                    }
                    for lease in book.leases.values()
                ]
                for scope, book in self._books.items()
            }
