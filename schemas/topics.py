"""Topic names. One prefix per stack, so two stacks can share a broker without colliding."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ALLOWANCE_PARTITIONS", "Topics"]

# Partitions of the allowances topic: each shim process follows one of them.
ALLOWANCE_PARTITIONS = 6


@dataclass(frozen=True)
class Topics:
    prefix: str = "agentledger."

    @property
    def calls(self) -> str:
        return f"{self.prefix}calls"

    @property
    def control(self) -> str:
        return f"{self.prefix}control"

    @property
    def policies(self) -> str:
        return f"{self.prefix}policies"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}alerts"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}dlq"

    @property
    def stats(self) -> str:
        """Routing stats per (agent or model, task type, calls partition); compacted."""
        return f"{self.prefix}stats"

    @property
    def allowance_requests(self) -> str:
        """Shims ask for allowances here, keyed like the scope's spend state (see allowance.py)."""
        return f"{self.prefix}allowance-requests"

    @property
    def allowances(self) -> str:
        """Signed grants, each on the partition its holder follows."""
        return f"{self.prefix}allowances"

    @property
    def pauses(self) -> str:
        """Calls waiting out a refusal, per (shim process, scope); compacted, tombstone at the
        end (see pause.py)."""
        return f"{self.prefix}pauses"

    def all(self) -> tuple[str, ...]:
        return (
            self.calls,
            self.control,
            self.policies,
            self.alerts,
            self.dlq,
            self.stats,
            self.allowance_requests,
            self.allowances,
            self.pauses,
        )
