"""The sink's HTTP API against a real in-process chDB, through the real QueryClient."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from agentledger.config import Settings
from agentledger.review.query import QueryClient, QueryError, SinkNotRunningError, SinkQueryClient
from agentledger.schemas import CallEvent
from agentledger.sinks.database import ClickHouse
from agentledger.sinks.migrations import apply_migrations
from agentledger.sinks.rows import SourcePosition, call_to_row
from agentledger.sinks.server import QueryServer
from agentledger.sinks.store import SinkTables
from agentledger.sinks.streams import calls_stream
from tests.conftest import SettingsFactory

TOKEN = "server-test-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueryServer]:
    # One server for the module: no test here can change the data (writes are refused).
    database = ClickHouse.open(f"chdb://{tmp_path_factory.mktemp('sink') / 'ch'}")
    try:
        apply_migrations(database)
        rows = [
            call_to_row(
                CallEvent(
                    event_id=uuid.UUID(int=i),
                    event_time_ms=1_000 + i,
                    agent_id=f"a{i % 2}",
                    provider="p",
                    requested_model="m",
                    used_model="m",
                    cost_nano_usd=10 * i,
                    latency_ms=1,
                ),
                SourcePosition("s.calls", 0, i),
                0,
            )
            for i in range(4)
        ]
        SinkTables(database).insert(calls_stream(Settings()), rows, "s.calls:0:0-3")
        srv = QueryServer(database, 0, TOKEN, health_extra=lambda: {"lag": 0})
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()
    finally:
        database.close()


def client(srv: QueryServer, token: str = TOKEN) -> SinkQueryClient:
    return SinkQueryClient(f"http://127.0.0.1:{srv.port}", token)


def test_health_needs_no_token_and_counts_rows(server: QueryServer) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=10) as resp:
        assert resp.status == 200
        assert json.loads(resp.read()) == {"status": "ok", "rows": 4, "lag": 0}


def test_query_with_parameters(server: QueryServer) -> None:
    result = client(server).query(
        "SELECT agent_id, sum(cost_nano_usd) AS cost, any(event_id) AS id FROM calls "
        "WHERE agent_id = {a:String} GROUP BY agent_id",
        {"a": "a1"},
    )
    assert result.columns == ["agent_id", "cost", "id"]
    assert result.types == ["String", "Int64", "UUID"]
    assert result.rows[0][:2] == ["a1", 40]
    assert uuid.UUID(result.rows[0][2]).int in (1, 3)


def test_writes_are_refused_with_403(server: QueryServer) -> None:
    for sql in (
        "INSERT INTO calls (agent_id) VALUES ('x')",
        "DROP TABLE calls",
        "ALTER TABLE calls DELETE WHERE 1",
    ):
        with pytest.raises(QueryError, match=r"\(403\).*readonly"):
            client(server).query(sql)
    assert client(server).query("SELECT count() FROM calls").rows == [[4]]


def _post(srv: QueryServer, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{srv.port}/query", data=body, method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_token_is_required(server: QueryServer) -> None:
    body = json.dumps({"sql": "SELECT 1"}).encode()
    assert _post(server, body, {})[0] == 401
    assert _post(server, body, {"Authorization": "Bearer wrong"})[0] == 401
    assert _post(server, body, {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    with pytest.raises(QueryError, match="refused the API token"):
        client(server, token="nope").query("SELECT 1")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "body must be JSON"),
        (b"[1]", "body must be a JSON object"),
        (b'{"sql": ""}', "field 'sql' must be a non-empty string"),
        (b'{"sql": "SELECT 1", "parameters": [1]}', "field 'parameters' must be an object"),
        (b'{"sql": "SELEC nonsense"}', "SYNTAX_ERROR"),
    ],
)
def test_bad_requests_get_400_with_the_reason(
    server: QueryServer, body: bytes, needle: str
) -> None:
    status, reply = _post(server, body, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 400
    assert needle in str(reply["error"])


def test_client_names_the_missing_sink(settings_factory: SettingsFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connection refused
        settings = settings_factory(sink_port=port)
        query_client = QueryClient.from_settings(settings)
        with pytest.raises(SinkNotRunningError) as info:
            query_client.query("SELECT 1")
    message = str(info.value)
    assert message.startswith("the sink is not running (it owns the embedded ClickHouse at chdb://")
    assert "start it with `agentledger up`" in message
