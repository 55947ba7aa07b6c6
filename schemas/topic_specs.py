"""The stack's topics and their config: the contract every component and deploy/ create them by.

Pure data: `agentledger.topic_admin.ensure_topics` creates them on a cluster (the broker never
auto-creates a topic).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .topics import ALLOWANCE_PARTITIONS, Topics

__all__ = ["DEFAULT_CALLS_PARTITIONS", "TopicSpec", "replication_for", "topic_specs"]

DAY_MS = 24 * 3600 * 1000
# Partitions bound the workers that share the calls topic (one busy worker per partition) and
# growing a topic later moves keys, so a new stack starts with room for 12 workers.
DEFAULT_CALLS_PARTITIONS = 12


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(
    topics: Topics, calls_partitions: int = DEFAULT_CALLS_PARTITIONS
) -> list[TopicSpec]:
    return [
        # Keyed by agent id. LogAppendTime: retention runs on arrival time, so a backdated
        # event time in the payload never makes the broker delete it early.
        TopicSpec(
            topics.calls,
            calls_partitions,
            {
                "message.timestamp.type": "LogAppendTime",
                "retention.ms": str(14 * DAY_MS),
                "cleanup.policy": "delete",
            },
        ),
        # Keyed by scope; compaction keeps the standing command per scope for new agents.
        TopicSpec(
            topics.control,
            3,
            {
                "cleanup.policy": "compact",
                "min.cleanable.dirty.ratio": "0.1",
                "segment.ms": str(3600 * 1000),
            },
        ),
        TopicSpec(
            topics.policies,
            1,
            {
                "cleanup.policy": "compact",
                "min.cleanable.dirty.ratio": "0.1",
            },
        ),
        TopicSpec(
            topics.alerts,
            3,
            {"retention.ms": str(30 * DAY_MS), "cleanup.policy": "delete"},
        ),
        TopicSpec(
            topics.dlq,
            1,
            {
                "retention.ms": str(30 * DAY_MS),
                "cleanup.policy": "delete",
            },
        ),
        # Keyed like the spend state of the scope asked for (agent id, or the scope), with as
        # many partitions as calls, so the worker owning that state gets the request.
        TopicSpec(
            topics.allowance_requests,
            calls_partitions,
            {"retention.ms": str(DAY_MS), "cleanup.policy": "delete"},
        ),
        # Each shim process follows one partition from its end; grants are short-lived.
        TopicSpec(
            topics.allowances,
            ALLOWANCE_PARTITIONS,
            {"retention.ms": str(3600 * 1000), "cleanup.policy": "delete"},
        ),
        # Keyed by (subject, task type, calls partition): compaction keeps each partial
        # aggregate's latest value, which is all a restarting processor or a router needs.
        TopicSpec(
            topics.stats,
            3,
            {
                "cleanup.policy": "compact",
                "min.cleanable.dirty.ratio": "0.1",
                "segment.ms": str(3600 * 1000),
            },
        ),
        # Keyed by (shim process, scope), one partition (every shim writes partition 0, so a
        # key's records stay in order); compaction keeps the latest per key and drops a
        # key after its tombstone, and records older than a day go anyway.
        TopicSpec(
            topics.pauses,
            1,
            {
                "cleanup.policy": "compact,delete",
                "retention.ms": str(DAY_MS),
                "min.cleanable.dirty.ratio": "0.1",
                "segment.ms": str(3600 * 1000),
                "delete.retention.ms": str(3600 * 1000),
            },
        ),
    ]


def replication_for(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for a cluster of ``brokers``: 3 and 2 from
    three brokers on, so one broker may be down while acks=all writes still succeed and no
    acknowledged write lives on a single broker."""
    if brokers < 1:
        raise ValueError(f"a Kafka cluster has at least 1 broker, got {brokers}")
    replication = min(3, brokers)
    return replication, min(2, replication)
