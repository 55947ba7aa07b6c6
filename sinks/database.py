"""The sink's ClickHouse connection: one writer session and one read-only session, one lock.

Verified on chdb-core 26.9 through clickhouse-connect 1.12 (see README.md):
- per-call `settings=` work on chDB: inserts send them as a SETTINGS clause of the INSERT
  (so `insert_deduplication_token` works per insert), queries append a SETTINGS clause;
- but statements that clickhouse-connect treats as inserts or commands apply per-call settings
  with SET and restore them afterwards. With `readonly=1` the restore itself is refused, so a
  per-call readonly on the writer session would leave that session read-only for good. The
  read-only queries therefore use a second client whose whole session is read-only (clients on
  one chDB path share the data but each has its own session settings);
- one process may open one chDB path; clients on other paths can be opened after every client
  of the previous path is closed.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .results import QueryResult, to_json_value

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

__all__ = ["CHDB_READONLY", "SERVER_READONLY", "ClickHouse", "ClickHouseError", "readonly_level"]

# readonly=1 refuses every setting change, which is the tightest; chDB needs no per-query
# settings, so the read-only session uses it. Over HTTP clickhouse-connect sends a few settings
# of its own with each request, which readonly=1 would refuse; readonly=2 still refuses every
# write, DDL and change of `readonly` itself.
CHDB_READONLY = 1
SERVER_READONLY = 2


def readonly_level(dsn: str) -> int:
    return CHDB_READONLY if dsn.startswith("chdb:") else SERVER_READONLY


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _import_error_base() -> type[Exception]:
    from clickhouse_connect.driver.exceptions import ClickHouseError as _Base

    return _Base


class ClickHouseError(RuntimeError):
    """A ClickHouse call failed; `code` is ClickHouse's error code when it reported one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def _wrap(exc: Exception) -> ClickHouseError:
    code = getattr(exc, "code", None)
    return ClickHouseError(str(exc), code if isinstance(code, int) else None)


class ClickHouse:
    """Thread-safe facade. chDB runs inside this process, so every call holds one lock; over
    HTTP the lock also keeps clickhouse-connect from running two queries in one session."""

    def __init__(
        self, writer: Client, reader: Client, description: str, *, embedded: bool = False
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._lock = threading.Lock()
        self._errors = _import_error_base()
        self.description = description
        # chDB runs in this process, so it can read files this process writes (see SinkTables).
        self.embedded = embedded

    @classmethod
    def open(cls, dsn: str) -> ClickHouse:
        import clickhouse_connect

        description = dsn if dsn.startswith("chdb:") else dsn.split("@")[-1]
        errors = _import_error_base()
        try:
            writer = clickhouse_connect.get_client(dsn=dsn)
        except errors as exc:
            raise _wrap(exc) from exc
        try:
            reader = clickhouse_connect.get_client(
                dsn=dsn, settings={"readonly": readonly_level(dsn)}
            )
        except BaseException as exc:
            writer.close()
            if isinstance(exc, errors):
                raise _wrap(exc) from exc
            raise
        return cls(writer, reader, description, embedded=dsn.startswith("chdb:"))

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> None:
        with self._lock:
            try:
                self._writer.command(sql, parameters=parameters)
            except self._errors as exc:
                raise _wrap(exc) from exc

    def insert(
        self,
        table: str,
        rows: Sequence[Sequence[object]],
        column_names: Sequence[str],
        settings: dict[str, Any] | None = None,
    ) -> None:
        with self._lock:
            try:
                self._writer.insert(table, rows, column_names=list(column_names), settings=settings)
            except self._errors as exc:
                raise _wrap(exc) from exc

    def insert_json_columns(
        self,
        table: str,
        document: bytes,
        column_names: Sequence[str],
        settings: dict[str, Any] | None = None,
    ) -> None:
        """Insert one JSONCompactColumns document (`[[column 1 values], [column 2 values], ...]`):
        ClickHouse parses it natively, far cheaper per row than building Native in Python."""
        with self._lock:
            try:
                self._writer.raw_insert(
                    table,
                    list(column_names),
                    document,
                    settings=settings,
                    fmt="JSONCompactColumns",
                )
            except self._errors as exc:
                raise _wrap(exc) from exc

    def insert_select_json(
        self,
        table: str,
        column_names: Sequence[str],
        select: str,
        structure: str,
        body: bytes,
        settings: dict[str, str | int],
    ) -> None:
        """`INSERT INTO table (columns) SELECT <select> FROM <body as JSONEachRow>`: ClickHouse
        parses the lines and computes the columns. In-process chDB reads the body from a file
        this process writes (as `raw_insert` itself does); a server reads it from the request
        through `input()`. `table`, `select` and `structure` are ours, never user input."""
        columns = ", ".join(column_names)
        # Text settings (the dedup token) go as parameters, numbers as they are.
        parameters = {f"s_{n}": v for n, v in settings.items() if isinstance(v, str)}
        clause = ", ".join(
            f"{n} = {{s_{n}:String}}" if isinstance(v, str) else f"{n} = {int(v)}"
            for n, v in settings.items()
        )
        with self._lock:
            try:
                if not self.embedded:
                    self._writer.command(
                        f"INSERT INTO {table} ({columns}) SELECT {select} "  # noqa: S608 - see docstring
                        f"FROM input({_quote(structure)}) SETTINGS {clause} FORMAT JSONEachRow",
                        parameters=parameters,
                        data=body,
                    )
                    return
                handle, path = tempfile.mkstemp(prefix="agentledger-insert-", suffix=".json")
                try:
                    with os.fdopen(handle, "wb") as out:
                        out.write(body)
                    parameters["path"] = path
                    self._writer.command(
                        f"INSERT INTO {table} ({columns}) SELECT {select} "  # noqa: S608 - see docstring
                        f"FROM file({{path:String}}, JSONEachRow, {_quote(structure)}) "
                        f"SETTINGS {clause}",
                        parameters=parameters,
                    )
                finally:
                    os.unlink(path)
            except self._errors as exc:
                raise _wrap(exc) from exc

    def writer_raw_query(self, sql: str, parameters: dict[str, Any] | None = None) -> bytes:
        """The raw output of a writer-session query (give it a FORMAT clause): no per-value
        decoding in Python, for the sink's bookkeeping lookups."""
        with self._lock:
            try:
                return bytes(self._writer.raw_query(sql, parameters=parameters))
            except self._errors as exc:
                raise _wrap(exc) from exc

    def writer_query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        """A query on the writer session: for the sink's own bookkeeping, never user SQL."""
        return self._query(self._writer, sql, parameters)

    def readonly_query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        """User SQL: runs in the read-only session, so writes and DDL are refused by ClickHouse."""
        return self._query(self._reader, sql, parameters)

    def _query(self, client: Client, sql: str, parameters: dict[str, Any] | None) -> QueryResult:
        with self._lock:
            try:
                result = client.query(sql, parameters=parameters)
                return QueryResult(
                    columns=list(result.column_names),
                    types=[t.name for t in result.column_types],
                    rows=[[to_json_value(v) for v in row] for row in result.result_rows],
                )
            except self._errors as exc:
                raise _wrap(exc) from exc
            except (ValueError, TypeError) as exc:
                # clickhouse-connect raises these for unbindable parameters and for statements
                # that return no result set (e.g. SYSTEM ...): the caller's SQL, not our state.
                raise ClickHouseError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            for client in (self._reader, self._writer):
                client.close()
