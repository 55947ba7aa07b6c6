"""Bounded overshoot: a call reserves its estimated maximum cost before it runs, against the
last spend the processor reported for each of its scopes plus this process's own spend that
the report cannot include yet.

For a scope with a report (spend ``S``, limit ``L``, issued at ``T``) this process admits a
call only while ``S + U + R + r <= L``: ``U`` the cost of this process's calls that ended at or
after ``T``, ``R`` the reservations of its calls still running, ``r`` this call's reservation.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

__all__ = ["Refusal", "SpendBook"]

# Costs are kept summed per 100 ms, so memory stays bounded at any call rate; a bucket that a
# report only partly covers is kept whole (counted twice rather than missed).
BUCKET_MS = 100
# Unconfirmed costs older than this are assumed counted by the processor even without a newer
# report, so a process that never hears again does not refuse forever.
KEEP_MS = 10 * 60_000
# Ended calls' costs wait lock-free until a reservation or query books them, or this many pile
# up; then the caller that hit the mark books them all.
PENDING_MAX = 1024


@dataclass(frozen=True, slots=True)
class Refusal:
    scope: str
    committed_nano_usd: int
    """reported spend plus this process's unconfirmed spend and running reservations"""
    reserved_nano_usd: int
    limit_nano_usd: int


class _Scope:
    __slots__ = ("ended", "reserved", "since_ms", "unconfirmed")

    def __init__(self) -> None:
        # [bucket start ms, summed cost]: mutable, so a call adds to its bucket in place.
        self.ended: deque[list[int]] = deque()
        self.unconfirmed = 0
        self.reserved = 0
        self.since_ms = -1


class SpendBook:
    """Per scope: this process's running reservations and recent costs. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scopes: dict[str, _Scope] = {}
        # A call's scopes come as the same tuple every time (the agent caches it).
        self._books: dict[tuple[str, ...], tuple[_Scope, ...]] = {}
        # Costs of ended calls not yet booked: appending is atomic and lock-free, and the
        # books only need them when a reservation or a query reads them (or the queue grows).
        self._pending: deque[tuple[tuple[str, ...], int, int]] = deque()

    def _scope(self, scope: str) -> _Scope:
        found = self._scopes.get(scope)
        if found is None:
            found = self._scopes[scope] = _Scope()
        return found

    @staticmethod
    def _forget_before(book: _Scope, ms: int) -> None:
        ended = book.ended
        while ended and ended[0][0] + BUCKET_MS <= ms:
            book.unconfirmed -= ended.popleft()[1]

    def unconfirmed(self, scope: str, report_ms: int, now_ms: int) -> int:
        with self._lock:
            self._drain()
            return self._unconfirmed(self._scope(scope), report_ms, now_ms)

    def _unconfirmed(self, book: _Scope, report_ms: int, now_ms: int) -> int:
        if report_ms > book.since_ms:
            self._forget_before(book, report_ms)
            book.since_ms = report_ms
        self._forget_before(book, now_ms - KEEP_MS)
        return book.unconfirmed

    def reserve(
        self,
        scopes: tuple[str, ...],
        reports: dict[str, tuple[int, int, int]],
        amount: int,
        now_ms: int,
    ) -> Refusal | None:
        """Reserve ``amount`` in every scope, unless a scope's report ``(spend, limit,
        issued_at_ms)`` leaves no room for it; then reserve nothing and say which."""
        with self._lock:
            self._drain()
            for scope, (spend, limit, issued_ms) in reports.items():
                book = self._scope(scope)
                committed = spend + self._unconfirmed(book, issued_ms, now_ms) + book.reserved
                if committed + amount > limit:
                    return Refusal(scope, committed, amount, limit)
            for scope in scopes:
                self._scope(scope).reserved += amount
        return None

    def settle(self, scopes: tuple[str, ...], amount: int, cost: int, ended_ms: int) -> None:
        """A call ended: drop its reservation, count its actual cost as unconfirmed."""
        if amount:
            with self._lock:
                self._drain()
                self._book(scopes, -amount, cost, ended_ms)
        elif cost:
            pending = self._pending
            pending.append((scopes, ended_ms, cost))
            if len(pending) >= PENDING_MAX:
                with self._lock:
                    self._drain()

    def _drain(self) -> None:
        """Book the pending costs, oldest first. Called with the lock held."""
        pending = self._pending
        # Only drainers pop, and they hold the lock: a non-empty queue stays non-empty.
        while pending:
            scopes, ended_ms, cost = pending.popleft()
            self._book(scopes, 0, cost, ended_ms)

    def _book(self, scopes: tuple[str, ...], reserved: int, cost: int, ended_ms: int) -> None:
        books = self._books.get(scopes)
        if books is None:
            if len(self._books) >= 4096:
                self._books.clear()
            books = self._books[scopes] = tuple(self._scope(s) for s in scopes)
        bucket = ended_ms - ended_ms % BUCKET_MS
        for book in books:
            book.reserved += reserved
            if cost:
                ended = book.ended
                if ended and ended[-1][0] == bucket:
                    ended[-1][1] += cost
                else:
                    ended.append([bucket, cost])
                    self._forget_before(book, ended_ms - KEEP_MS)
                book.unconfirmed += cost
