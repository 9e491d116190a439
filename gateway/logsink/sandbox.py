"""Running someone else's SQL on the index: one read-only query, bounded in time, rows and reach.

Layers, each enough on its own for what it guards:
- the statement is parsed first and must be one query that only reads, down to its CTEs and
  subqueries (statements.py); anything else is refused before it runs;
- a query for one caller sees only that caller's jobs (tenancy.py);
- the database refuses files, network, extensions and settings (index.locked_down_config);
- the query runs in a transaction that is always rolled back;
- a watchdog calls `interrupt()` when the time limit passes or the query is cancelled (its
  asker gave up), and at most `max_rows` rows are read.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

import duckdb
import msgspec

from gateway.bus.contract import Column, LogQueryResult
from gateway.logsink.refusal import QueryRefused
from gateway.logsink.statements import check_sql
from gateway.logsink.tenancy import scope_to_caller

__all__ = ["QueryRefused", "Stopper", "check_sql", "run_query", "run_read", "to_jsonable"]

log = logging.getLogger(__name__)

_INTERRUPT_EVERY_S: Final = 0.05


class Stopper:
    """Interrupts one query on its connection: at its time limit, or once `cancel()` is called.

    Thread-safe; `cancel()` may come from any thread, before, during or after the query.
    """

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._done = threading.Event()
        self.cancelled = False
        self.fired = False

    def cancel(self) -> None:
        """Stop the query as soon as possible (its asker is gone)."""
        self.cancelled = True
        self._wake.set()

    def watch(self, cursor: duckdb.DuckDBPyConnection, timeout_s: float) -> threading.Thread:
        """Start the watchdog thread for a query that starts now."""
        thread = threading.Thread(
            target=self._run, args=(cursor, timeout_s), name="logsink-watchdog", daemon=True
        )
        thread.start()
        return thread

    def finish(self) -> None:
        """The query is over: the watchdog stops interrupting and ends."""
        self._done.set()
        self._wake.set()

    def _run(self, cursor: duckdb.DuckDBPyConnection, timeout_s: float) -> None:
        self._wake.wait(timeout_s)
        if self._done.is_set():
            return
        self.fired = True
        # Repeat: an interrupt that lands between two steps of the query is lost.
        while not self._done.is_set():
            cursor.interrupt()
            self._done.wait(_INTERRUPT_EVERY_S)

    def refusal(self, timeout_s: float) -> QueryRefused:
        """Why the query was stopped, as the answer its asker (if still there) gets."""
        if self.cancelled:
            return QueryRefused("cancelled", "the query was cancelled: its asker gave up")
        return QueryRefused(
            "timeout", f"the query ran longer than {timeout_s:g} s and was interrupted"
        )


def run_query(
    cursor: duckdb.DuckDBPyConnection,
    sql: str,
    *,
    max_rows: int,
    timeout_s: float,
    caller: str | None = None,
    catalog: str = "",
    stopper: Stopper | None = None,
) -> LogQueryResult:
    """Run one read-only query on `cursor` (a connection of its own); typed, JSON-able rows.

    With `caller`, the query sees only that caller's jobs (`catalog`: the index's database
    name). Blocks the calling thread; raises QueryRefused on any refusal, error, time-out or
    cancel.
    """
    started = time.perf_counter()
    check_sql(cursor, sql, scoped=caller is not None)

    def scope() -> None:
        if caller is not None:
            scope_to_caller(cursor, catalog, caller)

    return _execute(cursor, sql, [], max_rows, timeout_s, stopper or Stopper(), started, scope)


def run_read(
    cursor: duckdb.DuckDBPyConnection,
    sql: str,
    params: list[Any],
    *,
    max_rows: int,
    timeout_s: float,
    stopper: Stopper | None = None,
) -> LogQueryResult:
    """Run the sink's own SQL (never a request's text) as `run_query` runs a checked one."""
    started = time.perf_counter()
    return _execute(cursor, sql, params, max_rows, timeout_s, stopper or Stopper(), started)


def _execute(
    cursor: duckdb.DuckDBPyConnection,
    sql: str,
    params: list[Any],
    max_rows: int,
    timeout_s: float,
    stopper: Stopper,
    started: float,
    prepare: Callable[[], None] | None = None,
) -> LogQueryResult:
    cursor.execute("BEGIN TRANSACTION")
    watchdog: threading.Thread | None = None
    try:
        if prepare is not None:
            prepare()
        watchdog = stopper.watch(cursor, timeout_s)
        if params:
            cursor.execute(sql, params)
        else:
            cursor.execute(sql)
        description = cursor.description or []
        rows = cursor.fetchmany(max_rows + 1)
    except duckdb.Error as exc:
        if stopper.fired:
            raise stopper.refusal(timeout_s) from exc
        raise _refusal(exc) from exc
    finally:
        stopper.finish()
        if watchdog is not None:
            watchdog.join()
        _roll_back(cursor)
    if stopper.fired:
        raise stopper.refusal(timeout_s)
    columns = [Column(name=str(d[0]), type=str(d[1])) for d in description]
    truncated = len(rows) > max_rows
    converters = [_converter(column.type) for column in columns]
    body = [
        [convert(value) for convert, value in zip(converters, row, strict=True)]
        for row in rows[:max_rows]
    ]
    return LogQueryResult(
        columns=columns,
        rows=body,
        truncated=truncated,
        elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
    )


def _roll_back(cursor: duckdb.DuckDBPyConnection) -> None:
    try:
        cursor.execute("ROLLBACK")
    except duckdb.Error:
        log.exception("rolling back a query's transaction failed")


def _refusal(exc: duckdb.Error) -> QueryRefused:
    if isinstance(exc, duckdb.PermissionException):
        return QueryRefused(
            "forbidden", f"queries may not touch files, the network or extensions: {exc}"
        )
    if isinstance(exc, duckdb.InvalidInputException) and "configuration" in str(exc):
        return QueryRefused("forbidden", f"settings cannot be changed: {exc}")
    if isinstance(exc, duckdb.OutOfMemoryException):
        return QueryRefused("out_of_memory", f"the query needs more memory than allowed: {exc}")
    if isinstance(exc, duckdb.InterruptException):
        return QueryRefused("interrupted", "the query was interrupted")
    if isinstance(exc, duckdb.ParserException | duckdb.BinderException | duckdb.CatalogException):
        return QueryRefused("invalid_sql", str(exc))
    return QueryRefused("query_failed", f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------------------------
# DuckDB values as JSON values


def _converter(type_name: str) -> Any:
    if type_name == "JSON":
        return _json_value
    return to_jsonable


def _json_value(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return msgspec.json.decode(value)
        except msgspec.DecodeError:
            return value
    return to_jsonable(value)


def to_jsonable(value: Any) -> Any:
    """A DuckDB result value as plain JSON: times as ISO strings, decimals as floats, etc."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        # Beyond 64 bits (HUGEINT) JSON readers lose precision; a string keeps every digit.
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set):
        return [to_jsonable(item) for item in value]
    return str(value)
