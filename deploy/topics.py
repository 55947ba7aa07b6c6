"""Create the stack's topics with explicit config (the broker never auto-creates them)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agentledger.schemas import Topics
from agentledger.schemas.topics import ALLOWANCE_PARTITIONS

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

__all__ = ["TopicSpec", "ensure_topics", "main", "replication_for", "topic_specs"]

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(topics: Topics, calls_partitions: int = 6) -> list[TopicSpec]:
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


def ensure_topics(
    bootstrap: str,
    specs: list[TopicSpec],
    replication: int | None = None,
    timeout_s: float = 30.0,
    client_config: dict[str, str] | None = None,
) -> list[str]:
    """Create missing topics; return the names created. Existing topics are left alone.

    ``replication`` None: from the number of brokers the cluster reports (replication_for);
    min.insync.replicas follows it. ``client_config``: security settings of the AdminClient
    (Settings.kafka_client_config()).
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({**(client_config or {}), "bootstrap.servers": bootstrap})
    metadata = admin.list_topics(timeout=timeout_s)
    existing = set(metadata.topics)
    if replication is None:
        replication, min_isr = replication_for(len(metadata.brokers))
    else:
        min_isr = min(2, replication)
    wanted = [
        NewTopic(
            s.name,
            num_partitions=s.partitions,
            replication_factor=replication,
            config={"min.insync.replicas": str(min_isr), **s.config},
        )
        for s in specs
        if s.name not in existing
    ]
    if not wanted:
        return []
    created = []
    for name, future in admin.create_topics(wanted, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args and getattr(exc.args[0], "name", lambda: "")() == "TOPIC_ALREADY_EXISTS":
                continue
            raise
    _wait_for_leaders(admin, [s.name for s in specs], timeout_s)
    return created


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout_s: float) -> None:
    """Block until every partition of ``names`` has a leader.

    CreateTopics returns before leaders are elected; a client that reads offsets in that gap
    gets NOT_LEADER_FOR_PARTITION.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        topics = admin.list_topics(timeout=timeout_s).topics
        missing = [
            name
            for name in names
            if name not in topics
            or topics[name].error is not None
            or not topics[name].partitions
            or any(p.leader < 0 for p in topics[name].partitions.values())
        ]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"topics without a partition leader after {timeout_s:.0f}s: {missing}"
            )
        time.sleep(0.1)


def main() -> int:
    """`python -m agentledger.deploy.topics`: create the stack's topics on the cluster named by
    the AGENTLEDGER_* settings (a one-shot init step in docker-compose and Kubernetes)."""
    from agentledger.config import Settings

    settings = Settings()
    created = ensure_topics(
        settings.kafka,
        topic_specs(settings.topics, settings.calls_partitions),
        client_config=settings.kafka_client_config(),
    )
    print("created topics: " + (", ".join(created) if created else "none (all exist)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
