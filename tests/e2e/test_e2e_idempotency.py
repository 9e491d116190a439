"""Idempotent submissions: `Idempotency-Key` on REST, `idempotency_key` on the bus, repeated
job ids. Over a real gateway and balancer on a real broker; the jobs need not run, so no
ComfyUI is started (with no server known, a job waits in the queue unchecked).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
from nats.aio.client import Client
from nats.js.errors import NoKeysError

from gateway.api.auth import hash_key
from gateway.balancer.idempotency import scoped_key
from gateway.bus.contract import (
    IdempotencyEntry,
    JobRequest,
    Queued,
    Subjects,
    encode,
    now,
)
from gateway.bus.jobstate import request_hash
from gateway.settings import Settings
from sdk.nats import NatsClient
from tests.chaos.ledger import read_events
from tests.conftest import running_gateway
from tests.e2e.conftest import tiny

KEYS = {"alice": "alice-key-1f9c", "bob": "bob-key-77d0"}


def _key(name: str) -> dict[str, str]:
    return {"Idempotency-Key": name}


async def _job_ids(nc: Client, subjects: Subjects) -> set[str]:
    kv = await nc.jetstream().key_value(subjects.jobs_bucket)
    try:
        return set(await kv.keys())
    except NoKeysError:
        return set()


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        yield http


async def test_the_same_key_from_concurrent_clients_makes_one_job(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects
) -> None:
    body = {"workflow": tiny(1), "overrides": {"Save.filename_prefix": "once"}}
    replies = await asyncio.gather(
        *(client.post("/workflow/submit", json=body, headers=_key("k-race")) for _ in range(8))
    )
    assert {r.status_code for r in replies} <= {200, 202}, [r.text for r in replies]
    assert sorted(r.status_code for r in replies) == [200] * 7 + [202]
    job_ids = {r.json()["job_id"] for r in replies}
    assert len(job_ids) == 1
    (job_id,) = job_ids
    assert await _job_ids(nc, subjects) == {job_id}
    replayed = [r for r in replies if r.status_code == 200]
    assert all(r.headers["Idempotent-Replayed"] == "true" for r in replayed)
    events = (await read_events(nc, subjects))[job_id]
    assert [type(e) for e in events] == [Queued]


async def test_the_same_key_with_another_body_is_refused(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects
) -> None:
    first = await client.post("/workflow/submit", json={"workflow": tiny(1)}, headers=_key("k1"))
    assert first.status_code == 202, first.text
    other = await client.post("/workflow/submit", json={"workflow": tiny(2)}, headers=_key("k1"))
    assert other.status_code == 422, other.text
    error = other.json()
    assert error["code"] == "idempotency_mismatch"
    assert "another request" in error["message"] and error["details"]["job_id"] in error["message"]
    assert await _job_ids(nc, subjects) == {first.json()["job_id"]}
    # The defaults written out are the same request as the defaults left out.
    spelt = {"workflow": tiny(1), "priority": 0, "max_attempts": 2, "overrides": {}, "labels": {}}
    same = await client.post("/workflow/submit", json=spelt, headers=_key("k1"))
    assert same.status_code == 200, same.text
    assert same.json()["job_id"] == first.json()["job_id"]


async def test_a_replay_answers_with_the_job_as_it_is_now(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects
) -> None:
    body = {"workflow": tiny(3)}
    first = await client.post("/workflow/submit", json=body, headers=_key("k-now"))
    job_id = first.json()["job_id"]
    cancelled = await client.post(f"/workflow/cancel/{job_id}")
    assert cancelled.status_code == 200, cancelled.text
    again = await client.post("/workflow/submit", json=body, headers=_key("k-now"))
    assert again.status_code == 200, again.text
    assert (again.status_code, again.json()["status"]) == (200, "cancelled"), again.text
    # execute with the key answers at once with the job, instead of running another.
    executed = await client.post("/workflow/execute", json=body, headers=_key("k-now"))
    assert executed.status_code == 200, executed.text
    assert executed.headers["Idempotent-Replayed"] == "true"
    assert (executed.json()["job_id"], executed.json()["status"]) == (job_id, "cancelled")
    assert await _job_ids(nc, subjects) == {job_id}


async def test_an_unusable_key_is_refused(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        "/workflow/submit", json={"workflow": tiny(1)}, headers=_key("k" * 256)
    )
    assert reply.status_code == 400 and "idempotency key" in reply.json()["message"], reply.text


async def test_a_key_written_before_its_job_was_cut_is_completed_by_the_retry(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects
) -> None:
    """A gateway that died between the key and the job leaves a key pointing at nothing."""
    body = {"workflow": tiny(4)}
    request = JobRequest(workflow=tiny(4), caller="anonymous", max_attempts=2)
    entry = IdempotencyEntry(job_id="cut-job", request_hash=request_hash(request), created_at=now())
    keys = await nc.jetstream().key_value(subjects.idempotency_bucket)
    await keys.create(scoped_key("anonymous", "k-cut"), encode(entry))
    reply = await client.post("/workflow/submit", json=body, headers=_key("k-cut"))
    assert (reply.status_code, reply.json()["job_id"]) == (202, "cut-job"), reply.text
    assert await _job_ids(nc, subjects) == {"cut-job"}
    assert [type(e) for e in (await read_events(nc, subjects))["cut-job"]] == [Queued]
    again = await client.post("/workflow/submit", json=body, headers=_key("k-cut"))
    assert (again.status_code, again.json()["job_id"]) == (200, "cut-job"), again.text


async def test_a_repeated_job_id_is_that_job_with_the_same_body_only(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects
) -> None:
    body: dict[str, Any] = {"workflow": tiny(5), "job_id": "mine-1"}
    first = await client.post("/workflow/submit", json=body)
    assert first.status_code == 202, first.text
    again = await client.post("/workflow/submit", json=body)
    assert (again.status_code, again.json()["job_id"]) == (200, "mine-1"), again.text
    other = await client.post("/workflow/submit", json={**body, "priority": 5})
    assert (other.status_code, other.json()["code"]) == (409, "duplicate_job"), other.text
    assert await _job_ids(nc, subjects) == {"mine-1"}


async def test_the_key_on_the_bus(gateway: str, nats_url: str) -> None:
    async with await NatsClient.connect(nats_url) as bus:
        first = await bus.submit(tiny(6), idempotency_key="bus-key")
        again = await bus.submit(tiny(6), idempotency_key="bus-key")
        assert (again.job_id, again.replayed, first.replayed) == (first.job_id, True, False)
        other = await bus.submit(tiny(6), idempotency_key="bus-key-2")
        assert other.job_id != first.job_id


@pytest.fixture
def nats_url(settings: Settings) -> str:
    return settings.nats_url


async def test_another_caller_with_the_same_key_gets_its_own_job(
    settings: Settings, nc: Client, subjects: Subjects
) -> None:
    entries = [f"user/alice@plain:{KEYS['alice']}", f"user@{hash_key(KEYS['bob'])}"]
    keyed = msgspec.structs.replace(settings, api_keys=entries)
    async with running_gateway(keyed) as url:
        clients = {
            who: httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {key}", **_key("shared")}
            )
            for who, key in KEYS.items()
        }
        try:
            body = {"workflow": tiny(7)}
            alice = await clients["alice"].post("/workflow/submit", json=body)
            bob = await clients["bob"].post("/workflow/submit", json=body)
            assert (alice.status_code, bob.status_code) == (202, 202), (alice.text, bob.text)
            alices, bobs = alice.json()["job_id"], bob.json()["job_id"]
            assert alices != bobs
            # Another body under the same key is bob's own business: no word of alice's job.
            mismatch = await clients["bob"].post("/workflow/submit", json={"workflow": tiny(8)})
            assert mismatch.status_code == 422 and alices not in mismatch.text
            again = await clients["bob"].post("/workflow/submit", json=body)
            assert (again.status_code, again.json()["job_id"]) == (200, bobs)
            seen = await clients["bob"].get(f"/workflow/status/{alices}")
            assert seen.status_code == 404
        finally:
            for http in clients.values():
                await http.aclose()
    assert await _job_ids(nc, subjects) == {alices, bobs}
