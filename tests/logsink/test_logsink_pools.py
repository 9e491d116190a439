"""People's SQL and the system's own reads run on separate pools; a query nobody waits for stops.

Long queries are real (a cross join of ranges, interrupted only by its time limit or a cancel);
the tests wait on what the sink reports running, never on the clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from nats.aio.client import Client

from gateway.bus.contract import Subjects
from gateway.bus.events import EventPublisher
from gateway.logsink import LogQueryError, LogSink, job_log, query_logs
from gateway.logsink.client import logged_upto, recent_jobs
from gateway.logsink.pools import PoolStats
from tests.logsink.jobs import run_job

LONG = "SELECT count(*) FROM range(100000000000) a, range(1000) b"


async def _until(sink: LogSink, ready: Any) -> None:
    async with asyncio.timeout(30):
        await sink.queries.wait_until(ready)


async def _stop(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_own_reads_answer_while_every_query_slot_is_taken(
    nc: Client, subjects: Subjects, sink: LogSink, publisher: EventPublisher
) -> None:
    await run_job(publisher, "j1", submitted_at=1_750_000_000.0, caller="a")
    async with asyncio.timeout(10):
        await sink.wait_caught_up()
    assert sink.queries.size == 4 and sink.config.queries_per_caller == 2
    long = [
        asyncio.create_task(query_logs(nc, subjects, LONG, timeout_s=60, caller=caller))
        for caller in ("a", "a", "b", "b")
    ]
    try:
        await _until(sink, lambda stats: stats.running == 4)
        # The system's reads go by: a job's log, the job list, how far a log has come.
        log = await job_log(nc, subjects, "j1")
        assert log.entries and log.entries[0]["type"] == "queued"
        jobs = await recent_jobs(nc, subjects, caller="a")
        assert [job["job_id"] for job in jobs] == ["j1"]
        assert await recent_jobs(nc, subjects, caller="b") == []
        assert await logged_upto(nc, subjects, "j1", 1, wait_s=0) >= 1
        # More SQL is refused at once, not queued: the caller's share, then the whole pool.
        for caller in ("a", "c", None):
            with pytest.raises(LogQueryError) as refused:
                await query_logs(nc, subjects, "SELECT 1", caller=caller)
            assert refused.value.code == "busy", caller
        assert sink.queries.stats.running == 4 and not any(task.done() for task in long)
    finally:
        await _stop(long)
    # Their askers gave up: the sink stops every one of them.
    await _until(sink, lambda stats: stats.running == 0 and stats.cancelled == 4)
    assert (await query_logs(nc, subjects, "SELECT 42")).rows == [[42]]


async def test_a_query_whose_asker_gave_up_is_interrupted(
    nc: Client, subjects: Subjects, sink: LogSink
) -> None:
    asked = asyncio.create_task(query_logs(nc, subjects, LONG, timeout_s=60))
    await _until(sink, lambda stats: stats.running == 1)
    await _stop([asked])
    await _until(sink, lambda stats: stats.running == 0)
    assert sink.queries.stats.cancelled == 1 and sink.queries.stats.interrupted == 1


async def test_the_time_limit_is_bounded(nc: Client, subjects: Subjects, sink: LogSink) -> None:
    for timeout_s in (3600.0, 0.0, -1.0):
        with pytest.raises(LogQueryError) as refused:
            await query_logs(nc, subjects, "SELECT 1", timeout_s=timeout_s)
        assert refused.value.code == "invalid_request"
        assert "60" in refused.value.message
    assert sink.queries.stats == PoolStats()


@pytest.fixture
async def http(gateway: str, sink: LogSink) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway's REST API, with a log sink on the same broker."""
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as client:
        yield client


async def test_rest_limits_on_logs_query(http: httpx.AsyncClient, sink: LogSink) -> None:
    huge = await http.post("/logs/query", json={"sql": "SELECT 1 -- " + "x" * 9_000_000})
    assert huge.status_code == 413, huge.text
    assert huge.json()["code"] == "too_large"
    assert "65536" in huge.json()["message"]
    slow = await http.post("/logs/query", json={"sql": "SELECT 1", "timeout_s": 3600})
    assert slow.status_code == 400, slow.text
    assert sink.queries.stats == PoolStats()


async def test_rest_busy_and_client_gone(
    http: httpx.AsyncClient, gateway: str, sink: LogSink, caplog: pytest.LogCaptureFixture
) -> None:
    async def ask_long() -> None:
        async with httpx.AsyncClient(base_url=gateway, timeout=120) as own:
            await own.post("/logs/query", json={"sql": LONG, "timeout_s": 60})

    long = [asyncio.create_task(ask_long()) for _ in range(2)]
    try:
        await _until(sink, lambda stats: stats.running == 2)
        busy = await http.post("/logs/query", json={"sql": "SELECT 1"})
        assert busy.status_code == 429, busy.text
        assert busy.json()["code"] == "busy"
        assert busy.headers["Retry-After"] == "1"
        # The job list is the gateway's own read: it answers all the same.
        assert (await http.get("/workflow/jobs")).status_code == 200
    finally:
        await _stop(long)
    # The HTTP clients went away: the gateway cancels, the sink stops both queries.
    await _until(sink, lambda stats: stats.running == 0 and stats.cancelled == 2)
    assert (await http.post("/logs/query", json={"sql": "SELECT 1"})).status_code == 200
    # A client going away is no error of the gateway's.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
