"""Batches over the real system: many jobs under one id, their statuses, their cancel, SQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from nats.aio.client import Client
from nats.js.errors import NoKeysError

from gateway.api.batches import batch_hash, job_id_of
from gateway.bus.contract import BatchRecord, JobAccepted, JobRequest, Subjects, decode, encode
from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import System, tiny
from tests.helpers import poll_until

# SaveImage refuses a prefix that leaves its output folder, at run time, as ComfyUI does.
ESCAPE = {"Save.filename_prefix": "../outside"}


async def _job_ids(nc: Client, subjects: Subjects) -> set[str]:
    kv = await nc.jetstream().key_value(subjects.jobs_bucket)
    try:
        return set(await kv.keys())
    except NoKeysError:
        return set()


async def _until_done(client: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def done() -> bool:
        reply = await client.get(f"/workflow/batch/{batch_id}")
        assert reply.status_code == 200, reply.text
        seen.update(reply.json())
        return bool(seen["done"])

    await poll_until(done, f"batch {batch_id} done", within=60)
    return seen


async def test_batches_run_and_cancel(system: System) -> None:
    """One system for both (a system per case would cost more than the case)."""
    run, hang = {"pool": "run"}, {"pool": "hang"}
    await system.add_server("b1", labels=run, capacity=4)
    await system.add_server("hang", SimulatorConfig(hang_queue=True), labels=hang)
    await _one_failing_override_set(system)
    await _cancelling(system)


async def _one_failing_override_set(system: System) -> None:
    sets = [{"Save.filename_prefix": f"batch-{i}"} for i in range(20)]
    sets[7] = ESCAPE
    body = {
        "workflow": tiny(1),
        "overrides": sets,
        "batch_id": "twenty",
        "max_attempts": 1,
        "labels": {"pool": "run"},
    }
    async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
        reply = await client.post("/workflow/batch", json=body)
        assert reply.status_code == 202, reply.text
        assert reply.json()["size"] == 20
        batch = await _until_done(client, "twenty")
        assert batch["counts"] == {"succeeded": 19, "failed": 1}, batch["counts"]
        by_id = {job["job_id"]: job for job in batch["jobs"]}
        assert list(by_id) == [job_id_of("twenty", i) for i in range(20)]
        assert by_id["twenty-7"]["status"] == "failed"
        assert all(by_id[f"twenty-{i}"]["images"] for i in range(20) if i != 7)

        async def indexed() -> bool:
            reply = await client.post(
                "/logs/query",
                json={
                    "sql": "SELECT status, count(*) FROM jobs WHERE batch_id = 'twenty' "
                    "GROUP BY ALL ORDER BY status"
                },
            )
            return bool(reply.json()["rows"] == [["failed", 1], ["succeeded", 19]])

        await poll_until(indexed, "the batch's jobs in the log index", within=30)


async def _cancelling(system: System) -> None:
    sets = [{"1.color": i} for i in range(6)]
    body = {"workflow": tiny(2), "overrides": sets, "labels": {"pool": "hang"}}
    async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
        reply = await client.post("/workflow/batch", json=body)
        assert reply.status_code == 202, reply.text
        batch_id = reply.json()["batch_id"]
        cancelled = await client.post(f"/workflow/batch/{batch_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["counts"] == {"cancelled": 6}
        assert cancelled.json()["done"] and cancelled.json()["cancelled"]
        again = await client.post(f"/workflow/batch/{batch_id}/cancel")
        assert again.status_code == 200 and again.json()["counts"] == {"cancelled": 6}
        resent = await client.post("/workflow/batch", json={**body, "batch_id": batch_id})
        assert (resent.status_code, resent.json()["code"]) == (409, "batch_cancelled")


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        yield http


def _requests(body: dict[str, Any], batch_id: str) -> list[JobRequest]:
    """The jobs' requests as the gateway makes them (no API keys: caller `anonymous`)."""
    return [
        JobRequest(
            workflow=body["workflow"],
            overrides=overrides,
            job_id=job_id_of(batch_id, index),
            batch_id=batch_id,
            caller="anonymous",
        )
        for index, overrides in enumerate(body["overrides"])
    ]


