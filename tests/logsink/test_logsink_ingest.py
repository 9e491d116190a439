"""A job's events, published as the roles publish them, land once in its file and in the index."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import duckdb
from nats.aio.client import Client
from nats.js import JetStreamContext

from gateway.bus.connection import ensure_resources
from gateway.bus.contract import Subjects, encode
from gateway.bus.events import EventPublisher
from gateway.logsink import LogSink, index_path, job_log, log_file_path, query_logs
from tests.logsink.jobs import run_job

T0 = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC


async def test_every_event_lands_once_in_its_file_and_the_index(
    nc: Client,
    js: JetStreamContext,
    subjects: Subjects,
    data_dir: Path,
    sink: LogSink,
    publisher: EventPublisher,
) -> None:
    ok = await run_job(publisher, "job-ok", submitted_at=T0)
    bad = await run_job(publisher, "job-bad", submitted_at=T0 + 100, server="gpu2", fail=True)
    # A redelivered or republished event (same event_id) must not count twice.
    await js.publish(subjects.events("job-ok"), encode(ok[3]))
    async with asyncio.timeout(10):
        await sink.wait_caught_up()

    # The file: named after the queued event's time, one line per event, exactly the wire JSON.
    path = log_file_path(data_dir, "job-ok", T0)
    assert path.name == "20250615_150640_job-ok.jsonl"
    assert path.read_bytes().splitlines() == [encode(event) for event in ok]
    bad_path = log_file_path(data_dir, "job-bad", T0 + 100)
    assert bad_path.read_bytes().splitlines() == [encode(event) for event in bad]

    # The index, over the bus.
    counts = await query_logs(
        nc,
        subjects,
        "SELECT job_id, count(*) AS n, count(DISTINCT event_id) AS ids, min(seq), max(seq) "
        "FROM events GROUP BY job_id ORDER BY job_id",
    )
    assert counts.rows == [
        ["job-bad", len(bad), len(bad), 1, len(bad)],
        ["job-ok", len(ok), len(ok), 1, len(ok)],
    ]
    jobs = await query_logs(
        nc,
        subjects,
        "SELECT job_id, status, server_id, attempts, submitted_at, started_at, finished_at, "
        "duration_s, queue_wait_s, error_type, error_message, node_count, output_count, "
        "log_file_path, event_count, length(workflow_hash) AS hash_len FROM jobs ORDER BY job_id",
    )
    rows = {
        row[0]: dict(zip([c.name for c in jobs.columns], row, strict=True)) for row in jobs.rows
    }
    good = rows["job-ok"]
    assert good["status"] == "succeeded"
    assert good["server_id"] == "gpu1"
    assert good["attempts"] == 1
    assert good["submitted_at"] == "2025-06-15T15:06:40"
    assert good["started_at"] == "2025-06-15T15:06:42"  # queued, dispatched, running: 1 s apart
    assert good["queue_wait_s"] == 2.0
    assert good["duration_s"] == ok[-1].ts - ok[2].ts  # running .. succeeded
    assert good["node_count"] == 3 and good["output_count"] == 1
    assert good["error_type"] is None
    assert good["log_file_path"] == "logs/prompts/20250615_150640_job-ok.jsonl"
    assert good["event_count"] == len(ok)
    assert good["hash_len"] == 64
    failed = rows["job-bad"]
    assert failed["status"] == "failed"
    assert failed["server_id"] == "gpu2"
    assert failed["error_type"] == "torch.OutOfMemoryError"
    assert failed["error_message"] == "CUDA out of memory"
    assert failed["output_count"] is None

    # Typed columns and JSON values.
    typed = await query_logs(
        nc,
        subjects,
        "SELECT ts, data, node_id FROM events WHERE type = 'node_progress' "
        "ORDER BY job_id, seq LIMIT 1",
    )
    assert [(c.name, c.type) for c in typed.columns] == [
        ("ts", "TIMESTAMP"),
        ("data", "JSON"),
        ("node_id", "VARCHAR"),
    ]
    assert typed.rows[0][1] == {"node_id": typed.rows[0][2], "value": 1, "max": 2}

    # The job's log for GET /workflow/logs/{job_id}.
    found = await job_log(nc, subjects, "job-ok")
    assert found.log_file_path == "logs/prompts/20250615_150640_job-ok.jsonl"
    assert found.entry_count == len(ok)
    assert [entry["seq"] for entry in found.entries] == list(range(1, len(ok) + 1))
    assert found.entries[0]["data"]["request"]["workflow"]["1"]["class_type"] == "Node1"

    # The views answer.
    nodes = await query_logs(nc, subjects, "SELECT class_type, runs FROM slowest_nodes")
    assert sorted(nodes.rows) == [["Node1", 2], ["Node2", 2], ["Node3", 2]]
    failures = await query_logs(nc, subjects, "SELECT * FROM failure_rates")
    assert failures.rows == [["gpu2", "torch.OutOfMemoryError", 1, 1, 1.0]]
    daily = await query_logs(nc, subjects, "SELECT day, jobs, started FROM daily_timing")
    assert daily.rows == [["2025-06-15", 2, 2]]

    # And in the database file itself, after a clean stop.
    await sink.close()
    with duckdb.connect(str(index_path(data_dir)), read_only=True) as con:
        total = con.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
    assert total == (len(ok) + len(bad), len(ok) + len(bad))


async def test_a_job_whose_queued_event_was_never_seen_gets_a_file_by_its_first_event(
    nc: Client, js: JetStreamContext, subjects: Subjects, data_dir: Path, sink: LogSink
) -> None:
    # The job is made under another prefix; only the events after `queued` reach the sink.
    scratch = Subjects("scratch")
    await ensure_resources(js, scratch)
    events = await run_job(EventPublisher(js, scratch), "late", submitted_at=T0)
    for event in events[1:]:
        await js.publish(subjects.events("late"), encode(event))
    async with asyncio.timeout(10):
        await sink.wait_caught_up()
    path = log_file_path(data_dir, "late", events[1].ts)
    assert [json.loads(line)["seq"] for line in path.read_bytes().splitlines()] == list(
        range(2, len(events) + 1)
    )
    # When `queued` turns up after all, it joins the same file.
    await js.publish(subjects.events("late"), encode(events[0]))
    async with asyncio.timeout(10):
        await sink.wait_caught_up()
    assert len(path.read_bytes().splitlines()) == len(events)
    row = await query_logs(
        nc, subjects, "SELECT status, submitted_at, event_count FROM jobs WHERE job_id = 'late'"
    )
    assert row.rows == [["succeeded", "2025-06-15T15:06:40", len(events)]]


async def test_a_message_that_is_not_an_event_is_dropped_and_the_rest_stored(
    nc: Client, js: JetStreamContext, subjects: Subjects, sink: LogSink, publisher: EventPublisher
) -> None:
    await js.publish(subjects.events("junk"), b"not json")
    events = await run_job(publisher, "after-junk", submitted_at=T0)
    async with asyncio.timeout(10):
        await sink.wait_caught_up()
    result = await query_logs(nc, subjects, "SELECT count(*) FROM events")
    assert result.rows == [[len(events)]]
