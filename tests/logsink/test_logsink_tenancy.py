"""A caller's SQL sees its own jobs and nothing else, however it asks; an admin sees all."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from gateway.bus.contract import Subjects
from gateway.bus.events import EventPublisher
from gateway.logsink import LogQueryError, LogSink, index_path, query_logs, rebuild_index
from gateway.logsink.index import IndexDB, open_database
from tests.logsink.jobs import FAST, run_job

MINE = {"a-1", "a-2"}
THEIRS = {"b-1", "b-2"}

# Each is refused before it runs: it names something beyond the caller's views.
ESCAPES = [
    "SELECT * FROM main.events",
    'SELECT * FROM "index".main.events',
    "SELECT * FROM index.events",
    "SELECT * FROM temp.main.events",
    "SELECT * FROM system.main.duckdb_tables",
    "SELECT * FROM query('SELECT * FROM events')",
    "SELECT * FROM query_table('events')",
    "SELECT * FROM duckdb_tables()",
    "SELECT * FROM duckdb_tables",
    "SELECT * FROM sqlite_master",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM pragma_table_info('events')",
    "SELECT * FROM pragma_storage_info('jobs')",
    "SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT * FROM events'))",
    "SHOW TABLES",
    "SUMMARIZE main.events",
    "SELECT * FROM jobs j JOIN main.jobs m USING (job_id)",
    "SELECT job_id FROM jobs UNION SELECT job_id FROM main.jobs",
    "SELECT * FROM jobs, LATERAL (SELECT * FROM main.events) e",
    "SELECT (SELECT count(*) FROM main.events)",
    "SELECT * FROM jobs WHERE job_id IN (SELECT job_id FROM main.events)",
    # A CTE's name is only a CTE where DuckDB resolves it so; elsewhere it is the catalog's.
    "WITH x AS (SELECT * FROM sqlite_master), sqlite_master AS (SELECT 1) SELECT * FROM x",
    "SELECT * FROM (WITH duckdb_tables AS (SELECT 1) SELECT * FROM duckdb_tables), duckdb_tables",
    "WITH events AS (SELECT * FROM main.events) SELECT * FROM events",
]

# Each runs, on the caller's rows only.
JOB_IDS = [
    "SELECT DISTINCT job_id FROM events",
    "SELECT job_id FROM jobs",
    "FROM jobs SELECT job_id",
    "SELECT DISTINCT job_id FROM node_runs",
    "WITH events AS (SELECT * FROM events) SELECT DISTINCT job_id FROM events",
    "WITH jobs AS (SELECT * FROM jobs) SELECT job_id FROM jobs",
    "SELECT DISTINCT job_id FROM (SELECT * FROM events WHERE job_id IN (SELECT job_id FROM jobs))",
    "SELECT job_id FROM jobs UNION SELECT job_id FROM events",
    "SELECT DISTINCT e.job_id FROM jobs j, LATERAL (SELECT * FROM events "
    "WHERE events.job_id <> j.job_id) e",
    "SELECT DISTINCT e.job_id FROM jobs j RIGHT JOIN events e USING (job_id)",
    "SELECT unnest(list(DISTINCT job_id)) FROM events",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
    "SELECT DISTINCT job_id FROM events, r",
    "SELECT DISTINCT data->'request'->>'caller' AS job_id FROM events WHERE type = 'queued' "
    "UNION ALL SELECT job_id FROM jobs",
]


async def _two_callers(publisher: EventPublisher, sink: LogSink) -> None:
    for index, job_id in enumerate(sorted(MINE | THEIRS)):
        caller = "caller-a" if job_id in MINE else "caller-b"
        await run_job(
            publisher,
            job_id,
            submitted_at=1_750_000_000.0 + 100 * index,
            caller=caller,
            fail=job_id.endswith("2"),
        )
    async with asyncio.timeout(10):
        await sink.wait_caught_up()


def _values(rows: list[list[Any]]) -> set[Any]:
    return {value for row in rows for value in row}


async def test_a_callers_query_sees_only_its_jobs(
    nc: Client, subjects: Subjects, sink: LogSink, publisher: EventPublisher
) -> None:
    await _two_callers(publisher, sink)
    for sql in JOB_IDS:
        result = await query_logs(nc, subjects, sql, caller="caller-a")
        assert _values(result.rows) - {"caller-a"} == MINE, sql
    # The views agree with the tables they are made of.
    counts = await query_logs(
        nc,
        subjects,
        "SELECT (SELECT sum(runs) FROM slowest_nodes), (SELECT sum(failures) FROM "
        "failure_rates), (SELECT sum(jobs) FROM daily_timing), (SELECT count(*) FROM node_runs)",
        caller="caller-a",
    )
    admin = await query_logs(
        nc, subjects, "SELECT count(*) FROM node_runs WHERE job_id IN ('a-1', 'a-2')"
    )
    assert counts.rows == [[admin.rows[0][0], 1, 2, admin.rows[0][0]]]
    # An admin (no caller) sees every job, through the same connections.
    every = await query_logs(nc, subjects, "SELECT job_id FROM jobs")
    assert _values(every.rows) == MINE | THEIRS
    theirs = await query_logs(nc, subjects, "SELECT job_id FROM jobs", caller="caller-b")
    assert _values(theirs.rows) == THEIRS
    nobody = await query_logs(nc, subjects, "SELECT count(*) FROM events", caller="x' OR '1'='1")
    assert nobody.rows == [[0]]


async def test_every_way_around_the_callers_views_is_refused(
    nc: Client, subjects: Subjects, sink: LogSink, publisher: EventPublisher
) -> None:
    await _two_callers(publisher, sink)
    for sql in ESCAPES:
        with pytest.raises(LogQueryError) as refused:
            await query_logs(nc, subjects, sql, caller="caller-a")
        assert refused.value.code == "forbidden", (sql, refused.value)
        assert refused.value.message, sql
    # The same as an admin: read-only queries that run.
    for sql in ("SELECT * FROM main.events", "SELECT * FROM duckdb_tables()"):
        assert (await query_logs(nc, subjects, sql)).rows, sql


async def test_an_index_from_before_callers_gains_the_column(
    nc: Client, subjects: Subjects, data_dir: Path, publisher: EventPublisher
) -> None:
    async with LogSink(nc, subjects, data_dir, FAST) as sink:
        await run_job(publisher, "old-1", submitted_at=1_750_000_000.0, caller="caller-a")
        await run_job(publisher, "old-2", submitted_at=1_750_000_100.0)
        async with asyncio.timeout(10):
            await sink.wait_caught_up()
    # The index as a build before callers left it: no `caller` column in `jobs`.
    con = open_database(index_path(data_dir), memory_limit="256MB", threads=1)
    try:
        for view in ("daily_timing", "failure_rates", "slowest_nodes", "node_runs"):
            con.execute(f"DROP VIEW {view}")
        con.execute("ALTER TABLE jobs DROP COLUMN caller")
    finally:
        con.close()

    index = IndexDB(index_path(data_dir))
    try:
        rows = index.execute("SELECT job_id, caller FROM jobs ORDER BY job_id")
    finally:
        index.close()
    assert rows == [("old-1", "caller-a"), ("old-2", None)]

    # Rebuilt from the JSONL files alone, the column is filled the same way.
    rebuild_index(data_dir, FAST)
    index = IndexDB(index_path(data_dir))
    try:
        rows = index.execute("SELECT job_id, caller FROM jobs ORDER BY job_id")
    finally:
        index.close()
    assert rows == [("old-1", "caller-a"), ("old-2", None)]
