"""Which SQL may run: read by DuckDB's own parser, never by looking at the text.

The statement must be one SELECT (to DuckDB `WITH ... SELECT`, `FROM t`, DESCRIBE and SUMMARIZE
are SELECTs). DuckDB's statement type only names the outer statement, so the whole parse tree
(`json_serialize_sql`) is walked too: every query inside it, in CTEs, subqueries, set operations
and joins, must be a SELECT as well, and no table function may run SQL given as text (which the
walk cannot see) or change the database's state.

A query scoped to one caller is held to more: it may name only the index's tables and views
(which `tenancy` shadows with views of the caller's rows) and its own CTEs, never a schema or
catalog, and may call only table functions that make rows out of their arguments.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import duckdb
import msgspec

from gateway.logsink.refusal import QueryRefused
from gateway.logsink.schema import SCOPED_NAMES

# Query nodes that only read. Any other `*_NODE` (UPDATE_QUERY_NODE, INSERT_QUERY_NODE, ...)
# inside a SELECT is a data-modifying CTE or subquery.
_READING_NODES: Final = frozenset(
    {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}
)
# Table references a caller's query may use, besides BASE_TABLE and TABLE_FUNCTION (checked by
# name). SHOW_REF (DESCRIBE, SUMMARIZE) only with a query, which the walk then checks.
_PLAIN_REFS: Final = frozenset({"SUBQUERY", "JOIN", "EXPRESSION_LIST", "EMPTY", "PIVOT"})
# Table functions that only turn their arguments into rows.
GENERATORS: Final = frozenset({"range", "generate_series", "unnest", "json_each", "json_tree"})
# Everything else an unscoped (admin) query may call: the catalog's metadata and a few helpers.
# Left out on purpose: query() and json_execute_serialized_sql() run SQL given as text;
# checkpoint, logging, profiling and resource functions change state; arrow/pandas scans read
# raw memory; file readers are refused by the database itself anyway.
_ADMIN_FUNCTIONS: Final = GENERATORS | frozenset(
    {"repeat", "repeat_row", "summary", "histogram", "histogram_values", "query_table"}
)
_ADMIN_PREFIXES: Final = ("duckdb_", "pragma_")
_ADMIN_EXCLUDED: Final = frozenset({"duckdb_secrets", "duckdb_logs", "duckdb_logs_parsed"})


class _Serialized(msgspec.Struct):
    error: bool = False
    error_message: str = ""
    statements: list[dict[str, Any]] = msgspec.field(default_factory=list)


_serialized: Final = msgspec.json.Decoder(_Serialized)


def check_sql(cursor: duckdb.DuckDBPyConnection, sql: str, *, scoped: bool = False) -> None:
    """Raise QueryRefused unless `sql` is exactly one read-only query (see the module doc).

    `scoped`: the query runs for one caller, under the stricter rules.
    """
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
    try:
        _Walk(scoped).visit(_parse_tree(cursor, sql), frozenset())
    except RecursionError:
        raise QueryRefused("invalid_sql", "the query nests too deeply to be checked") from None


def _parse_tree(cursor: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    try:
        row = cursor.execute("SELECT json_serialize_sql($1)", [sql]).fetchone()
    except duckdb.Error as exc:
        raise QueryRefused("invalid_sql", f"the query cannot be checked: {exc}") from exc
    parsed = _serialized.decode(row[0]) if row is not None else _Serialized(error=True)
    # A SELECT the serializer cannot write out is one the walk cannot check: refused.
    if parsed.error or not parsed.statements:
        raise QueryRefused(
            "invalid_sql", f"the query cannot be checked: {parsed.error_message or 'no tree'}"
        )
    return parsed.statements


class _Walk:
    """One pass over a parse tree; raises QueryRefused at the first thing not allowed."""

    def __init__(self, scoped: bool) -> None:
        self.scoped = scoped

    def visit(self, node: Any, ctes: frozenset[str]) -> None:
        """Check `node` and everything below it; `ctes`: the CTE names in scope there."""
        if isinstance(node, list):
            for item in node:
                self.visit(item, ctes)
            return
        if not isinstance(node, dict):
            return
        kind = node.get("type")
        if isinstance(kind, str) and "class" not in node:
            if kind.endswith("_NODE"):
                self._query_node(node, kind, ctes)
                return
            if "sample" in node:  # every table reference, and only those, carries one
                self._table_ref(node, kind, ctes)
        for key, value in node.items():
            if key != "cte_map":
                self.visit(value, ctes)

    def _query_node(self, node: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        if kind not in _READING_NODES:
            verb = kind.removesuffix("_NODE").removesuffix("_QUERY")
            raise QueryRefused(
                "not_select",
                f"only reading queries are allowed: this one holds a {verb} (in a WITH clause "
                "or a subquery); queries never change the index",
            )
        # A CTE sees the CTEs before it (and those of enclosing queries), never itself or
        # later ones: DuckDB resolves those names in the catalog instead.
        scope = ctes
        for name, body in _ctes(node):
            self.visit(body, scope)
            scope = scope | {name}
        if kind == "RECURSIVE_CTE_NODE":
            # The recursive half reads the CTE being defined; the anchor does not.
            name = str(node.get("cte_name", "")).lower()
            self.visit(node.get("left"), scope)
            self.visit(node.get("right"), scope | {name})
            for key, value in node.items():
                if key not in ("left", "right", "cte_map"):
                    self.visit(value, scope)
            return
        for key, value in node.items():
            if key != "cte_map":
                self.visit(value, scope)

    def _table_ref(self, node: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        if kind == "TABLE_FUNCTION":
            self._table_function(node)
        elif not self.scoped:
            return
        elif kind == "BASE_TABLE":
            self._base_table(node, ctes)
        elif kind == "SHOW_REF":
            if node.get("query") is None:
                raise QueryRefused("forbidden", "SHOW lists the catalog; use DESCRIBE <query>")
        elif kind not in _PLAIN_REFS:
            raise QueryRefused("forbidden", f"a {kind} reference is not allowed in a query")

    def _base_table(self, node: dict[str, Any], ctes: frozenset[str]) -> None:
        name = str(node.get("table_name", ""))
        path = node.get("qualified_name", {}).get("path", [name])
        if node.get("catalog_name") or node.get("schema_name") or len(path) != 1:
            raise QueryRefused(
                "forbidden",
                f"name tables without a schema or catalog ({'.'.join(map(str, path))}): "
                f"the index's tables and views are {', '.join(SCOPED_NAMES)}",
            )
        if node.get("at_clause") is not None:
            raise QueryRefused("forbidden", "AT (time travel) is not available")
        if name.lower() not in ctes and name.lower() not in SCOPED_NAMES:
            raise QueryRefused(
                "forbidden",
                f"{name!r} is not a table of the log index; queries may read "
                f"{', '.join(SCOPED_NAMES)} and their own CTEs",
            )

    def _table_function(self, node: dict[str, Any]) -> None:
        function = node.get("function") or {}
        name = str(function.get("function_name", "")).lower()
        path = function.get("qualified_name", {}).get("path", [name])
        qualified = bool(function.get("schema") or function.get("catalog")) or len(path) != 1
        if self.scoped:
            allowed = name in GENERATORS
            what = ", ".join(sorted(GENERATORS))
        else:
            allowed = name in _ADMIN_FUNCTIONS or (
                name.startswith(_ADMIN_PREFIXES) and name not in _ADMIN_EXCLUDED
            )
            what = "generators, the catalog's duckdb_*() and pragma_*() functions"
        if qualified or not allowed:
            raise QueryRefused(
                "forbidden", f"the table function {name}() is not allowed here; allowed: {what}"
            )


def _ctes(node: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for entry in (node.get("cte_map") or {}).get("map") or []:
        yield str(entry.get("key", "")).lower(), (entry.get("value") or {}).get("query_node")
