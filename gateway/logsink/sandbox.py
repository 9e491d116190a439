"""Running someone else's SQL against the index: one SELECT, bounded in time, rows and reach.

Layers, each enough on its own for what it guards:
- the statement is parsed first and must be exactly one SELECT (WITH ... SELECT, FROM-first and
  DESCRIBE/SUMMARIZE are SELECTs to DuckDB); anything else is refused before it runs;
- the database refuses files, network, extensions and settings (index.locked_down_config);
- the query runs in a transaction that is always rolled back;
- a watchdog calls `interrupt()` when the time limit passes, and at most `max_rows` rows are read.
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
from typing import Any, Final

import duckdb
import msgspec

from gateway.bus.contract import Column, LogQueryResult

log = logging.getLogger(__name__)

_INTERRUPT_EVERY_S: Final = 0.05


class QueryRefused(Exception):
    """A query that is not run, or not finished, with a code and a sentence for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_sql(cursor: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise QueryRefused unless `sql` is exactly one SELECT statement."""
    try:
        statements = cursor.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRefused("invalid_sql", f"the SQL does not parse: {exc}") from exc
    if not statements:
        raise QueryRefused("invalid_sql", "no SQL statement given")
    if len(statements) > 1:
        raise QueryRefused(
            "multiple_statements",
            f"one statement per query, got {len(statements)}; remove the `;` between them",
        )
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryRefused(
            "not_select",
            f"only SELECT queries are allowed (WITH ... SELECT included); this is {kind.name}",
        )


def run_query(
    cursor: duckdb.DuckDBPyConnection, sql: str, *, max_rows: int, timeout_s: float
) -> LogQueryResult:
    """Run one SELECT on `cursor` (a connection of its own) and return typed, JSON-able rows.

    Blocks the calling thread; raises QueryRefused on any refusal, error or time-out.
    """
    started = time.perf_counter()
    check_sql(cursor, sql)
    done = threading.Event()
    fired = threading.Event()

    def watchdog() -> None:
        fired.set()
        # Repeat: an interrupt that lands between two steps of the query is lost.
        while not done.is_set():
            cursor.interrupt()
            done.wait(_INTERRUPT_EVERY_S)

    timer = threading.Timer(timeout_s, watchdog)
    timer.daemon = True
    cursor.execute("BEGIN TRANSACTION")
    timer.start()
    try:
        cursor.execute(sql)
        description = cursor.description or []
        rows = cursor.fetchmany(max_rows + 1)
    except duckdb.Error as exc:
        if fired.is_set():
            raise QueryRefused(
                "timeout", f"the query ran longer than {timeout_s:g} s and was interrupted"
            ) from exc
        raise _refusal(exc) from exc
    finally:
        done.set()
        timer.cancel()
        _roll_back(cursor)
    if fired.is_set():
        raise QueryRefused("timeout", f"the query ran longer than {timeout_s:g} s")
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
