"""The processor's own topics: the second hop's scopes topic (its records: deltas.py) and the
changelogs of both hops' states, created with explicit config before the worker starts."""

from __future__ import annotations

from agentledger.config import Settings
from agentledger.schemas.topic_specs import TopicSpec, topic_specs
from agentledger.topic_admin import ensure_topics

__all__ = [
    "SCOPES_RETENTION_MS",
    "changelog_topic_name",
    "ensure_scopes_topic",
    "scopes_topic_name",
]

# Only deltas not yet applied matter here, so the retention just has to outlast a long outage
# of the processor.
SCOPES_RETENTION_MS = 7 * 24 * 3600 * 1000


def scopes_topic_name(settings: Settings) -> str:
    return f"{settings.topic_prefix}processor-scopes"


def changelog_topic_name(settings: Settings, table: str) -> str:
    """The name faust gives a table's changelog: ``<app id>-<table>-changelog``."""
    return f"{settings.topic_prefix}processor-{table}-changelog"


def ensure_scopes_topic(settings: Settings, partitions: int, tables: tuple[str, ...]) -> None:
    """Create the scopes topic and the tables' changelogs with explicit config, if missing, and
    wait for their leaders (as ensure_topics does for the stack's topics). All have as many
    partitions as calls.

    faust would create the changelogs itself, but an agent that starts before the new topic
    shows in its metadata fails with PartitionsMismatch (0 partitions) and never recovers.
    """
    specs = [
        TopicSpec(
            scopes_topic_name(settings),
            partitions,
            {"retention.ms": str(SCOPES_RETENTION_MS), "cleanup.policy": "delete"},
        )
    ]
    # The allowance topics too: a stack created before allowances existed lacks them.
    allowance_topics = (settings.topics.allowance_requests, settings.topics.allowances)
    specs += [s for s in topic_specs(settings.topics, partitions) if s.name in allowance_topics]
    specs += [
        TopicSpec(changelog_topic_name(settings, table), partitions, {"cleanup.policy": "compact"})
        for table in tables
    ]
    ensure_topics(settings.kafka, specs, client_config=settings.kafka_client_config())
