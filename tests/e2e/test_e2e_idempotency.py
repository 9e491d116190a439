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


class Jobs:
    """The jobs made since a mark: each case of one gateway counts only its own."""

    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self._nc = nc
        self._subjects = subjects
        self._before: set[str] = set()

    async def mark(self) -> None:
        self._before = await _job_ids(self._nc, self._subjects)

    async def new(self) -> set[str]:
        return await _job_ids(self._nc, self._subjects) - self._before


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        yield http


async def _the_same_key_from_concurrent_clients_makes_one_job(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects, jobs: Jobs
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
    assert await jobs.new() == {job_id}
    replayed = [r for r in replies if r.status_code == 200]
    assert all(r.headers["Idempotent-Replayed"] == "true" for r in replayed)
    events = (await read_events(nc, subjects))[job_id]
    assert [type(e) for e in events] == [Queued]


async def _the_same_key_with_another_body_is_refused(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects, jobs: Jobs
) -> None:
    first = await client.post("/workflow/submit", json={"workflow": tiny(1)}, headers=_key("k1"))
    assert first.status_code == 202, first.text
    other = await client.post("/workflow/submit", json={"workflow": tiny(2)}, headers=_key("k1"))
    assert other.status_code == 422, other.text
    error = other.json()
    assert error["code"] == "idempotency_mismatch"
    assert "another request" in error["message"] and error["details"]["job_id"] in error["message"]
    assert await jobs.new() == {first.json()["job_id"]}
    # The defaults written out are the same request as the defaults left out.
    spelt = {"workflow": tiny(1), "priority": 0, "max_attempts": 2, "overrides": {}, "labels": {}}
    same = await client.post("/workflow/submit", json=spelt, headers=_key("k1"))
    assert same.status_code == 200, same.text
    assert same.json()["job_id"] == first.json()["job_id"]


async def _a_replay_answers_with_the_job_as_it_is_now(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects, jobs: Jobs
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
    assert await jobs.new() == {job_id}


async def _an_unusable_key_is_refused(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        "/workflow/submit", json={"workflow": tiny(1)}, headers=_key("k" * 256)
    )
    assert reply.status_code == 400 and "idempotency key" in reply.json()["message"], reply.text


async def _a_key_written_before_its_job_was_cut_is_completed_by_the_retry(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects, jobs: Jobs
) -> None:
    """A gateway that died between the key and the job leaves a key pointing at nothing."""
    body = {"workflow": tiny(4)}
    request = JobRequest(workflow=tiny(4), caller="anonymous", max_attempts=2)
    entry = IdempotencyEntry(job_id="cut-job", request_hash=request_hash(request), created_at=now())
    keys = await nc.jetstream().key_value(subjects.idempotency_bucket)
    await keys.create(scoped_key("anonymous", "k-cut"), encode(entry))
    reply = await client.post("/workflow/submit", json=body, headers=_key("k-cut"))
    assert (reply.status_code, reply.json()["job_id"]) == (202, "cut-job"), reply.text
    assert await jobs.new() == {"cut-job"}
    assert [type(e) for e in (await read_events(nc, subjects))["cut-job"]] == [Queued]
    again = await client.post("/workflow/submit", json=body, headers=_key("k-cut"))
    assert (again.status_code, again.json()["job_id"]) == (200, "cut-job"), again.text


async def _a_repeated_job_id_is_that_job_with_the_same_body_only(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects, jobs: Jobs
) -> None:
    body: dict[str, Any] = {"workflow": tiny(5), "job_id": "mine-1"}
    first = await client.post("/workflow/submit", json=body)
    assert first.status_code == 202, first.text
    again = await client.post("/workflow/submit", json=body)
    assert (again.status_code, again.json()["job_id"]) == (200, "mine-1"), again.text
    other = await client.post("/workflow/submit", json={**body, "priority": 5})
    assert (other.status_code, other.json()["code"]) == (409, "duplicate_job"), other.text
    assert await jobs.new() == {"mine-1"}


async def _a_prompt_sent_again_after_its_deletion_gets_a_new_id(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects, jobs: Jobs
) -> None:
    """ComfyUI's API runs a prompt sent again: the job of its id is not this prompt, even with
    the same graph from the same caller (a repeated job id otherwise answers with that job)."""
    body = {"prompt": tiny(1), "prompt_id": "again-1", "client_id": "me"}
    first = await client.post("/prompt", json=body)
    assert first.json()["prompt_id"] == "again-1", first.text
    deleted = await client.post("/queue", json={"delete": ["again-1"]})
    assert deleted.status_code == 200, deleted.text
    second = await client.post("/prompt", json=body)
    assert second.status_code == 200, second.text
    prompt_id = second.json()["prompt_id"]
    assert prompt_id != "again-1"
    queue = (await client.get("/queue")).json()
    assert [item[1] for item in queue["queue_pending"]] == [prompt_id]
    assert await jobs.new() == {"again-1", prompt_id}


async def _the_key_on_the_bus(nats_url: str) -> None:
    async with await NatsClient.connect(nats_url) as bus:
        first = await bus.submit(tiny(6), idempotency_key="bus-key")
        again = await bus.submit(tiny(6), idempotency_key="bus-key")
        assert (again.job_id, again.replayed, first.replayed) == (first.job_id, True, False)
        other = await bus.submit(tiny(6), idempotency_key="bus-key-2")
        assert other.job_id != first.job_id


async def test_idempotent_submissions_over_rest_and_the_bus(
    client: httpx.AsyncClient, nc: Client, subjects: Subjects, settings: Settings
) -> None:
    """Every case on one gateway (starting one per case would cost more than the cases)."""
    cases = [
        _the_same_key_from_concurrent_clients_makes_one_job,
        _the_same_key_with_another_body_is_refused,
        _a_replay_answers_with_the_job_as_it_is_now,
        _a_key_written_before_its_job_was_cut_is_completed_by_the_retry,
        _a_repeated_job_id_is_that_job_with_the_same_body_only,
        _a_prompt_sent_again_after_its_deletion_gets_a_new_id,
    ]
    jobs = Jobs(nc, subjects)
    for case in cases:
        await jobs.mark()
        await case(client, nc, subjects, jobs)
    await _an_unusable_key_is_refused(client)
    await _the_key_on_the_bus(settings.nats_url)


async def test_callers_keep_their_keys_and_batches_apart(
    settings: Settings, nc: Client, subjects: Subjects
) -> None:
    entries = [f"user/alice@plain:{KEYS['alice']}", f"user@{hash_key(KEYS['bob'])}"]
    keyed = msgspec.structs.replace(settings, api_keys=entries)
    async with running_gateway(keyed) as url:
        alice, bob = (
            httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEYS[who]}"})
            for who in ("alice", "bob")
        )
        async with alice, bob:
            jobs = await _same_key_two_callers(alice, bob)
            await _batches_two_callers(alice, bob)
    assert jobs <= await _job_ids(nc, subjects)


async def _same_key_two_callers(alice: httpx.AsyncClient, bob: httpx.AsyncClient) -> set[str]:
    body = {"workflow": tiny(7)}
    mine = await alice.post("/workflow/submit", json=body, headers=_key("shared"))
    theirs = await bob.post("/workflow/submit", json=body, headers=_key("shared"))
    assert (mine.status_code, theirs.status_code) == (202, 202), (mine.text, theirs.text)
    alices, bobs = mine.json()["job_id"], theirs.json()["job_id"]
    assert alices != bobs
    # Another body under the same key is bob's own business: no word of alice's job.
    other = {"workflow": tiny(8)}
    mismatch = await bob.post("/workflow/submit", json=other, headers=_key("shared"))
    assert mismatch.status_code == 422 and alices not in mismatch.text
    again = await bob.post("/workflow/submit", json=body, headers=_key("shared"))
    assert (again.status_code, again.json()["job_id"]) == (200, bobs)
    assert (await bob.get(f"/workflow/status/{alices}")).status_code == 404
    return {alices, bobs}


async def _batches_two_callers(alice: httpx.AsyncClient, bob: httpx.AsyncClient) -> None:
    body = {"workflow": tiny(9), "overrides": [{}, {"1.color": 1}], "batch_id": "hers"}
    made = await alice.post("/workflow/batch", json=body)
    assert made.status_code == 202, made.text
    for reply in (
        await bob.get("/workflow/batch/hers"),
        await bob.post("/workflow/batch/hers/cancel"),
    ):
        assert (reply.status_code, reply.json()["code"]) == (404, "unknown_batch")
    taken = await bob.post("/workflow/batch", json=body)
    assert (taken.status_code, taken.json()["code"]) == (409, "duplicate_batch")
    assert (await bob.get("/workflow/status/hers-0")).status_code == 404
    assert (await alice.get("/workflow/batch/hers")).json()["counts"] == {"queued": 2}
