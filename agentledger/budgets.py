"""`agentledger budgets apply | list | diff`: publish policies to the policies topic, read them
back, and show what an apply would change."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from agentledger.config import Settings
from agentledger.schemas import BudgetPolicy, PolicyFile, parse_policy_file

if TYPE_CHECKING:
    from confluent_kafka import Consumer, TopicPartition

__all__ = ["PolicyChange", "apply_policies", "diff_policies", "list_policies", "load_policy_file"]


def load_policy_file(path: Path) -> PolicyFile:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read policy file {path}: {exc.strerror}") from exc
    return parse_policy_file(text, source=str(path))


@dataclass(frozen=True)
class PolicyChange:
    """One ``<scope>|<period>`` compared between the policies topic and a policy file.

    ``change`` is ``add`` (only in the file), ``change`` (both, different), ``same`` (both,
    equal) or ``keep`` (only published: apply publishes the file and deletes nothing).
    """

    key: str
    change: str
    published: BudgetPolicy | None
    wanted: BudgetPolicy | None

    def describe(self) -> str:
        def show(policy: BudgetPolicy | None) -> str:
            if policy is None:
                return "-"
            steps = ", ".join(f"{t.at_percent}%: {t.action}" for t in policy.effective_thresholds)
            spike = ""
            if policy.spike is not None:
                spike = f"; spike {policy.spike.at_percent}%/{policy.spike.window.value}"
            return f"${policy.limit_usd} [{steps}{spike}]"

        return f"{self.change:6}  {self.key}: {show(self.published)} -> {show(self.wanted)}"


def _same(a: BudgetPolicy, b: BudgetPolicy) -> bool:
    # The schema version of the record does not change what a policy means.
    return a.model_dump(exclude={"schema_version"}) == b.model_dump(exclude={"schema_version"})


def diff_policies(published: Iterable[BudgetPolicy], wanted: PolicyFile) -> list[PolicyChange]:
    """What ``apply`` of ``wanted`` would change versus ``published``, sorted by key."""
    before = {p.key: p for p in published}
    after: dict[str, BudgetPolicy] = {}
    for policy in wanted.budgets:
        after[policy.key] = policy  # a later entry for the same key wins, as on the topic
    changes = []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if old is None:
            change = "add"
        elif new is None:
            change = "keep"
        elif _same(old, new):
            change = "same"
        else:
            change = "change"
        changes.append(PolicyChange(key, change, old, new))
    return changes


def apply_policies(settings: Settings, policies: PolicyFile, timeout_s: float = 30.0) -> int:
    """Publish each policy keyed by scope and period; the compacted topic keeps the latest."""
    from confluent_kafka import KafkaError, Producer

    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            errors.append(str(err))

    producer = Producer(
        {
            **settings.kafka_client_config(),
            "bootstrap.servers": settings.kafka,
            "acks": "all",
            "enable.idempotence": True,
        }
    )
    for policy in policies.budgets:
        producer.produce(
            settings.topics.policies,
            key=policy.key.encode(),
            value=policy.model_dump_json().encode(),
            on_delivery=on_delivery,
        )
    remaining = producer.flush(timeout_s)
    if remaining or errors:
        raise RuntimeError(
            f"publishing policies to {settings.topics.policies} failed "
            f"({remaining} undelivered; {'; '.join(errors)}); is Kafka up? "
            "Run `agentledger status`."
        )
    return len(policies.budgets)


def list_policies(settings: Settings, timeout_s: float = 10.0) -> list[BudgetPolicy]:
    """Read the policies topic from the beginning to its current end."""
    from confluent_kafka import (
        OFFSET_BEGINNING,
        Consumer,
        KafkaError,
        KafkaException,
        TopicPartition,
    )

    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "bootstrap.servers": settings.kafka,
            "group.id": f"agentledger-cli-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        metadata = consumer.list_topics(settings.topics.policies, timeout=timeout_s)
        topic = metadata.topics.get(settings.topics.policies)
        if topic is None or topic.error is not None:
            raise RuntimeError(
                f"topic {settings.topics.policies} does not exist; run `agentledger up`"
            )
        partitions = [
            TopicPartition(settings.topics.policies, p, OFFSET_BEGINNING) for p in topic.partitions
        ]
        ends = {tp.partition: _high_watermark(consumer, tp, timeout_s) for tp in partitions}
        consumer.assign(partitions)
        latest: dict[str, BudgetPolicy | None] = {}
        pending = {p for p, end in ends.items() if end > 0}
        while pending:
            msg = consumer.poll(timeout_s)
            if msg is None:
                raise RuntimeError(f"timed out reading {settings.topics.policies}")
            error = msg.error()
            partition = msg.partition()
            offset = msg.offset()
            if partition is None or offset is None:
                continue
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(partition)
                    continue
                raise KafkaException(error)
            key = (msg.key() or b"").decode()
            value = msg.value()
            try:
                latest[key] = BudgetPolicy.model_validate_json(value) if value else None
            except ValidationError:
                latest[key] = None  # the processor dead-letters these; listing skips them
            if offset + 1 >= ends[partition]:
                pending.discard(partition)
        return [p for p in latest.values() if p is not None]
    finally:
        consumer.close()


def _high_watermark(consumer: Consumer, tp: TopicPartition, timeout_s: float) -> int:
    """The partition's end offset, retried while a just-created partition has no leader yet."""
    from confluent_kafka import KafkaError, KafkaException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s)
            return int(high)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            retriable = isinstance(error, KafkaError) and error.code() in (
                KafkaError.NOT_LEADER_FOR_PARTITION,
                KafkaError.LEADER_NOT_AVAILABLE,
                KafkaError.UNKNOWN_TOPIC_OR_PART,
            )
            if not retriable or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
