"""`python -m agentledger.deploy.topics`: the init step that creates the stack's topics.

The specs live in `agentledger.schemas.topic_specs` and the creation in
`agentledger.topic_admin`, so the processor and the sink use them without importing deploy/.
"""

from __future__ import annotations

from agentledger.schemas.topic_specs import topic_specs
from agentledger.topic_admin import ensure_topics

__all__ = ["main"]


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
