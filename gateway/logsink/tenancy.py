"""One caller's view of the index: its jobs, their events, and the views made of them.

Inside the transaction a caller's query runs in, temporary views named like the index's tables
and views (`events`, `jobs`, `node_runs`, ...) hold only the rows of the caller's jobs. DuckDB
looks a name up in the temporary catalog first, so the query's `FROM events` reads the view;
the statement check (statements.py) refuses every name that could reach past it (a schema or
catalog, the system views, table functions other than generators). The views vanish with the
transaction's rollback, so the same connection serves the next caller, or an admin, unscoped.
"""

from __future__ import annotations

import duckdb

from gateway.logsink.schema import VIEW_BODIES


def _literal(text: str) -> str:
    # DuckDB's string literals have no backslash escapes: doubling the quote is the whole rule.
    return "'" + text.replace("'", "''") + "'"


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def scoped_views(catalog: str, caller: str) -> list[str]:
    """The statements that shadow every table and view with `caller`'s rows (in order)."""
    base = f"{_identifier(catalog)}.main"
    mine = f"SELECT job_id FROM {base}.jobs WHERE caller = {_literal(caller)}"
    statements = [
        f"CREATE TEMP VIEW jobs AS SELECT * FROM {base}.jobs WHERE caller = {_literal(caller)}",
        f"CREATE TEMP VIEW events AS SELECT * FROM {base}.events WHERE job_id IN ({mine})",
        f"CREATE TEMP VIEW webhook_deliveries AS SELECT * FROM {base}.webhook_deliveries "
        f"WHERE job_id IN ({mine})",
    ]
    # The same definitions as the index's own views; their `events` and `jobs` are the above.
    statements += [f"CREATE TEMP VIEW {name} AS {body}" for name, body in VIEW_BODIES.items()]
    return statements


def catalog_of(cursor: duckdb.DuckDBPyConnection) -> str:
    """The name DuckDB gives the index's database (the file's stem), for qualified names."""
    row = cursor.execute("SELECT current_database()").fetchone()
    assert row is not None
    return str(row[0])


def scope_to_caller(cursor: duckdb.DuckDBPyConnection, catalog: str, caller: str) -> None:
    """Shadow the index with `caller`'s rows for the rest of the cursor's open transaction."""
    for statement in scoped_views(catalog, caller):
        cursor.execute(statement)
