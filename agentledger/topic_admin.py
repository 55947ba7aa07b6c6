"""Create topics with explicit config and wait for their partition leaders.

Used by the processor, the sink's tests and benches, the CLI's stack and deploy/'s init step,
without importing deploy/. confluent-kafka (a core dependency) is imported when called, so
importing this module stays free.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from agentledger.schemas.topic_specs import TopicSpec, replication_for

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

__all__ = ["ensure_topics"]


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
