"""The DuckDB index: one database per data folder, opened by the log sink alone.

The database is opened locked down as a whole, not per connection: in DuckDB external access,
extension loading, the memory limit and the thread count are settings of the database, and
`lock_configuration` makes them final. The sink's own writes never need files beyond the
database itself (batches arrive as query parameters), so the writer loses nothing by it, and a
query connection cannot turn any of it back on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final

import duckdb
import msgspec

from gateway.logsink import schema
from gateway.logsink.records import JobDelta

log = logging.getLogger(__name__)

_encoder: Final = msgspec.json.Encoder()


class IndexLockedError(RuntimeError):
    """Another process holds the index file (a log sink is running on this data folder)."""


def locked_down_config(memory_limit: str, threads: int) -> dict[str, Any]:
    """DuckDB settings that keep SQL inside the database and within bounds."""
    return {
        "enable_external_access": False,
        "autoload_known_extensions": False,
        "autoinstall_known_extensions": False,
        "allow_community_extensions": False,
        "memory_limit": memory_limit,
        "threads": threads,
        "lock_configuration": True,
    }


# Index files an IndexDB of this process has open: DuckDB lets a second connection of the same
# process share the database, so its file lock says nothing about a sink running in-process.
_open_here: set[Path] = set()


def open_database(path: Path, *, memory_limit: str, threads: int) -> duckdb.DuckDBPyConnection:
    """Open (or create) the index file with the locked-down settings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.resolve() in _open_here:
        raise IndexLockedError(f"{path} is in use by a log sink in this process")
    try:
        return duckdb.connect(str(path), config=locked_down_config(memory_limit, threads))
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise IndexLockedError(
                f"{path} is in use by another process (a running log sink?): {exc}"
            ) from exc
        raise
    except duckdb.ConnectionException as exc:
        raise IndexLockedError(f"{path} is open in this process already: {exc}") from exc


class IndexDB:
    """The write side of the index. Not thread-safe: one thread (the sink's writer) uses it."""

    def __init__(self, path: Path, *, memory_limit: str = "1GB", threads: int = 2) -> None:
        self.path = path
        self._con = open_database(path, memory_limit=memory_limit, threads=threads)
        try:
            for statement in schema.TABLES:
                self._con.execute(statement)
            self._add_columns()
            for statement in schema.VIEWS:
                self._con.execute(statement)
        except BaseException:
            self._con.close()
            raise
        self._key = path.resolve()
        _open_here.add(self._key)

    def _add_columns(self) -> None:
        """Give an index made by an older build the columns added since, filled from events."""
        for table, column, kind in schema.ADDED_COLUMNS:
            present = self._con.execute(
                "SELECT count(*) FROM duckdb_columns() WHERE database_name = current_database() "
                "AND schema_name = 'main' AND table_name = $1 AND column_name = $2",
                [table, column],
            ).fetchone()
            if present is not None and present[0]:
                continue
            log.info("the index gains the column %s.%s", table, column)
            self._con.execute("BEGIN TRANSACTION")
            try:
                self._con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")
                fill = schema.FILL_COLUMN.get((table, column))
                if fill is not None:
                    self._con.execute(fill)
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new connection to the same database (for queries on another thread)."""
        return self._con.cursor()

    def begin(self) -> None:
        self._con.execute("BEGIN TRANSACTION")

    def commit(self) -> None:
        self._con.execute("COMMIT")

    def rollback(self) -> None:
        self._con.execute("ROLLBACK")

    def insert_events(self, lines: list[bytes]) -> set[str]:
        """Insert events given as their JSON lines; return the ids that were not there yet."""
        if not lines:
            return set()
        batch = (b"[" + b",".join(lines) + b"]").decode()
        rows = self._con.execute(schema.INSERT_EVENTS, [batch]).fetchall()
        return {row[0] for row in rows}

    def upsert_jobs(self, deltas: list[JobDelta]) -> None:
        """Merge each job's delta into its row in `jobs`."""
        if deltas:
            self._con.execute(schema.UPSERT_JOBS, [_encoder.encode(deltas).decode()])

    def job_paths(self, job_ids: list[str]) -> dict[str, str]:
        """The log file (data-relative) of each of these jobs that the index knows."""
        if not job_ids:
            return {}
        rows = self._con.execute(
            "SELECT job_id, log_file_path FROM jobs "
            "WHERE job_id IN (SELECT unnest($1)) AND log_file_path IS NOT NULL",
            [job_ids],
        ).fetchall()
        return {job_id: path for job_id, path in rows}

    def indexed_files(self) -> dict[str, int]:
        """Each log file the index knows, with how many of its bytes are indexed."""
        rows = self._con.execute(
            "SELECT log_file_path, max(log_bytes) FROM jobs "
            "WHERE log_file_path IS NOT NULL GROUP BY ALL"
        ).fetchall()
        return {path: int(size) for path, size in rows}

    def execute(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run trusted SQL of the sink itself (tests and tools); never user SQL."""
        return self._con.execute(sql, params or []).fetchall()

    def close(self) -> None:
        _open_here.discard(self._key)
        self._con.close()
