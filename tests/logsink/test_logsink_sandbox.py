"""The SQL sandbox: one SELECT, nothing outside the database, bounded in time and rows."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import duckdb
import msgspec
import pytest
from nats.aio.client import Client

from gateway.bus.contract import Error, LogQuery, Subjects, encode
from gateway.bus.events import EventPublisher
from gateway.logsink import LogQueryError, LogSink, index_path, query_logs
from gateway.logsink.index import open_database
from tests.logsink.jobs import run_job

SNAPSHOT = (
    "SELECT (SELECT count(*) FROM events) AS events, (SELECT count(*) FROM jobs) AS jobs, "
    "(SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables) "
    "AS tables, current_setting('threads') AS threads"
)

REFUSED = [
    ("SELECT * FROM read_csv('/etc/passwd')", "forbidden"),
    ("SELECT * FROM read_text('/etc/hostname')", "forbidden"),
    ("SELECT * FROM glob('/etc/*')", "forbidden"),
    ("COPY events TO '/tmp/stolen.csv'", "not_select"),
    ("COPY (SELECT * FROM events) TO '/tmp/stolen.parquet'", "not_select"),
    ("ATTACH '/tmp/other.duckdb' AS other", "not_select"),
    ("INSTALL httpfs", "not_select"),
    ("LOAD httpfs", "not_select"),
    ("SET threads = 64", "not_select"),
    ("PRAGMA enable_profiling", "not_select"),
    ("CREATE TABLE x AS SELECT 1", "not_select"),
    ("CREATE VIEW v AS SELECT 1", "not_select"),
    ("INSERT INTO jobs (job_id) VALUES ('x')", "not_select"),
    ("UPDATE jobs SET status = 'x'", "not_select"),
    ("DELETE FROM events", "not_select"),
    ("DROP TABLE events", "not_select"),
    ("SELECT 1; DROP TABLE events", "multiple_statements"),
    ("SELECT 1; SELECT 2", "multiple_statements"),
    # query() and json_execute_serialized_sql() run SQL that the check never sees.
    ("SELECT * FROM query('DROP TABLE events')", "forbidden"),
    ("SELECT * FROM query('SELECT 1')", "forbidden"),
    ("FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))", "forbidden"),
    ("SELECT * FROM checkpoint()", "forbidden"),
    # Statements that change data, inside a SELECT: refused by the parse tree, not the text.
    ("WITH x AS (UPDATE jobs SET status='pwned' RETURNING *) SELECT * FROM x", "not_select"),
    ("WITH x AS (DELETE FROM events RETURNING *) SELECT count(*) FROM x", "not_select"),
    (
        "WITH x AS (INSERT INTO jobs (job_id) VALUES ('x') RETURNING job_id) "
        "SELECT * FROM jobs WHERE job_id IN (SELECT job_id FROM x)",
        "not_select",
    ),
    (
        "SELECT * FROM (WITH y AS (SELECT 1), x AS (UPDATE jobs SET status = 'p' RETURNING 1) "
        "SELECT * FROM x)",
        "not_select",
    ),
    ("SELCT 1", "invalid_sql"),
    ("", "invalid_sql"),
]


async def test_refusals_are_clear_and_leave_the_database_unchanged(
    nc: Client, subjects: Subjects, sink: LogSink, publisher: EventPublisher
) -> None:
    await run_job(publisher, "j1", submitted_at=1_750_000_000.0)
    async with asyncio.timeout(10):
        await sink.wait_caught_up()
    before = (await query_logs(nc, subjects, SNAPSHOT)).rows
    for sql, code in REFUSED:
        with pytest.raises(LogQueryError) as refused:
            await query_logs(nc, subjects, sql)
        assert refused.value.code == code, (sql, refused.value)
        assert refused.value.message, sql
    assert (await query_logs(nc, subjects, SNAPSHOT)).rows == before
    assert not Path("/tmp/stolen.csv").exists()


async def test_reading_queries_of_every_shape_still_run(
    nc: Client, subjects: Subjects, sink: LogSink, publisher: EventPublisher
) -> None:
    await run_job(publisher, "j1", submitted_at=1_750_000_000.0)
    async with asyncio.timeout(10):
        await sink.wait_caught_up()
    for sql in (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
        "SELECT count(*) FROM r",
        "FROM jobs",
        "DESCRIBE jobs",
        "SUMMARIZE SELECT * FROM events",
        "SELECT * FROM (SELECT job_id FROM jobs UNION ALL SELECT job_id FROM events) LIMIT 1",
        "SELECT j.job_id, e.n FROM jobs j, LATERAL (SELECT count(*) AS n FROM events "
        "WHERE events.job_id = j.job_id) e",
        "SELECT * FROM duckdb_tables()",
        "SELECT table_name FROM information_schema.tables",
        "SELECT * FROM pragma_table_info('jobs')",
        "SELECT * FROM range(3), unnest([1, 2]), generate_series(1, 2)",
    ):
        assert (await query_logs(nc, subjects, sql)).columns, sql


async def test_the_sink_refuses_sql_over_its_size_limit(
    nc: Client, subjects: Subjects, sink: LogSink
) -> None:
    # Sent as a raw request: the client function would not send it at all.
    sql = "SELECT 1 -- " + "x" * (sink.config.max_sql_bytes)
    reply = await nc.request(subjects.logs_query, encode(LogQuery(sql=sql)), timeout=10)
    error = msgspec.json.decode(reply.data, type=Error)
    assert error.code == "too_large", error
    with pytest.raises(LogQueryError) as refused:
        await query_logs(nc, subjects, sql)
    assert refused.value.code == "too_large"


async def test_a_runaway_query_is_interrupted_at_its_time_limit(
    nc: Client, subjects: Subjects, sink: LogSink
) -> None:
    started = time.monotonic()
    with pytest.raises(LogQueryError) as refused:
        await query_logs(
            nc,
            subjects,
            "SELECT count(*) FROM range(1000000000) a, range(1000000000) b",
            timeout_s=0.5,
        )
    assert refused.value.code == "timeout"
    assert "0.5 s" in refused.value.message
    assert time.monotonic() - started < 5
    # The connection is usable again at once.
    assert (await query_logs(nc, subjects, "SELECT 42")).rows == [[42]]


async def test_the_row_limit_truncates(nc: Client, subjects: Subjects, sink: LogSink) -> None:
    result = await query_logs(nc, subjects, "SELECT range AS n FROM range(100)", max_rows=10)
    assert result.truncated
    assert result.rows == [[n] for n in range(10)]
    whole = await query_logs(nc, subjects, "SELECT range AS n FROM range(10)", max_rows=10)
    assert not whole.truncated and len(whole.rows) == 10
    # A result too big for one NATS message is cut to fit, and says so.
    wide = await query_logs(
        nc, subjects, "SELECT repeat('x', 1000) AS s FROM range(5000)", max_rows=5000
    )
    assert wide.truncated and 0 < len(wide.rows) < 5000


async def test_values_are_typed_json(nc: Client, subjects: Subjects, sink: LogSink) -> None:
    result = await query_logs(
        nc,
        subjects,
        "WITH t AS (SELECT TIMESTAMP '2025-01-02 03:04:05.5' AS ts, 1.25::DECIMAL(6,2) AS d, "
        "DATE '2025-01-02' AS day, INTERVAL 90 SECOND AS i, [1, 2] AS l, {'a': 1} AS s, "
        "'{\"k\": [1]}'::JSON AS j, 'ab'::BLOB AS b, NULL AS n) SELECT * FROM t",
    )
    assert [c.type for c in result.columns] == [
        "TIMESTAMP",
        "DECIMAL(6,2)",
        "DATE",
        "INTERVAL",
        "INTEGER[]",
        "STRUCT(a INTEGER)",
        "JSON",
        "BLOB",
        '"NULL"',
    ]
    expected = ["2025-01-02T03:04:05.500000", 1.25, "2025-01-02", 90.0, [1, 2], {"a": 1}]
    assert result.rows == [[*expected, {"k": [1]}, "YWI=", None]]


def test_the_database_itself_refuses_files_and_settings(tmp_path: Path) -> None:
    # Below the statement check: even a connection that skips it cannot reach out.
    con = open_database(index_path(tmp_path), memory_limit="128MB", threads=1)
    try:
        for sql in (
            "SELECT * FROM read_csv('/etc/passwd')",
            f"ATTACH '{tmp_path / 'x.duckdb'}' AS x",
            f"COPY (SELECT 1) TO '{tmp_path / 'x.csv'}'",
            "LOAD httpfs",
            "INSTALL httpfs",
            "SET enable_external_access = true",
            "SET memory_limit = '100GB'",
        ):
            with pytest.raises(duckdb.Error):
                con.execute(sql)
    finally:
        con.close()
    assert not (tmp_path / "x.csv").exists()
