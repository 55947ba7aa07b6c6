"""Topic creation that rides out a broker gone while the worker starts.

faust declares each table's changelog topic while the worker starts: it asks a broker for the
controller and sends CreateTopics there. With the broker gone at that moment (killed, restarting)
aiokafka raises ``NodeNotReadyError``, faust does not retry it, and the worker exited within a
second (reproduced: broker SIGKILLed 2.5-3 s after the worker started). This producer retries
retriable errors with backoff and a warning per attempt, up to ``patience_s``; after that the
worker exits with a message that says why and what restarts it.
"""

from __future__ import annotations

import time
from typing import Any

from aiokafka.errors import KafkaError
from faust.exceptions import NotReady
from faust.transport.drivers.aiokafka import Producer

__all__ = ["BrokerGoneAtStart", "PatientProducer", "TopicMissing"]

# Long enough for a broker restart (a single node is back in 5-15 s here), short enough that a
# broker gone for good ends the worker, so its supervisor restarts it once Kafka is back.
PATIENCE_S = 60.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 5.0


class BrokerGoneAtStart(RuntimeError):
    """Kafka did not answer for the whole patience while a topic was being created."""


class TopicMissing(RuntimeError):
    """A topic the processor reads is not on the broker; the stack's topics come first."""


class PatientProducer(Producer):
    """faust's aiokafka Producer whose ``create_topic`` retries while Kafka is unreachable."""

    patience_s: float = PATIENCE_S

    async def create_topic(
        self, topic: str, partitions: int, replication: int, **kwargs: Any
    ) -> None:
        deadline = time.monotonic() + self.patience_s
        backoff = FIRST_BACKOFF_S
        attempt = 1
        while True:
            try:
                await super().create_topic(topic, partitions, replication, **kwargs)
                return
            except (KafkaError, NotReady, TimeoutError) as exc:
                if isinstance(exc, KafkaError) and not exc.retriable:
                    raise
                if self.should_stop:
                    raise
                if time.monotonic() + backoff > deadline:
                    raise BrokerGoneAtStart(
                        f"could not create topic {topic!r}: Kafka at {self._bootstrap()} did "
                        f"not answer for {self.patience_s:g}s ({_describe(exc)}). The worker "
                        "exits; start it again once Kafka is back (`agentledger up`, or "
                        "`agentledger up --supervise` to have that done for you)"
                    ) from exc
                self.log.warning(
                    "creating topic %r: Kafka does not answer (%s); retry %d in %.1fs, "
                    "giving up %gs after the first try",
                    topic,
                    _describe(exc),
                    attempt,
                    backoff,
                    self.patience_s,
                )
                await self.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                attempt += 1

    def _bootstrap(self) -> str:
        return ",".join(f"{url.host}:{url.port}" for url in self.app.conf.broker_producer)


def _describe(exc: BaseException) -> str:
    # aiokafka's errors already start with their class name; faust's and asyncio's do not.
    text = str(exc)
    name = type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}"
