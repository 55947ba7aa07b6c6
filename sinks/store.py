"""The sink's tables as the worker sees them: insert a chunk with its dedup token, find which
source offsets of a partition already landed, and which record ids are already stored."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any, Protocol, cast

import msgspec

from .call_decode import CALL_INPUT_SELECT, CALL_INPUT_STRUCTURE, canonical_lines
from .database import ClickHouse, ClickHouseError
from .rows import ms_to_datetime
from .streams import SinkStream

__all__ = ["CallsTable", "SinkStore", "SinkTables"]

log = logging.getLogger(__name__)

# Both settings are needed for a retried chunk to be dropped in the materialized views' target
# tables too, not only in the base table (NOTES.md; every table carries
# non_replicated_deduplication_window).
_INSERT_SETTINGS = {"deduplicate_blocks_in_dependent_materialized_views": 1}
# The fast decoder sends times as 'YYYY-MM-DD hh:mm:ss.fff'; rows built by call_to_row carry
# datetime objects, which msgspec writes as RFC 3339 ('...T...Z'): best_effort reads both.
_JSON_INSERT_SETTINGS = {**_INSERT_SETTINGS, "date_time_input_format": "best_effort"}
# A key repeated in one record must be refused, not read as its first copy (see call_decode).
_LINES_SETTINGS: dict[str, str | int] = {
    **_INSERT_SETTINGS,
    "input_format_json_ignore_unnecessary_fields": 0,
    # The views of `calls` run side by side instead of one after the other: the insert's wall
    # time with every view fell from 54-109k to 100-151k rows/s in interleaved passes of
    # bench/chdb_ceiling.py (same CPU); each view still dedups with the chunk's token.
    "parallel_view_processing": 1,
}
# ClickHouse's codes for input it cannot parse as sent (INCORRECT_DATA, CANNOT_PARSE_*, ...):
# such a chunk is re-sent once re-encoded; anything else is retried as it is by the worker.
_PARSE_ERRORS = frozenset({6, 26, 27, 32, 38, 41, 53, 69, 70, 72, 117, 376})


class SinkStore(Protocol):
    # rows: lists of column values, or the JSON lines of `decode_call_json` (the calls stream).
    def insert(self, stream: SinkStream, rows: Sequence[Any], token: str) -> None: ...

    def present_offsets(
        self, stream: SinkStream, topic: str, partition: int, from_offset: int
    ) -> set[int]: ...

    def present_ids(
        self, stream: SinkStream, ids: Sequence[str], from_ms: int, to_ms: int
    ) -> set[str]: ...


class SinkTables:
    def __init__(self, database: ClickHouse) -> None:
        self.database = database

    def insert(self, stream: SinkStream, rows: Sequence[Any], token: str) -> None:
        if rows and isinstance(rows[0], bytes):
            self._insert_lines(stream, cast(list[bytes], list(rows)), token)
            return
        if stream.json_insert:
            # Transposed in C (zip) and encoded in C (msgspec); ClickHouse parses the columns.
            document = msgspec.json.encode(list(zip(*rows, strict=True)))
            self.database.insert_json_columns(
                stream.table,
                document,
                stream.columns,
                settings={**_JSON_INSERT_SETTINGS, "insert_deduplication_token": token},
            )
            return
        self.database.insert(
            stream.table,
            rows,
            stream.columns,
            settings={**_INSERT_SETTINGS, "insert_deduplication_token": token},
        )

    def _insert_lines(self, stream: SinkStream, lines: list[bytes], token: str) -> None:
        """Lines from `decode_call_json`: ClickHouse parses them and computes the columns."""
        settings = {**_LINES_SETTINGS, "insert_deduplication_token": token}

        def send(body: list[bytes]) -> None:
            self.database.insert_select_json(
                stream.table,
                stream.columns,
                CALL_INPUT_SELECT,
                CALL_INPUT_STRUCTURE,
                b"\n".join(body),
                settings,
            )

        try:
            send(lines)
        except ClickHouseError as exc:
            if exc.code not in _PARSE_ERRORS:
                raise
            # Nothing was stored (one part, parsed before it is written): same token.
            log.warning("ClickHouse refused %d lines as sent, re-encoding: %s", len(lines), exc)
            send(canonical_lines(lines))

    def present_offsets(
        self, stream: SinkStream, topic: str, partition: int, from_offset: int
    ) -> set[int]:
        result = self.database.writer_query(
            f"SELECT _offset FROM {stream.table} WHERE _topic = {{t:String}} "  # noqa: S608 - table name is ours, values are parameters
            "AND _partition = {p:UInt32} AND _offset >= {o:UInt64}",
            {"t": topic, "p": partition, "o": from_offset},
        )
        return {int(row[0]) for row in result.rows}

    def present_ids(
        self, stream: SinkStream, ids: Sequence[str], from_ms: int, to_ms: int
    ) -> set[str]:
        """Which of `ids` (canonical UUID text) are stored with a time in [from_ms, to_ms]: a
        replayed record keeps its event time, so the window (partition pruning) keeps the
        lookup off old data."""
        if not ids:
            return set()
        window = (
            f"SELECT DISTINCT {stream.id_column} FROM {stream.table} "  # noqa: S608 - names are ours, values are parameters
            f"WHERE {stream.time_column} BETWEEN {{lo:DateTime64(3, 'UTC')}} "
            f"AND {{hi:DateTime64(3, 'UTC')}} AND {stream.id_column} IN "
        )
        parameters: dict[str, object] = {"lo": ms_to_datetime(from_ms), "hi": ms_to_datetime(to_ms)}
        if not self.database.embedded:
            parameters["ids"] = list(ids)
            output = self.database.writer_raw_query(
                window + "{ids:Array(UUID)} FORMAT TSV", parameters
            )
            return _lines(output)
        # In-process chDB reads a file this process writes: parsing 10k ids from a TSV file
        # takes ~3 ms, from an Array parameter ~70 ms (measured; the SQL parser is the cost).
        handle, path = tempfile.mkstemp(prefix="agentledger-ids-", suffix=".tsv")
        try:
            with os.fdopen(handle, "w", encoding="ascii") as out:
                out.write("\n".join(ids))
            parameters["path"] = path
            output = self.database.writer_raw_query(
                window + "(SELECT id FROM file({path:String}, TSV, 'id UUID')) FORMAT TSV",  # noqa: S608 - see above
                parameters,
            )
        finally:
            os.unlink(path)
        return _lines(output)

    def count(self, table: str = "calls") -> int:
        result = self.database.readonly_query(f"SELECT count() FROM {table}")  # noqa: S608 - our table name
        return int(result.rows[0][0])


# The name the server and older tests use.
CallsTable = SinkTables


def _lines(output: bytes) -> set[str]:
    return {line for line in output.decode("ascii").split("\n") if line}
