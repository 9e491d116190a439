"""A job bound by a leader that stopped before appending its `dispatched` event."""

from __future__ import annotations

from nats.aio.client import Client
from nats.js import JetStreamContext

from gateway.bus.contract import (
    Dispatched,
    Job,
    JobRecord,
    JobRequest,
    JobStatus,
    QueuedData,
    Subjects,
    decode,
    decode_event,
    encode,
    now,
)
from gateway.bus.events import EventPublisher
from gateway.settings import Settings
from plugins.simulator.samples import tiny_workflow
from tests.conftest import running_gateway


async def test_the_next_leader_appends_the_missing_dispatched_and_sends_the_job(
    settings: Settings, nc: Client, js: JetStreamContext, subjects: Subjects
) -> None:
    job_id = "bound-cut"
    request = JobRequest(workflow=tiny_workflow(1), job_id=job_id)
    await EventPublisher(js, subjects).emit(
        job_id, QueuedData(request=request, log_file_path=f"logs/{job_id}.jsonl")
    )
    at = now()
    record = JobRecord(
        job_id=job_id,
        status=JobStatus.DISPATCHED,
        submitted_at=at,
        updated_at=at,
        log_file_path=f"logs/{job_id}.jsonl",
        server_id="gpu-gone-quiet",
        attempt=1,
        last_seq=1,
    )
    kv = await js.key_value(subjects.jobs_bucket)
    await kv.put(job_id, encode(record))
    jobs = await js.pull_subscribe(subjects.jobs("gpu-gone-quiet"), durable="probe")
    appended = await nc.subscribe(subjects.events(job_id))

    async with running_gateway(settings):
        # The job goes out again to the server its record names ...
        [message] = await jobs.fetch(1, timeout=15)
        sent = decode(message.data, Job)
        assert (sent.job_id, sent.attempt) == (job_id, 1)
        # ... and the log says so, right after the queued event.
        last = decode_event((await appended.next_msg(timeout=15)).data)
        assert isinstance(last, Dispatched), last
        assert (last.seq, last.data.attempt, last.data.server_id) == (2, 1, "gpu-gone-quiet")
