"""The sink's tables as the worker sees them: insert a chunk with its dedup token, find which
source offsets of a partition already landed, and which record ids are already stored."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol

from .database import ClickHouse
from .rows import ms_to_datetime
from .streams import SinkStream

__all__ = ["CallsTable", "SinkStore", "SinkTables"]

# Both settings are needed for a retried chunk to be dropped in the materialized views' target
# tables too, not only in the base table (NOTES.md; every table carries
# non_replicated_deduplication_window).
_INSERT_SETTINGS = {"deduplicate_blocks_in_dependent_materialized_views": 1}


class SinkStore(Protocol):
    def insert(self, stream: SinkStream, rows: Sequence[Sequence[object]], token: str) -> None: ...

    def present_offsets(
        self, stream: SinkStream, topic: str, partition: int, from_offset: int
    ) -> set[int]: ...

    def present_ids(
        self, stream: SinkStream, ids: Sequence[uuid.UUID], from_ms: int, to_ms: int
    ) -> set[uuid.UUID]: ...


class SinkTables:
    def __init__(self, database: ClickHouse) -> None:
        self.database = database

    def insert(self, stream: SinkStream, rows: Sequence[Sequence[object]], token: str) -> None:
        self.database.insert(
            stream.table,
            rows,
            stream.columns,
            settings={**_INSERT_SETTINGS, "insert_deduplication_token": token},
        )

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
        self, stream: SinkStream, ids: Sequence[uuid.UUID], from_ms: int, to_ms: int
    ) -> set[uuid.UUID]:
        """Which of `ids` are stored with a time in [from_ms, to_ms]: a replayed record keeps its
        event time, so the window (partition pruning) plus the id's bloom filter index keep the
        lookup off old data."""
        if not ids:
            return set()
        result = self.database.writer_query(
            f"SELECT DISTINCT {stream.id_column} FROM {stream.table} "  # noqa: S608 - names are ours, values are parameters
            f"WHERE {stream.time_column} BETWEEN {{lo:DateTime64(3, 'UTC')}} "
            f"AND {{hi:DateTime64(3, 'UTC')}} AND {stream.id_column} IN {{ids:Array(UUID)}}",
            {"lo": ms_to_datetime(from_ms), "hi": ms_to_datetime(to_ms), "ids": list(ids)},
        )
        return {uuid.UUID(str(row[0])) for row in result.rows}

    def count(self, table: str = "calls") -> int:
        result = self.database.readonly_query(f"SELECT count() FROM {table}")  # noqa: S608 - our table name
        return int(result.rows[0][0])


# The name the server and older tests use.
CallsTable = SinkTables
