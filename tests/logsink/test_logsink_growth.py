"""Bounded growth of the log sink: no per-event index in memory (duplicates are told by stream
position), logs pruned past their retention while it runs, warnings before its limits."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from gateway.bus.connection import ensure_resources
from gateway.bus.contract import Subjects, encode
from gateway.bus.events import EventPublisher
from gateway.logsink import LogSink, index_path, log_file_path, paths
from gateway.logsink.client import LogQueryError, job_log
from gateway.logsink.consumer import consumer_config
from gateway.logsink.position import StreamState, settle_position
from gateway.logsink.rebuild import reconcile
from gateway.logsink.schema import EVENTS_TABLE
from gateway.logsink.store import LogStore
from tests.helpers import poll_until
from tests.logsink.jobs import FAST, run_job

T0 = 1_750_000_000.0


def _table(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(index_path(data_dir)), read_only=True) as con:
        return con.execute(sql).fetchall()


def _keys_on_events(data_dir: Path) -> list[tuple[Any, ...]]:
    return _table(
        data_dir,
        "SELECT constraint_type FROM duckdb_constraints() WHERE table_name = 'events' "
        "AND constraint_type IN ('PRIMARY KEY', 'UNIQUE') "
        "UNION ALL SELECT index_name FROM duckdb_indexes() WHERE table_name = 'events'",
    )


def _lines(data_dir: Path) -> list[str]:
    """Every event id in every log file, as often as it is there."""
    ids = []
    for path in sorted(paths.prompts_dir(data_dir).iterdir()):
        ids += [msgspec.json.decode(line)["event_id"] for line in path.read_bytes().splitlines()]
    return ids


async def test_the_index_keeps_no_key_on_events_and_records_its_stream_position(
    js: JetStreamContext,
    subjects: Subjects,
    data_dir: Path,
    sink: LogSink,
    publisher: EventPublisher,
) -> None:
    events = await run_job(publisher, "job1", submitted_at=T0)
    # A republished event (the same event_id, a new stream sequence) is still stored once.
    await js.publish(subjects.events("job1"), encode(events[2]))
    async with asyncio.timeout(10):
        await sink.wait_caught_up()
    last = (await js.stream_info(subjects.events_stream)).state.last_seq
    await sink.close()
    assert _keys_on_events(data_dir) == []
    assert _table(data_dir, "SELECT stream, upto FROM sink_position") == [
        (subjects.events_stream, last)
    ]
    assert sorted(_lines(data_dir)) == sorted(event.event_id for event in events)


async def test_an_older_index_loses_its_key_and_what_its_sink_held_is_stored_once(
    nc: Client,
    js: JetStreamContext,
    subjects: Subjects,
    data_dir: Path,
    publisher: EventPublisher,
) -> None:
    events = await run_job(publisher, "job1", submitted_at=T0, nodes=4)
    raws = [encode(event) for event in events]
    # What an older build left: every event stored, a key on events, no position, and a
    # consumer that had acknowledged only the first five.
    store = LogStore(data_dir, FAST)
    store.write_batch(raws)
    store.close()
    with duckdb.connect(str(index_path(data_dir))) as con:
        con.execute(EVENTS_TABLE.format(name="keyed").replace("NOT NULL,", "PRIMARY KEY,", 1))
        con.execute("INSERT INTO keyed SELECT * FROM events")
        con.execute("DROP TABLE events")
        con.execute("ALTER TABLE keyed RENAME TO events")
        con.execute("DROP TABLE sink_position")
    assert _keys_on_events(data_dir) != []
    await js.add_consumer(subjects.events_stream, consumer_config(subjects, FAST))
    pull = await js.pull_subscribe_bind(FAST.durable, subjects.events_stream)
    delivered = await pull.fetch(len(raws), timeout=5)
    for message in delivered[:5]:
        await message.ack()
    await pull.unsubscribe()

    async with LogSink(nc, subjects, data_dir, FAST) as sink:
        later = await run_job(publisher, "job2", submitted_at=T0 + 60)
        async with asyncio.timeout(10):
            await sink.wait_caught_up()
        assert sink.events_written == len(later)
    assert _keys_on_events(data_dir) == []
    ids = _lines(data_dir)
    assert sorted(ids) == sorted(event.event_id for event in events + later)
    assert _table(data_dir, "SELECT count(*), count(DISTINCT event_id) FROM events") == [
        (len(ids), len(ids))
    ]


async def test_a_crash_in_the_window_after_a_crash_still_writes_no_line_twice(
    js: JetStreamContext, data_dir: Path, publisher: EventPublisher
) -> None:
    events = await run_job(publisher, "job1", submitted_at=T0)
    raws = [encode(event) for event in events]
    state = StreamState(stream="EVENTS", created="then", acked=0, delivered=0)
    store = LogStore(data_dir, FAST)
    reconcile(store)
    settle_position(store, state)
    store.write_batch(raws[:5], range(1, 6))
    # A crash between the files and the index: four lines are in the file only.
    store.files.append({f"logs/prompts/{log_file_path(data_dir, 'job1', T0).name}": raws[5:9]})
    store.close()
    # The next start indexes them, and dies before their events come again...
    store = LogStore(data_dir, FAST)
    delivered = msgspec.structs.replace(state, acked=5, delivered=9)
    reconcile(store)
    settle_position(store, delivered)
    store.close()
    # ...and the one after, finding nothing more to index, still looks them up.
    store = LogStore(data_dir, FAST)
    restarted = msgspec.structs.replace(state, acked=5, delivered=5)
    reconcile(store)
    settle_position(store, restarted)
    assert store.write_batch(raws[5:10], range(6, 11)).written == 1
    assert store.write_batch(raws[10:], range(11, len(raws) + 1)).written == len(raws) - 10
    store.close()
    assert _lines(data_dir) == [event.event_id for event in events]


async def test_a_stream_made_anew_is_read_from_its_start(
    nc: Client,
    js: JetStreamContext,
    subjects: Subjects,
    data_dir: Path,
    publisher: EventPublisher,
) -> None:
    async with LogSink(nc, subjects, data_dir, FAST) as sink:
        first = await run_job(publisher, "job1", submitted_at=T0)
        async with asyncio.timeout(10):
            await sink.wait_caught_up()
    await js.delete_stream(subjects.events_stream)
    await ensure_resources(js, subjects)
    # Its sequences start again at 1, below the position the index recorded for the old one.
    second = await run_job(EventPublisher(js, subjects), "job2", submitted_at=T0 + 60)
    async with LogSink(nc, subjects, data_dir, FAST) as sink:
        async with asyncio.timeout(10):
            await sink.wait_caught_up()
        assert sink.events_written == len(second)
    assert sorted(_lines(data_dir)) == sorted(event.event_id for event in first + second)


async def test_logs_past_their_retention_are_deleted_while_the_sink_runs(
    nc: Client,
    js: JetStreamContext,
    subjects: Subjects,
    data_dir: Path,
    publisher: EventPublisher,
) -> None:
    config = msgspec.structs.replace(FAST, retention_s=3600.0, prune_every_s=0.05, prune_jobs=2)
    now = time.time()
    async with LogSink(nc, subjects, data_dir, config) as sink:
        old = [f"old{i}" for i in range(5)]
        for i, job_id in enumerate(old):
            # Past the retention once ended, and not so old that an open one would go.
            await run_job(publisher, job_id, submitted_at=now - 5000 - i)
        await run_job(publisher, "recent", submitted_at=now - 60)
        async with asyncio.timeout(10):
            await sink.wait_caught_up()
        assert sink.upkeep is not None

        async def pruned() -> bool:
            return len(list(paths.prompts_dir(data_dir).iterdir())) == 1

        await poll_until(pruned, "the old jobs' logs deleted")
        for job_id in old:
            with pytest.raises(LogQueryError) as refused:
                await job_log(nc, subjects, job_id)
            assert refused.value.code == "not_found"
        kept = await job_log(nc, subjects, "recent")
        assert kept.entry_count > 0
        assert sink.upkeep.jobs_pruned == len(old)
        # The sink goes on storing.
        await run_job(publisher, "later", submitted_at=now)
        async with asyncio.timeout(10):
            await sink.wait_caught_up()
    assert _table(data_dir, "SELECT job_id FROM jobs ORDER BY job_id") == [("later",), ("recent",)]
    assert _table(data_dir, "SELECT DISTINCT job_id FROM events ORDER BY job_id") == [
        ("later",),
        ("recent",),
    ]


async def test_the_sink_warns_before_its_memory_and_disk_limits(
    nc: Client, js: JetStreamContext, subjects: Subjects, data_dir: Path, caplog: Any
) -> None:
    config = msgspec.structs.replace(
        FAST, warn_memory_share=0.0, min_free_bytes=2**62, watch_every_s=3600.0
    )
    caplog.set_level(logging.WARNING, logger="gateway.logsink.upkeep")
    async with LogSink(nc, subjects, data_dir, config) as sink:
        assert sink.upkeep is not None
        await sink.upkeep.watch()
    warnings = [record.getMessage() for record in caplog.records]
    assert any("near its memory limit" in text and "256MB" in text for text in warnings)
    assert any("near its disk limit" in text and "GiB free" in text for text in warnings)
