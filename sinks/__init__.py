"""The ClickHouse sink: every CallEvent on the calls topic becomes one immutable `calls` row.

Importing this package does not import clickhouse-connect or chDB (they load when a connection is
opened), so the CLI can use QueryClient against a running sink with the base install.
"""

from .migrations import MIGRATIONS, Migration, apply_migrations
from .query import QueryClient, QueryError, QueryResult, SinkNotRunningError
from .review import SpendRow, spend_by_agent_model
from .rows import CALL_COLUMNS, RowError, SourcePosition, call_to_row, dedup_token

__all__ = [
    "CALL_COLUMNS",
    "MIGRATIONS",
    "Migration",
    "QueryClient",
    "QueryError",
    "QueryResult",
    "RowError",
    "SinkNotRunningError",
    "SourcePosition",
    "SpendRow",
    "apply_migrations",
    "call_to_row",
    "dedup_token",
    "spend_by_agent_model",
]
