"""`jobs.batch_id`: the batch a job was submitted in, from its `queued` event, in SQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nats.aio.client import Client

from gateway.bus.contract import Subjects
from gateway.bus.events import EventPublisher
from gateway.logsink import LogSink, index_path, query_logs
from gateway.logsink.index import IndexDB, open_database
from tests.logsink.jobs import FAST, run_job

BY_BATCH = "SELECT batch_id, count(*) FROM jobs GROUP BY ALL ORDER BY batch_id NULLS LAST"


async def test_jobs_are_counted_by_batch_and_an_older_index_gains_the_column(
    nc: Client, subjects: Subjects, data_dir: Path, publisher: EventPublisher
) -> None:
    async with LogSink(nc, subjects, data_dir, FAST) as sink:
        await run_job(publisher, "b1-0", submitted_at=1_750_000_000.0, batch_id="b1")
        await run_job(publisher, "b1-1", submitted_at=1_750_000_001.0, batch_id="b1", fail=True)
        await run_job(publisher, "alone", submitted_at=1_750_000_002.0)
        async with asyncio.timeout(10):
            await sink.wait_caught_up()
        result = await query_logs(nc, subjects, BY_BATCH)
        assert result.rows == [["b1", 2], [None, 1]]
    # The index as a build before batches left it: no `batch_id` column in `jobs`.
    con = open_database(index_path(data_dir), memory_limit="256MB", threads=1)
    try:
        for view in ("daily_timing", "failure_rates", "slowest_nodes", "node_runs"):
            con.execute(f"DROP VIEW {view}")
        con.execute("ALTER TABLE jobs DROP COLUMN batch_id")
    finally:
        con.close()
    expected = [("alone", None), ("b1-0", "b1"), ("b1-1", "b1")]
    index = IndexDB(index_path(data_dir))
    try:
        assert index.execute("SELECT job_id, batch_id FROM jobs ORDER BY job_id") == expected
    finally:
        index.close()
