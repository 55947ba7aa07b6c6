"""The local stack: a real Kafka broker from Maven jars, process supervision. (Topic specs and
their creation: agentledger.schemas.topic_specs and agentledger.topic_admin.)"""

from .kafka_broker import KAFKA_VERSION, BrokerError, KafkaBroker, ensure_jars, kafka_ready

__all__ = [
    "KAFKA_VERSION",
    "BrokerError",
    "KafkaBroker",
    "ensure_jars",
    "kafka_ready",
]
