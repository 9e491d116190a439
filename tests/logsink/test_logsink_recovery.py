"""Crash windows and lost indexes: the files and the index end with each event exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import duckdb
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from gateway.bus.contract import Event, Subjects, encode
from gateway.bus.events import EventPublisher
from gateway.logsink import LogSink, index_path, log_file_path, rebuild_index
from gateway.logsink.index import IndexLockedError
from gateway.logsink.rebuild import reconcile
from gateway.logsink.store import LogStore
from tests.logsink.jobs import FAST, run_job

T0 = 1_750_000_000.0


async def _make_jobs(js: JetStreamContext, n: int) -> list[list[Event]]:
    """Realistic events of `n` jobs, made on a scratch prefix so no sink sees them."""
    from gateway.bus.connection import ensure_resources

    scratch = Subjects("scratch")
    await ensure_resources(js, scratch)
    publisher = EventPublisher(js, scratch)
    return list(
        await asyncio.gather(
            *(run_job(publisher, f"job{i}", submitted_at=T0 + i, fail=i % 3 == 0) for i in range(n))
        )
    )


def _table(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(index_path(data_dir)), read_only=True) as con:
        return con.execute(sql).fetchall()


async def test_lines_written_before_a_crash_are_indexed_not_written_again(
    js: JetStreamContext, data_dir: Path
) -> None:
    (events,) = await _make_jobs(js, 1)
    raws = [encode(event) for event in events]
    store = LogStore(data_dir, FAST)
    store.write_batch(raws[:5])
    # The crash window: the next batch reached the file (and half a line more), not the index.
    rel = "logs/prompts/" + log_file_path(data_dir, "job0", T0).name
    store.files.append({rel: raws[5:9]})
    with (data_dir / rel).open("ab") as fh:
        fh.write(raws[9][:20])
    store.close()

    store = LogStore(data_dir, FAST)
    stats = reconcile(store)
    assert stats.events_indexed == 4
    # JetStream delivers the unacknowledged batch again, and then the rest.
    assert store.write_batch(raws[5:10]).written == 1
    assert store.write_batch(raws).written == len(raws) - 10
    store.close()
    assert (data_dir / rel).read_bytes().splitlines() == raws
    assert _table(data_dir, "SELECT count(*), count(DISTINCT event_id) FROM events") == [
        (len(raws), len(raws))
    ]
    assert _table(data_dir, "SELECT event_count, status FROM jobs") == [(len(raws), "failed")]


async def test_a_failed_batch_leaves_no_line_behind(js: JetStreamContext, data_dir: Path) -> None:
    first, second = await _make_jobs(js, 2)
    raws = [encode(event) for event in first + second]
    store = LogStore(data_dir, FAST)
    store.write_batch([encode(event) for event in first[:3]])
    # A batch touching both jobs, where the second job's file cannot be written (a folder is
    # in its way): the first job's lines, already appended, must be taken back.
    blocker = log_file_path(data_dir, "job1", T0 + 1)
    blocker.mkdir()
    batch = [encode(event) for event in first[3:] + second]
    with pytest.raises(IsADirectoryError):
        store.write_batch(batch)
    assert log_file_path(data_dir, "job0", T0).read_bytes().splitlines() == raws[:3]
    blocker.rmdir()
    assert store.write_batch(batch).written == len(batch)
    store.close()
    assert log_file_path(data_dir, "job0", T0).read_bytes().splitlines() == raws[: len(first)]
    assert blocker.read_bytes().splitlines() == raws[len(first) :]
    assert _table(data_dir, "SELECT count(*), count(DISTINCT event_id) FROM events") == [
        (len(raws), len(raws))
    ]


async def test_rebuild_from_the_files_gives_the_same_tables(
    nc: Client, js: JetStreamContext, subjects: Subjects, data_dir: Path
) -> None:
    jobs = await _make_jobs(js, 12)
    async with LogSink(nc, subjects, data_dir, FAST) as sink:
        # Jobs interleaved on the bus, as many adapters would publish them.
        for step in range(max(len(events) for events in jobs)):
            for events in jobs:
                if step < len(events):
                    await js.publish(subjects.events(events[step].job_id), encode(events[step]))
        async with asyncio.timeout(10):
            await sink.wait_caught_up()
        # Running: the index is in use and a rebuild says so.
        with pytest.raises(IndexLockedError):
            rebuild_index(data_dir)
    jobs_sql = "SELECT * FROM jobs ORDER BY job_id"
    events_sql = "SELECT * FROM events ORDER BY event_id"
    before = _table(data_dir, jobs_sql), _table(data_dir, events_sql)
    assert len(before[0]) == 12

    index_path(data_dir).unlink()
    stats = rebuild_index(data_dir)
    assert stats.files_read == 12
    assert (_table(data_dir, jobs_sql), _table(data_dir, events_sql)) == before

    # A sink started on a lost index rebuilds it by itself before consuming.
    index_path(data_dir).unlink()
    async with LogSink(nc, subjects, data_dir, FAST) as sink:
        async with asyncio.timeout(10):
            await sink.wait_caught_up()
        assert sink.events_written == 0
    assert (_table(data_dir, jobs_sql), _table(data_dir, events_sql)) == before
