"""QueryClient: read-only SQL over the call history, for the CLI and the dashboard.

With the embedded engine only the sink process may open chDB, so the client asks the sink over
HTTP (stdlib only, so the CLI needs no ClickHouse client for it). With a ClickHouse server it
connects directly, in a read-only session.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from agentledger.config import Settings
from agentledger.sinks.results import QueryResult

__all__ = [
    "DirectQueryClient",
    "QueryClient",
    "QueryError",
    "QueryResult",
    "SinkNotRunningError",
    "SinkQueryClient",
]


class QueryError(RuntimeError):
    """The query was refused or failed; the message is ClickHouse's or the sink's."""


class SinkNotRunningError(QueryError):
    pass


class QueryClient:
    """Base of the two ways to query; use `QueryClient.from_settings(settings)`."""

    @classmethod
    def from_settings(cls, settings: Settings) -> QueryClient:
        if settings.embedded_clickhouse:
            return SinkQueryClient(
                f"http://127.0.0.1:{settings.sink_port}",
                settings.api_token_value(),
                engine_location=settings.clickhouse_dsn,
            )
        return DirectQueryClient(settings.clickhouse_dsn)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections; the HTTP client holds none."""


class SinkQueryClient(QueryClient):
    def __init__(
        self, base_url: str, token: str, engine_location: str = "", timeout_s: float = 60.0
    ) -> None:
        if not base_url.startswith(("http://127.0.0.1:", "http://localhost:", "http://[::1]:")):
            raise ValueError(f"the sink API is served on loopback only, got {base_url!r}")
        self.base_url = base_url
        self._token = token
        self.engine_location = engine_location
        self.timeout_s = timeout_s

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        body = json.dumps({"sql": sql, "parameters": parameters or {}}).encode()
        request = urllib.request.Request(  # noqa: S310 - loopback http URL checked in __init__
            f"{self.base_url}/query",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            if exc.code == 401:
                raise QueryError(
                    "the sink refused the API token (401): use the same "
                    "AGENTLEDGER_HOME / AGENTLEDGER_API_TOKEN as the stack"
                ) from exc
            raise QueryError(f"query failed ({exc.code}): {detail}") from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise SinkNotRunningError(
                f"the sink is not running (it owns the embedded ClickHouse at "
                f"{self.engine_location or 'the state dir'}); start it with `agentledger up` "
                f"[{self.base_url}: {getattr(exc, 'reason', exc)}]"
            ) from exc
        return QueryResult(
            columns=list(payload["columns"]),
            rows=list(payload["rows"]),
            types=list(payload.get("types", [])),
        )


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return str(exc.reason)
    return str(body.get("error", body)) if isinstance(body, dict) else str(body)


class DirectQueryClient(QueryClient):
    """A ClickHouse server through clickhouse-connect, in a read-only session."""

    def __init__(self, dsn: str) -> None:
        from agentledger.sinks.database import ClickHouse

        self._database = ClickHouse.open(dsn)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        from agentledger.sinks.database import ClickHouseError

        try:
            return self._database.readonly_query(sql, parameters)
        except ClickHouseError as exc:
            raise QueryError(str(exc)) from exc

    def close(self) -> None:
        self._database.close()
