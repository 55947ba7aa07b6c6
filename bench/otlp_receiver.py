"""P8: OTLP receiver throughput: GenAI spans/s through the real receiver process
(``python -m agentledger.otlp``) into Kafka, and the receiver's CPU per span.

The receiver runs as its own process against the broker; clients in this process POST
pre-encoded ExportTraceServiceRequests (``batch`` chat spans each, protobuf, optionally gzip,
keep-alive connections) and count only 200 answers, each of which means the request's events
were confirmed by Kafka. CPU per span is the receiver process's user+system time (from
/proc/<pid>/stat) over the run, divided by the spans.

``.venv/bin/python -m bench.otlp_receiver --spans 50000 --batch 512 [--clients 2] [--gzip]
[--bootstrap host:port]`` (without --bootstrap, against a private broker it starts and stops).
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

TOPIC_PREFIX = "bench."
# Real call sizes from the Azure conversation trace (first rows of azure_llm_trace_2023_conv.csv).
SIZES = [(374, 44), (396, 109), (879, 55), (91, 16), (91, 16), (2738, 232), (733, 178)]
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-haiku-latest"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kv(key: str, value: str | int) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def request_body(first: int, batch: int, now_ns: int) -> bytes:
    """``batch`` chat spans as an instrumentation exports them, ids unique from ``first``."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(_kv("service.name", "bench-svc"))
    scope = resource_spans.scope_spans.add()
    scope.scope.name = "opentelemetry.instrumentation.openai_v2"
    for n in range(first, first + batch):
        inp, out = SIZES[n % len(SIZES)]
        model = MODELS[n % len(MODELS)]
        span = scope.spans.add()
        span.trace_id = n.to_bytes(16, "big")
        span.span_id = (n + 1).to_bytes(8, "big")
        span.name = f"chat {model}"
        span.kind = 3  # CLIENT
        span.start_time_unix_nano = now_ns + n * 1000
        span.end_time_unix_nano = now_ns + n * 1000 + 400_000_000
        span.attributes.extend(
            [
                _kv("gen_ai.operation.name", "chat"),
                _kv("gen_ai.provider.name", "anthropic" if "claude" in model else "openai"),
                _kv("gen_ai.request.model", model),
                _kv("gen_ai.response.model", model),
                _kv("gen_ai.agent.name", f"agent-{n % 64}"),
                _kv("gen_ai.conversation.id", f"conv-{n % 512}"),
                _kv("gen_ai.usage.input_tokens", inp),
                _kv("gen_ai.usage.output_tokens", out),
                _kv("server.address", "api.example"),
            ]
        )
    return bytes(request.SerializeToString())


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the receiver exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the receiver did not become healthy")


def measure(
    bootstrap: str,
    home: Path,
    spans: int = 50_000,
    batch: int = 512,
    clients: int = 2,
    compress: bool = False,
) -> dict[str, Any]:
    port = _free_port()
    env = {
        **os.environ,
        "AGENTLEDGER_KAFKA": bootstrap,
        "AGENTLEDGER_HOME": str(home),
        "AGENTLEDGER_TOPIC_PREFIX": TOPIC_PREFIX,
        "AGENTLEDGER_OTLP_PORT": str(port),
        "AGENTLEDGER_API_TOKEN": "bench-token",
        "AGENTLEDGER_CONTROL_KEY": "bench-control-key-0123456789abcdef",
    }
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "otlp.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentledger.otlp"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    try:
        _wait_healthy(port, proc)
        requests = max(spans // batch, 1)
        now_ns = time.time_ns()
        bodies = [request_body(i * batch, batch, now_ns) for i in range(requests)]
        if compress:
            bodies = [gzip.compress(b) for b in bodies]
        headers = {"Content-Type": "application/x-protobuf"}
        if compress:
            headers["Content-Encoding"] = "gzip"
        # One warm-up request: first-use costs (producer connection, price lookups) aside.
        warm = request_body(10**9, batch, now_ns)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/v1/traces", gzip.compress(warm) if compress else warm, headers)
        assert connection.getresponse().read() is not None
        connection.close()
        failures: list[str] = []
        accepted = [0] * clients

        def client(index: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for body in bodies[index::clients]:
                conn.request("POST", "/v1/traces", body, headers)
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    accepted[index] += batch
                else:
                    failures.append(str(response.status))
            conn.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        cpu_before = _cpu_s(proc.pid)
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        cpu = _cpu_s(proc.pid) - cpu_before
        done = sum(accepted)
        return {
            "spans": done,
            "requests": requests,
            "batch": batch,
            "clients": clients,
            "gzip": compress,
            "failed_requests": len(failures),
            "seconds": round(elapsed, 2),
            "spans_per_s": round(done / elapsed) if elapsed else None,
            "receiver_cpu_s": round(cpu, 2),
            "cpu_us_per_span": round(cpu / done * 1e6, 1) if done else None,
            "load_average": os.getloadavg()[0],
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    from agentledger.deploy import KafkaBroker
    from agentledger.schemas import Topics
    from agentledger.schemas.topic_specs import topic_specs
    from agentledger.topic_admin import ensure_topics

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--gzip", action="store_true")
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agentledger-p8-") as tmp:
        home = Path(tmp) / "home"
        if args.bootstrap:
            ensure_topics(args.bootstrap, topic_specs(Topics(TOPIC_PREFIX)))
            result = measure(args.bootstrap, home, args.spans, args.batch, args.clients, args.gzip)
        else:
            broker = KafkaBroker(
                state_dir=Path(tmp) / "kafka", port=_free_port(), controller_port=_free_port()
            )
            broker.start()
            try:
                ensure_topics(broker.bootstrap, topic_specs(Topics(TOPIC_PREFIX)))
                result = measure(
                    broker.bootstrap, home, args.spans, args.batch, args.clients, args.gzip
                )
            finally:
                broker.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
