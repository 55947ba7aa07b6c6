"""Which scopes have a budget, learned from the compacted policies topic.

A call needs an allowance only in the scopes a budgeted policy governs; every other scope costs
it nothing. The processor decides precedence between policies; here it only matters whether
any policy with a limit matches a scope.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from fnmatch import fnmatchcase

from pydantic import ValidationError

from agentledger.schemas import BudgetPolicy

__all__ = ["BudgetDirectory"]

log = logging.getLogger(__name__)

# Calls come with the same few scope tuples over and over.
_CACHE_SIZE = 4096


class BudgetDirectory:
    """The budgeted policies in force, by scope pattern; thread-safe, read without a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._budgeted: dict[str, BudgetPolicy] = {}  # policy key -> the budgeted policy
        self._exact: frozenset[str] = frozenset()
        self._globs: tuple[str, ...] = ()
        self._cache: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.loaded = threading.Event()
        self.version = 0
        #: Called (on the listener's thread) after every change of the policies in force.
        self.on_change: Callable[[], None] | None = None
        self.rejected = 0
        self._positions: dict[int, int] = {}

    def positions(self) -> dict[int, int]:
        """How far the policies topic was read: partition -> the offset after the last record
        applied (a request carries it, so the processor answers under these policies)."""
        return dict(self._positions)

    @property
    def empty(self) -> bool:
        return not self._budgeted

    def apply(
        self,
        key: bytes | None,
        value: bytes | None,
        *,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None:
        """One policies record (at ``partition``/``offset``, when known); a tombstone (empty
        value) deletes the key's policy."""
        if partition is not None and offset is not None:
            # Before on_change runs: the request it sends must say it saw this record.
            self._positions[partition] = max(self._positions.get(partition, 0), offset + 1)
        if not key:
            self.rejected += 1
            return
        name = key.decode(errors="replace")
        budgeted: BudgetPolicy | None = None
        if value:
            try:
                policy = BudgetPolicy.model_validate_json(value)
            except ValidationError:
                # The processor dead-letters bad policies; the shim only skips them.
                self.rejected += 1
                return
            budgeted = policy if policy.budgeted else None
        with self._lock:
            if budgeted is None:
                if self._budgeted.pop(name, None) is None:
                    return
            elif self._budgeted.get(name) == budgeted:
                return
            else:
                # A changed limit counts, not only a new pattern: the allowances held were
                # sized under the old one (see Allowances.policies_changed).
                self._budgeted[name] = budgeted
            patterns = {p.scope for p in self._budgeted.values()}
            self._exact = frozenset(p for p in patterns if not _is_glob(p))
            self._globs = tuple(sorted(p for p in patterns if _is_glob(p)))
            self._cache = {}
            self.version += 1
        if self.on_change is not None:
            self.on_change()

    def budgeted(self, scopes: tuple[str, ...]) -> tuple[str, ...]:
        """Those of ``scopes`` that some budgeted policy governs."""
        cache = self._cache
        found = cache.get(scopes)
        if found is None:
            exact, globs = self._exact, self._globs
            found = tuple(s for s in scopes if s in exact or any(fnmatchcase(s, g) for g in globs))
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            cache[scopes] = found
        return found


def _is_glob(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern
