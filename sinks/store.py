"""The `calls` table as the worker sees it: insert a chunk with its dedup token, and find which
source offsets of a partition already landed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .database import ClickHouse
from .rows import CALL_COLUMNS

__all__ = ["CallsStore", "CallsTable"]


class CallsStore(Protocol):
    def insert_calls(self, rows: Sequence[Sequence[object]], token: str) -> None: ...

    def present_offsets(self, topic: str, partition: int, from_offset: int) -> set[int]: ...


class CallsTable:
    def __init__(self, database: ClickHouse, table: str = "calls") -> None:
        self.database = database
        self.table = table

    def insert_calls(self, rows: Sequence[Sequence[object]], token: str) -> None:
        self.database.insert(
            self.table, rows, CALL_COLUMNS, settings={"insert_deduplication_token": token}
        )

    def present_offsets(self, topic: str, partition: int, from_offset: int) -> set[int]:
        result = self.database.writer_query(
            f"SELECT _offset FROM {self.table} WHERE _topic = {{t:String}} "  # noqa: S608 - table name is ours, values are parameters
            "AND _partition = {p:UInt32} AND _offset >= {o:UInt64}",
            {"t": topic, "p": partition, "o": from_offset},
        )
        return {int(row[0]) for row in result.rows}

    def count(self) -> int:
        result = self.database.readonly_query(f"SELECT count() FROM {self.table}")  # noqa: S608 - our table name
        return int(result.rows[0][0])