async def _a_batch_cut_short_is_completed_by_sending_it_again(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects
) -> None:
    """What a gateway that died after the batch's record and five of its jobs leaves."""
    body = {"workflow": tiny(3), "overrides": [{"1.color": i} for i in range(12)]}
    requests = _requests(body, "cut")
    record = BatchRecord(
        batch_id="cut", caller="anonymous", size=12, request_hash=batch_hash(requests), created_at=0
    )
    await (await nc.jetstream().key_value(subjects.batches_bucket)).create("cut", encode(record))
    for request in requests[:5]:
        answer = await nc.request(subjects.submit, encode(request), timeout=10)
        decode(answer.data, JobAccepted)
    half = await client.get("/workflow/batch/cut")
    assert half.json()["unsubmitted"] == list(range(5, 12)), half.text
    assert half.json()["counts"] == {"queued": 5, "unsubmitted": 7}
    for _ in range(2):
        reply = await client.post("/workflow/batch", json={**body, "batch_id": "cut"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["counts"] == {"queued": 12}
    assert await _job_ids(nc, subjects) == {job_id_of("cut", i) for i in range(12)}
    other = await client.post("/workflow/batch", json={**body, "batch_id": "cut", "priority": 3})
    assert (other.status_code, other.json()["code"]) == (409, "duplicate_batch"), other.text


async def _a_job_whose_record_expired_is_not_unsubmitted(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects
) -> None:
    """After the cut batch: one of its jobs ends, and its record leaves KV as the records'
    retention would take it (no log sink here to tell it from its log)."""
    ended = await client.post(f"/workflow/cancel/{job_id_of('cut', 3)}")
    assert ended.status_code == 200, ended.text
    await (await nc.jetstream().key_value(subjects.jobs_bucket)).purge(job_id_of("cut", 3))
    batch = (await client.get("/workflow/batch/cut")).json()
    assert (batch["expired"], batch["unsubmitted"]) == ([3], []), batch
    assert batch["counts"] == {"queued": 11, "expired": 1}
    # Sent again, the batch does not make it anew.
    body = {"workflow": tiny(3), "overrides": [{"1.color": i} for i in range(12)]}
    again = await client.post("/workflow/batch", json={**body, "batch_id": "cut"})
    assert again.status_code == 200 and again.json()["counts"] == batch["counts"], again.text
    assert job_id_of("cut", 3) not in await _job_ids(nc, subjects)


async def _a_cancel_racing_the_submission_leaves_no_job_to_run(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects
) -> None:
    body = {"workflow": tiny(4), "overrides": [{"1.color": i} for i in range(150)]}
    submitting = asyncio.create_task(client.post("/workflow/batch", json={**body, "batch_id": "r"}))

    async def cancel() -> bool:
        reply = await client.post("/workflow/batch/r/cancel")
        return reply.status_code == 200

    await poll_until(cancel, "the batch exists to be cancelled")
    submitted = await submitting
    assert submitted.status_code in (202, 409), submitted.text
    batch = (await client.get("/workflow/batch/r")).json()
    assert set(batch["counts"]) <= {"cancelled", "unsubmitted"}, batch["counts"]
    assert batch["done"] and batch["cancelled"]


async def _batch_shapes_and_limits(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects
) -> None:
    too_many = {"workflow": tiny(5), "overrides": [{}] * 1001}
    reply = await client.post("/workflow/batch", json=too_many)
    assert (reply.status_code, reply.json()["code"]) == (400, "batch_size"), reply.text
    assert "1000" in reply.json()["message"]
    both = {"workflow": tiny(5), "workflows": [tiny(6)]}
    assert (await client.post("/workflow/batch", json=both)).status_code == 400
    bad = {"workflows": [tiny(5), {"1": {"inputs": {}}}]}
    refused = await client.post("/workflow/batch", json=bad)
    assert refused.status_code == 400 and refused.json()["details"]["index"] == 1, refused.text
    assert (await client.get("/workflow/batch/nothing")).status_code == 404
    made = await client.post("/workflow/batch", json={"workflows": [tiny(5), tiny(6)]})
    assert made.status_code == 202 and made.json()["counts"] == {"queued": 2}, made.text


async def _a_batch_named_by_an_idempotency_key(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects
) -> None:
    body = {"workflow": tiny(8), "overrides": [{"1.color": i} for i in range(3)]}
    key = {"Idempotency-Key": "nightly-7"}
    first = await client.post("/workflow/batch", json=body, headers=key)
    assert first.status_code == 202, first.text
    again = await client.post("/workflow/batch", json=body, headers=key)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["batch_id"] == first.json()["batch_id"]
    assert again.json()["counts"] == {"queued": 3}
    other = await client.post("/workflow/batch", json={**body, "priority": 1}, headers=key)
    assert (other.status_code, other.json()["code"]) == (422, "idempotency_mismatch"), other.text
    both = await client.post("/workflow/batch", json={**body, "batch_id": "x"}, headers=key)
    assert both.status_code == 400, both.text
    taken = await client.post("/workflow/batch", json={**body, "batch_id": "key-mine"})
    assert taken.status_code == 400, taken.text


async def test_batches_without_servers(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects
) -> None:
    """Cases that need no job to run, on one gateway whose jobs wait in the queue."""
    await _a_batch_cut_short_is_completed_by_sending_it_again(client, nc, subjects)
    await _a_job_whose_record_expired_is_not_unsubmitted(client, nc, subjects)
    await _a_cancel_racing_the_submission_leaves_no_job_to_run(client, nc, subjects)
    await _batch_shapes_and_limits(client, nc, subjects)
    await _a_batch_named_by_an_idempotency_key(client, nc, subjects)
