"""`agentledger up --brokers 3 --processors 2` as a user runs it: a real 3-node KRaft cluster on
loopback, topics replicated 3 times, two processor workers on their own ports in one group,
and `agentledger down` without flags stopping every node and worker it started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from tests.integration.test_cluster import free_port_block

pytestmark = [
    pytest.mark.integration,
    pytest.mark.cluster,
    pytest.mark.skipif(
        os.environ.get("AGENTLEDGER_TEST_CLUSTER") != "1",
        reason="up --brokers 3 --processors 2 takes minutes: run with `make test-cluster`",
    ),
]


def cli(
    env: dict[str, str], *args: str, timeout_s: float = 400
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentledger", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_up_brokers_3_processors_2_then_down(tmp_path: Path) -> None:
    kafka = free_port_block(6)
    workers = free_port_block(13)
    env = {
        **os.environ,
        "AGENTLEDGER_HOME": str(tmp_path / "home"),
        "AGENTLEDGER_KAFKA": f"127.0.0.1:{kafka}",
        "AGENTLEDGER_KAFKA_CONTROLLER_PORT": str(kafka + 1),
        # The default 512m: one of 3 brokers ran out of a 256m heap at start in a CI run.
        "AGENTLEDGER_KAFKA_HEAP": "512m",
        "AGENTLEDGER_TOPIC_PREFIX": "up3.",
        "AGENTLEDGER_PROCESSOR_PORT": str(workers),
        "AGENTLEDGER_SINK_PORT": str(workers + 1),
        "AGENTLEDGER_DASHBOARD_PORT": str(workers + 2),
    }
    up = cli(env, "up", "--brokers", "3", "--processors", "2", "--timeout", "300")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        status = cli(env, "status", "--json", timeout_s=60)
        rows = {r["name"]: r for r in json.loads(status.stdout)}
        assert {"kafka-1", "kafka-2", "kafka-3", "processor", "processor-2", "sink"} <= set(rows)
        assert all(r["healthy"] for r in rows.values()), rows
        assert rows["processor-2"]["address"] == f"127.0.0.1:{workers + 10}"
        assert [rows[f"kafka-{i}"]["address"] for i in (1, 2, 3)] == [
            f"127.0.0.1:{kafka + 2 * i}" for i in range(3)
        ]
        bootstrap = ",".join(rows[f"kafka-{i}"]["address"] for i in (1, 2, 3))
        metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
        assert len(metadata.brokers) == 3
        calls = metadata.topics["up3.calls"].partitions.values()
        assert {len(p.replicas) for p in calls} == {3}
        pids = [r["pid"] for r in rows.values() if r["pid"]]
    finally:
        down = cli(env, "down", timeout_s=300)
    assert down.returncode == 0, down.stdout + down.stderr
    for name in ("kafka", "processor", "processor-2", "sink"):
        assert name in down.stdout
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        ), f"pid {pid} still runs after down"
