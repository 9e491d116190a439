"""The DuckDB index: one database per data folder, opened by the log sink alone.

The database is opened locked down as a whole, not per connection: in DuckDB external access,
extension loading, the memory limit and the thread count are settings of the database, and
`lock_configuration` makes them final. The sink's own writes never need files beyond the
database itself (batches arrive as query parameters), so the writer loses nothing by it, and a
query connection cannot turn any of it back on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Final

import duckdb
import msgspec

from gateway.logsink import schema
from gateway.logsink.records import TERMINAL, JobDelta

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
            self._drop_event_key()
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

    def _drop_event_key(self) -> None:
        """Copy an older index's `events` into a table without its key (whose index grew in
        memory with every event). Its stream position is unknown then: see sink.py."""
        keyed = self._con.execute(
            "SELECT count(*) FROM duckdb_constraints() WHERE database_name = current_database() "
            "AND table_name = 'events' AND constraint_type IN ('PRIMARY KEY', 'UNIQUE')"
        ).fetchone()
        if keyed is None or not keyed[0]:
            return
        log.warning("the index's events lose their key (once; this takes a while on a big index)")
        self._con.execute("BEGIN TRANSACTION")
        try:
            self._con.execute(schema.EVENTS_TABLE.format(name="events_unkeyed"))
            self._con.execute("INSERT INTO events_unkeyed SELECT * FROM events")
            self._con.execute("DROP TABLE events")
            self._con.execute("ALTER TABLE events_unkeyed RENAME TO events")
            self._con.execute("DELETE FROM sink_position")
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        self._con.execute("CHECKPOINT")

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new connection to the same database (for queries on another thread)."""
        return self._con.cursor()

    def begin(self) -> None:
        self._con.execute("BEGIN TRANSACTION")

    def commit(self) -> None:
        self._con.execute("COMMIT")

    def rollback(self) -> None:
        self._con.execute("ROLLBACK")

    def insert_events(self, lines: list[bytes]) -> None:
        """Insert events given as their JSON lines (none of them in the index yet)."""
        if lines:
            batch = (b"[" + b",".join(lines) + b"]").decode()
            self._con.execute(schema.INSERT_EVENTS, [batch])

    def known_event_ids(self, event_ids: list[str]) -> set[str]:
        """Those of `event_ids` the index holds (a scan of every event: for rare checks)."""
        if not event_ids:
            return set()
        rows = self._con.execute(schema.KNOWN_EVENT_IDS, [event_ids]).fetchall()
        return {row[0] for row in rows}

    def position(self, stream: str, created: str) -> int | None:
        """How far into the stream `stream` made at `created` the index holds every event;
        None when it does not know (a new or rebuilt index, or another stream of that name)."""
        row = self._con.execute(
            "SELECT upto FROM sink_position WHERE stream = $1 AND stream_created = $2",
            [stream, created],
        ).fetchone()
        return None if row is None else int(row[0])

    def set_position(self, stream: str, created: str, upto: int) -> None:
        """Record where the index stands in the stream (its own transaction)."""
        self.begin()
        try:
            self._con.execute("DELETE FROM sink_position")
            self._con.execute(
                "INSERT INTO sink_position VALUES ($1, $2, $3)", [stream, created, upto]
            )
            self.commit()
        except BaseException:
            self.rollback()
            raise

    def advance_position(self, upto: int) -> None:
        """Move the recorded position forward, inside the batch's transaction."""
        self._con.execute("UPDATE sink_position SET upto = greatest(upto, $1)", [upto])

    def upsert_jobs(self, deltas: list[JobDelta]) -> None:
        """Merge each job's delta into its row in `jobs`."""
        if deltas:
            self._con.execute(schema.UPSERT_JOBS, [_encoder.encode(deltas).decode()])

    def job_places(self, job_ids: list[str]) -> dict[str, tuple[str, int]]:
        """The log file (data-relative) and newest seq of each of these jobs the index knows."""
        if not job_ids:
            return {}
        rows = self._con.execute(
            "SELECT job_id, log_file_path, last_seq FROM jobs "
            "WHERE job_id IN (SELECT unnest($1)) AND log_file_path IS NOT NULL",
            [job_ids],
        ).fetchall()
        return {job_id: (path, int(last_seq)) for job_id, path, last_seq in rows}

    def jobs_before(self, cutoff: float, limit: int) -> list[tuple[str, str | None]]:
        """Up to `limit` jobs past the retention, oldest first, with their log files: ended
        ones whose last event is older than `cutoff` (epoch seconds), and any whose last event
        is older than twice the retention.

        An open job is left alone: its events may still be arriving (a sink catching up on old
        events), and a log cut in the middle would be started again in a second file.
        """
        now_us = round(time.time() * 1e6)
        cutoff_us = round(cutoff * 1e6)
        rows = self._con.execute(
            "SELECT job_id, log_file_path FROM jobs "
            "WHERE (status IN (SELECT unnest($1)) AND last_event_at < make_timestamp($2)) "
            "   OR last_event_at < make_timestamp($3) "
            "ORDER BY last_event_at LIMIT $4",
            [sorted(TERMINAL), cutoff_us, cutoff_us - (now_us - cutoff_us), limit],
        ).fetchall()
        return [(str(job_id), path) for job_id, path in rows]

    def delete_jobs(self, job_ids: list[str]) -> None:
        """Delete these jobs' events, webhook attempts and rows (inside the caller's
        transaction)."""
        self._con.execute("DELETE FROM events WHERE job_id IN (SELECT unnest($1))", [job_ids])
        self._con.execute(
            "DELETE FROM webhook_deliveries WHERE job_id IN (SELECT unnest($1))", [job_ids]
        )
        self._con.execute("DELETE FROM jobs WHERE job_id IN (SELECT unnest($1))", [job_ids])

    def memory_use(self) -> int:
        """Bytes DuckDB holds in memory for this database (its buffer pool)."""
        row = self._con.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()
        return int(row[0] or 0) if row is not None else 0

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
