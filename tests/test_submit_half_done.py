"""A submission cut between its record and its `queued` event, submitted again by its client."""

from __future__ import annotations

import httpx
from nats.js import JetStreamContext

from gateway.bus.contract import JobRecord, JobStatus, Subjects, encode, now
from gateway.bus.events import EventPublisher
from plugins.simulator.samples import tiny_workflow


async def _half_done(js: JetStreamContext, subjects: Subjects, job_id: str, age: float) -> None:
    """What a gateway that died after writing the record leaves behind."""
    at = now() - age
    record = JobRecord(
        job_id=job_id,
        status=JobStatus.QUEUED,
        submitted_at=at,
        updated_at=at,
        log_file_path=f"logs/{job_id}.jsonl",
        last_seq=1,
    )
    kv = await js.key_value(subjects.jobs_bucket)
    await kv.create(job_id, encode(record))


async def test_the_retry_completes_the_first_submission(
    gateway: str, js: JetStreamContext, subjects: Subjects
) -> None:
    await _half_done(js, subjects, "cut-short", age=10.0)
    async with httpx.AsyncClient(base_url=gateway) as client:
        body = {"workflow": tiny_workflow(1), "job_id": "cut-short"}
        reply = await client.post("/workflow/submit", json=body)
        assert reply.status_code == 202, reply.text
        assert reply.json()["log_file_path"].endswith("cut-short.jsonl")
        assert await EventPublisher(js, subjects).has_events("cut-short")
        # Asked once more, it is a duplicate: the job exists whole now.
        again = await client.post("/workflow/submit", json=body)
        assert again.status_code == 409 and again.json()["code"] == "duplicate_job"


async def test_a_submission_still_under_way_is_left_to_its_submitter(
    gateway: str, js: JetStreamContext, subjects: Subjects
) -> None:
    await _half_done(js, subjects, "in-flight", age=0.0)
    async with httpx.AsyncClient(base_url=gateway) as client:
        body = {"workflow": tiny_workflow(1), "job_id": "in-flight"}
        reply = await client.post("/workflow/submit", json=body)
        assert reply.status_code == 409, reply.text
        assert not await EventPublisher(js, subjects).has_events("in-flight")
