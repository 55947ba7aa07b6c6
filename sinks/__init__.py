"""The ClickHouse sink (the write path): every CallEvent on the calls topic becomes one immutable
`calls` row. The read path (review, query client, stats) is `agentledger.review`.

Importing this package does not import clickhouse-connect or chDB (they load when a connection is
opened).
"""

from .migrations import MIGRATIONS, Migration, apply_migrations
from .results import QueryResult
from .rows import CALL_COLUMNS, RowError, SourcePosition, call_to_row, dedup_token

__all__ = [
    "CALL_COLUMNS",
    "MIGRATIONS",
    "Migration",
    "QueryResult",
    "RowError",
    "SourcePosition",
    "apply_migrations",
    "call_to_row",
    "dedup_token",
]
