"""The sink as its own process, killed with SIGKILL in the middle of a burst and restarted."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
from pathlib import Path

import duckdb
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from gateway.bus.contract import Subjects
from gateway.bus.events import EventPublisher
from gateway.bus.natsserver import NatsServer
from gateway.logsink import SinkConfig, index_path, paths
from tests.helpers import poll_until
from tests.logsink.jobs import run_job

ROOT = Path(__file__).resolve().parents[2]
JOBS = 100  # of about 50 events each: 5,000 or so in all


async def _start_sink(url: str, data_dir: Path, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.logsink",
            "--nats-url",
            url,
            "--data-dir",
            str(data_dir),
            "--ack-wait",
            "1",
            "--log-level",
            "WARNING",
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )


async def _acked(js: JetStreamContext, subjects: Subjects) -> tuple[int, int, int]:
    """(ack floor, pending, ack pending) of the sink's consumer; zeros until it exists."""
    try:
        info = await js.consumer_info(subjects.events_stream, SinkConfig().durable)
    except NotFoundError:
        return 0, 0, 0
    return info.ack_floor.stream_seq, info.num_pending or 0, info.num_ack_pending or 0


async def _acked_at_least(js: JetStreamContext, subjects: Subjects, count: int) -> bool:
    return (await _acked(js, subjects))[0] >= count


async def _all_acked(js: JetStreamContext, subjects: Subjects, total: int) -> bool:
    return await _acked(js, subjects) == (total, 0, 0)


async def _consumer_exists(js: JetStreamContext, subjects: Subjects) -> bool:
    try:
        await js.consumer_info(subjects.events_stream, SinkConfig().durable)
    except NotFoundError:
        return False
    return True


async def _stop(process: asyncio.subprocess.Process, sig: int) -> int:
    if process.returncode is None:
        process.send_signal(sig)
    async with asyncio.timeout(20):
        return await process.wait()


async def test_sigkill_mid_burst_then_restart_keeps_every_event_exactly_once(
    nats_server: NatsServer,
    js: JetStreamContext,
    subjects: Subjects,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    log = tmp_path / "sink.log"
    publisher = EventPublisher(js, subjects)
    process = await _start_sink(nats_server.url, data_dir, log)
    try:
        # The sink is another process: poll its consumer on the broker, with a deadline.
        await poll_until(lambda: _consumer_exists(js, subjects), "the sink's consumer exists")

        async def burst() -> list[str]:
            jobs = await asyncio.gather(
                *(
                    run_job(
                        publisher,
                        f"job{i:03}",
                        submitted_at=1_750_000_000.0 + i,
                        nodes=6,
                        progress=6,
                        fail=i % 10 == 0,
                    )
                    for i in range(JOBS)
                )
            )
            return [event.event_id for events in jobs for event in events]

        publishing = asyncio.create_task(burst())
        await poll_until(
            lambda: _acked_at_least(js, subjects, 1000), "1000 events acked", every=0.005
        )
        os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        killed_at = (await _acked(js, subjects))[0]
        published = await publishing
        total = len(published)
        assert killed_at < total, "the kill came after the burst; nothing to recover"

        process = await _start_sink(nats_server.url, data_dir, log)
        await poll_until(lambda: _all_acked(js, subjects, total), "every event acked")
        assert await _stop(process, signal.SIGTERM) == 0, log.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    # Every event once in the files...
    lines: collections.Counter[str] = collections.Counter()
    files = sorted(paths.prompts_dir(data_dir).iterdir())
    assert len(files) == JOBS
    for path in files:
        seqs = []
        for line in path.read_bytes().splitlines():
            event = json.loads(line)
            lines[event["event_id"]] += 1
            seqs.append(event["seq"])
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), path.name
    assert set(lines) == set(published)
    assert max(lines.values()) == 1
    # ...and once in the index, with the jobs' rows right.
    with duckdb.connect(str(index_path(data_dir)), read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone() == (
            total,
            total,
        )
        assert con.execute(
            "SELECT count(*), sum(event_count), count(*) FILTER (status = 'failed') FROM jobs"
        ).fetchone() == (JOBS, total, JOBS // 10)
