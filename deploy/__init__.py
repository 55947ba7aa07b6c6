"""The local stack: a real Kafka broker from Maven jars, topic creation, process supervision."""

from .kafka_broker import KAFKA_VERSION, BrokerError, KafkaBroker, ensure_jars, kafka_ready
from .topics import TopicSpec, ensure_topics, topic_specs

__all__ = [
    "KAFKA_VERSION",
    "BrokerError",
    "KafkaBroker",
    "TopicSpec",
    "ensure_jars",
    "ensure_topics",
    "kafka_ready",
    "topic_specs",
]
