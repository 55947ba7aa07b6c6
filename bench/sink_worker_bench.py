"""The sink worker in-process, without Kafka: where P5's CPU per row goes, split by thread.

`SinkWorker.run` (the service loop: batching, the check, the id lookup, chunks, the pipelined
insert on its helper thread, the commit bookkeeping) over `--events` trace records as real
confluent-kafka `Message` objects on 12 partitions, served by an in-memory consumer, into a
fresh embedded chDB with every view. Prints the main thread's CPU per row (Python: batching
and the check), the rest of the process's (the insert thread and chDB's own threads: parse,
views, parts, merges) and wall rows/s. CPU per row moves far less than rows/s on a shared
machine, so compare versions by it, in alternating runs.

`python -m bench.sink_worker_bench [--events N] [--batch-rows R]`
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import threading
import time
from typing import Any

from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.sinks.database import ClickHouse
from agentledger.sinks.migrations import apply_migrations
from agentledger.sinks.store import SinkTables
from agentledger.sinks.worker import SinkWorker

from .pipeline import _payloads

__all__ = ["main", "measure"]

PARTITIONS = 12


class _Consumer:
    """Hands out the prepared messages; sets `stop` once they are all taken."""

    def __init__(self, messages: list[Any], stop: threading.Event) -> None:
        self.messages = messages
        self.taken = 0
        self.stop = stop
        self.assigned: list[Any] = []

    def subscribe(
        self, topics: list[str], on_assign: Any = None, on_revoke: Any = None, on_lost: Any = None
    ) -> None:
        pass

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        if self.taken >= len(self.messages):
            self.stop.set()
            return []
        out = self.messages[self.taken : self.taken + num_messages]
        self.taken += len(out)
        return out

    def commit(self, message: Any = None, offsets: Any = None, asynchronous: bool = True) -> None:
        pass

    def assignment(self) -> list[Any]:
        return list(self.assigned)

    def pause(self, partitions: list[Any]) -> None:
        pass

    def resume(self, partitions: list[Any]) -> None:
        pass

    def poll(self, timeout: float = -1) -> None:
        return None

    def seek(self, partition: Any) -> None:
        pass

    def position(self, partitions: list[Any]) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition(tp.topic, tp.partition, -1001) for tp in partitions]

    def get_watermark_offsets(
        self, partition: Any, timeout: float = 1.0, cached: bool = False
    ) -> tuple[int, int]:
        return (0, 0)

    def close(self) -> None:
        pass


class _Producer:
    def produce(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def flush(self, timeout: float = -1) -> int:
        return 0

    def poll(self, timeout: float = -1) -> int:
        return 0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(events: int, batch_rows: int = 50_000) -> dict[str, float]:
    from confluent_kafka import Message, TopicPartition

    now = time.time_ns() // 1_000_000
    messages = [
        Message(
            topic="x.calls",
            partition=i % PARTITIONS,
            offset=i // PARTITIONS,
            key=key,
            value=value,
            timestamp=(2, now),  # LogAppendTime, as the calls topic
        )
        for i, (key, value) in enumerate(_payloads(events))
    ]
    with tempfile.TemporaryDirectory(prefix="agentledger-worker-bench-") as tmp:
        db = ClickHouse.open(f"chdb://{tmp}/ch")
        try:
            apply_migrations(db)
            stop = threading.Event()
            consumer = _Consumer(messages, stop)
            settings = Settings(
                topic_prefix="x.", control_key=SecretStr("k" * 32), kafka="127.0.0.1:1"
            )
            worker = SinkWorker(
                settings,
                SinkTables(db),
                consumer=consumer,
                producer=_Producer(),
                stop=stop,
                batch_max_rows=10_000,
                batch_max_ms=300,
                batch_catch_up_rows=batch_rows,
            )
            worker.subscribe()
            consumer.assigned = [TopicPartition("x.calls", p) for p in range(PARTITIONS)]
            worker._on_assign(consumer, consumer.assigned)
            gc.freeze()  # as the sink process does (sinks/service.py)
            gc.set_threshold(50_000, 20, 100)
            cpu, main, wall = _cpu(), time.thread_time(), time.perf_counter()
            worker.run()
            wall = time.perf_counter() - wall
            main = time.thread_time() - main
            cpu = _cpu() - cpu
            stored = int(db.writer_query("SELECT count() FROM calls").rows[0][0])
        finally:
            db.close()
    if stored != events:
        raise RuntimeError(f"stored {stored} of {events} rows")
    return {
        "events": events,
        "batches": worker.stats.batches,
        "rows_per_s": round(events / wall),
        "main_thread_cpu_us_per_row": round(main * 1e6 / events, 2),
        "other_threads_cpu_us_per_row": round((cpu - main) * 1e6 / events, 2),
        "process_cpu_us_per_row": round(cpu * 1e6 / events, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch-rows", type=int, default=50_000)
    args = parser.parse_args(argv)
    import json
    import os

    load = os.getloadavg()[0]
    result: dict[str, Any] = measure(args.events, args.batch_rows)
    result["load_avg_1m_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
