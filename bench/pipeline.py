"""P1 and P5: end-to-end events/s through the processor and rows/s through the sink, next to a
raw Kafka consume of the same bytes in the same run.

The services run as the real processes (`python -m agentledger.stream_processors`, `... sinks`)
on a private broker. The load is the Azure conversation trace spread over a fleet
(agentledger.workload), produced as fast as librdkafka takes it; a service is done when its
consumer group has committed the end offset of every partition (or, for the sink, when every
row is in ClickHouse).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.deploy.stack import Stack
from agentledger.schemas.topic_specs import topic_specs
from agentledger.topic_admin import ensure_topics
from agentledger.traces import load_trace
from agentledger.workload import plan_to_events, replay_trace


def _settings(bootstrap: str, home: Path, prefix: str, ports: tuple[int, int]) -> Settings:
    return Settings(
        kafka=bootstrap,
        home=home,
        topic_prefix=prefix,
        control_key=SecretStr("bench-control-key-0123456789"),
        api_token=SecretStr("bench-api-token"),
        processor_port=ports[0],
        sink_port=ports[1],
    )


def _payloads(count: int) -> list[tuple[bytes, bytes]]:
    trace = load_trace("conv")
    plan = replay_trace(trace, agents=64, pools=4, workflows=8, speedup=1000)
    while len(plan) < count:
        plan = plan + plan
    start_ms = int(time.time() * 1000) - 60_000
    events = plan_to_events(plan[:count], start_ms=start_ms)
    return [(e.agent_id.encode(), e.model_dump_json().encode()) for e in events]


def _produce(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]]) -> float:
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "acks": "all",
            "enable.idempotence": True,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    started = time.monotonic()
    for key, value in payloads:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(120)
    return time.monotonic() - started


def _group_done(bootstrap: str, group: str, topic: str, ends: dict[int, int]) -> bool:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    try:
        committed = consumer.committed([TopicPartition(topic, p) for p in ends], timeout=10)
    finally:
        consumer.close()
    return all(tp.offset >= ends[tp.partition] for tp in committed)


def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
    finally:
        consumer.close()


def raw_consume_seconds(bootstrap: str, topic: str, count: int) -> float:
    """Read ``count`` messages of ``topic`` from the beginning with a bare consumer."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        seen = 0
        started = time.monotonic()
        while seen < count:
            for message in consumer.consume(10_000, timeout=1.0):
                if message.error() is None:
                    seen += 1
        return time.monotonic() - started
    finally:
        consumer.close()


def measure(
    bootstrap: str, home: Path, ports: tuple[int, int], count: int = 50_000
) -> dict[str, Any]:
    settings = _settings(bootstrap, home, f"bp{uuid.uuid4().hex[:6]}.", ports)
    ensure_topics(bootstrap, topic_specs(settings.topics))
    stack = Stack(settings, progress=lambda _m: None, manage_kafka=False)
    stack.up(timeout_s=180)
    try:
        payloads = _payloads(count)
        produce_s = _produce(bootstrap, settings.topics.calls, payloads)
        produced_at = time.monotonic()
        ends = _end_offsets(bootstrap, settings.topics.calls)
        processor_s = sink_s = None
        deadline = produced_at + 600
        while (processor_s is None or sink_s is None) and time.monotonic() < deadline:
            now = time.monotonic()
            if processor_s is None and _group_done(
                bootstrap, f"{settings.topic_prefix}processor", settings.topics.calls, ends
            ):
                processor_s = now - produced_at + produce_s
            if sink_s is None and _group_done(
                bootstrap, f"{settings.topic_prefix}sink", settings.topics.calls, ends
            ):
                sink_s = now - produced_at + produce_s
            time.sleep(0.2)
    finally:
        stack.down()
    raw_s = raw_consume_seconds(bootstrap, settings.topics.calls, count)
    result: dict[str, Any] = {
        "events": count,
        "bytes": sum(len(k) + len(v) for k, v in payloads),
        "produce_s": round(produce_s, 2),
        "raw_consume_s": round(raw_s, 3),
        "raw_consume_events_per_s": round(count / raw_s),
    }
    if processor_s is not None:
        result["processor_s"] = round(processor_s, 2)
        result["processor_events_per_s"] = round(count / processor_s)
        result["processor_vs_raw"] = round((count / processor_s) / (count / raw_s), 4)
    if sink_s is not None:
        result["sink_s"] = round(sink_s, 2)
        result["sink_rows_per_s"] = round(count / sink_s)
    return result
