"""Idempotent submissions and batches as a state space: seeded random interleavings of two
callers submitting with keys (the same key again, with the same body or another, from both
at once), repeating job ids, cutting a submission short after its key, cancelling jobs, and
submitting, repeating and cancelling batches, over a real gateway and balancer.

After every step the system must agree with the model: exactly the jobs the model made exist,
each once (one record, one `queued` event), each seen by its caller only; every key stands for
its one job; every batch holds its jobs and nothing of a cancelled batch waits to run. No
ComfyUI runs (the jobs wait in the queue), so every answer is determined by the steps before.
A failure prints the seed and the steps; `DELIVERY_SEED=<seed>` replays them, and
`DELIVERY_STEPS=<n>` runs longer.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import msgspec
import pytest
from nats.aio.client import Client
from nats.js.errors import NoKeysError

from gateway.balancer.idempotency import scoped_key
from gateway.bus.contract import IdempotencyEntry, JobRequest, Queued, Subjects, encode, now
from gateway.bus.jobstate import request_hash
from gateway.settings import Settings
from tests.chaos.ledger import read_events
from tests.conftest import running_gateway
from tests.e2e.conftest import tiny

STEPS = int(os.environ.get("DELIVERY_STEPS", "20"))
CALLERS = {"alice": "alice-delivery-key", "bob": "bob-delivery-key"}
KEYS = ("k1", "k2", "k3")
BODIES = tuple({"workflow": tiny(seed)} for seed in range(3))
JOB_IDS = ("j1", "j2")
BATCH_IDS = ("b1", "b2")
BATCHES = tuple(
    {"workflow": tiny(10 + n), "overrides": [{"1.color": i} for i in range(n)]} for n in (2, 3)
)


@dataclass
class Job:
    owner: str
    body: int
    cancelled: bool = False


@dataclass
class Batch:
    owner: str
    body: int
    cancelled: bool = False


@dataclass
class Model:
    jobs: dict[str, Job] = field(default_factory=dict)  # job id -> whose, made from which body
    keys: dict[tuple[str, str], str] = field(default_factory=dict)  # (caller, key) -> job id
    cut: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)  # key, no job yet
    batches: dict[str, Batch] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)


class Run:
    def __init__(
        self, clients: dict[str, httpx.AsyncClient], nc: Client, rng: random.Random
    ) -> None:
        self.clients = clients
        self.nc = nc
        self.rng = rng
        self.model = Model()
        self.subjects = Subjects()

    # -- actions ------------------------------------------------------------------------------

    async def submit_with_key(self) -> str:
        who, key, body = self._who(), self.rng.choice(KEYS), self.rng.randrange(len(BODIES))
        reply = await self.clients[who].post(
            "/workflow/submit", json=BODIES[body], headers={"Idempotency-Key": key}
        )
        self._expect_keyed(who, key, body, reply)
        return f"{who} submits body {body} with {key}: {reply.status_code}"

    async def both_at_once(self) -> str:
        key, body = self.rng.choice(KEYS), self.rng.randrange(len(BODIES))
        who = self._who()
        client = self.clients[who]
        replies = await asyncio.gather(
            *(
                client.post("/workflow/submit", json=BODIES[body], headers={"Idempotency-Key": key})
                for _ in range(3)
            )
        )
        codes = sorted(r.status_code for r in replies)
        new = (who, key) not in self.model.keys
        for reply in sorted(replies, key=lambda r: r.status_code, reverse=True):
            self._expect_keyed(who, key, body, reply)
        if new and codes != [422, 422, 422]:
            assert codes == [200, 200, 202], codes
        return f"{who} submits body {body} with {key} thrice at once: {codes}"

    async def cut_short(self) -> str:
        """A gateway that died after writing a key and before making its job."""
        who, key, body = self._who(), self.rng.choice(KEYS), self.rng.randrange(len(BODIES))
        if (who, key) in self.model.keys or (who, key) in self.model.cut:
            return f"cut {who}/{key}: the key is taken"
        job_id = f"cut-{len(self.model.cut)}"
        request = JobRequest(workflow=BODIES[body]["workflow"], caller=who)
        entry = IdempotencyEntry(
            job_id=job_id, request_hash=request_hash(request), created_at=now()
        )
        kv = await self.nc.jetstream().key_value(self.subjects.idempotency_bucket)
        await kv.create(scoped_key(who, key), encode(entry))
        self.model.cut[(who, key)] = (job_id, body)
        return f"cut {who}/{key} after its key, body {body}"

    async def repeat_job_id(self) -> str:
        who, job_id, body = self._who(), self.rng.choice(JOB_IDS), self.rng.randrange(len(BODIES))
        reply = await self.clients[who].post(
            "/workflow/submit", json={**BODIES[body], "job_id": job_id}
        )
        known = self.model.jobs.get(job_id)
        if known is None:
            assert reply.status_code == 202, reply.text
            self.model.jobs[job_id] = Job(who, body)
        elif known.owner == who and known.body == body:
            assert (reply.status_code, reply.json()["job_id"]) == (200, job_id), reply.text
            self._status_is(reply.json()["status"], known)
        else:
            assert (reply.status_code, reply.json()["code"]) == (409, "duplicate_job"), reply.text
        return f"{who} submits job {job_id} with body {body}: {reply.status_code}"

    async def cancel(self) -> str:
        who = self._who()
        if not self.model.jobs:
            return "cancel: no job yet"
        job_id = self.rng.choice(sorted(self.model.jobs))
        job = self.model.jobs[job_id]
        reply = await self.clients[who].post(f"/workflow/cancel/{job_id}")
        if job.owner != who:
            assert reply.status_code == 404, reply.text
        elif job.cancelled:
            assert reply.status_code == 409, reply.text
        else:
            assert reply.status_code == 200, reply.text
            job.cancelled = True
        return f"{who} cancels {job_id}: {reply.status_code}"

    async def submit_batch(self) -> str:
        who, batch_id = self._who(), self.rng.choice(BATCH_IDS)
        body = self.rng.randrange(len(BATCHES))
        reply = await self.clients[who].post(
            "/workflow/batch", json={**BATCHES[body], "batch_id": batch_id}
        )
        known = self.model.batches.get(batch_id)
        if known is None:
            assert reply.status_code == 202, reply.text
            self.model.batches[batch_id] = Batch(who, body)
            for index in range(len(BATCHES[body]["overrides"])):
                self.model.jobs[f"{batch_id}-{index}"] = Job(who, -1)
        elif known.owner != who or known.body != body:
            assert (reply.status_code, reply.json()["code"]) == (409, "duplicate_batch")
        elif known.cancelled:
            assert (reply.status_code, reply.json()["code"]) == (409, "batch_cancelled")
        else:
            assert reply.status_code == 200, reply.text
        return f"{who} submits batch {batch_id} (body {body}): {reply.status_code}"

    async def cancel_batch(self) -> str:
        who, batch_id = self._who(), self.rng.choice(BATCH_IDS)
        reply = await self.clients[who].post(f"/workflow/batch/{batch_id}/cancel")
        known = self.model.batches.get(batch_id)
        if known is None or known.owner != who:
            assert reply.status_code == 404, reply.text
            return f"{who} cancels batch {batch_id}: 404"
        assert reply.status_code == 200, reply.text
        known.cancelled = True
        for index in range(len(BATCHES[known.body]["overrides"])):
            self.model.jobs[f"{batch_id}-{index}"].cancelled = True
        return f"{who} cancels batch {batch_id}: 200"

    async def step(self) -> None:
        actions = [
            self.submit_with_key,
            self.both_at_once,
            self.cut_short,
            self.repeat_job_id,
            self.cancel,
            self.submit_batch,
            self.cancel_batch,
        ]
        action = self.rng.choices(actions, weights=[30, 10, 8, 12, 14, 14, 8])[0]
        self.model.steps.append(await action())

    # -- what the answers must be -------------------------------------------------------------

    def _who(self) -> str:
        return self.rng.choice(sorted(CALLERS))

    def _expect_keyed(self, who: str, key: str, body: int, reply: httpx.Response) -> None:
        made = self.model.keys.get((who, key))
        if made is None and (who, key) in self.model.cut:
            job_id, cut_body = self.model.cut[(who, key)]
            if cut_body == body:
                assert (reply.status_code, reply.json()["job_id"]) == (202, job_id), reply.text
                del self.model.cut[(who, key)]
                self.model.keys[(who, key)] = job_id
                self.model.jobs[job_id] = Job(who, body)
                return
            assert (reply.status_code, reply.json()["code"]) == (422, "idempotency_mismatch")
            return
        if made is None:
            assert reply.status_code == 202, reply.text
            job_id = reply.json()["job_id"]
            self.model.keys[(who, key)] = job_id
            self.model.jobs[job_id] = Job(who, body)
            return
        job = self.model.jobs[made]
        if job.body == body:
            assert (reply.status_code, reply.json()["job_id"]) == (200, made), reply.text
            assert reply.headers["Idempotent-Replayed"] == "true"
            self._status_is(reply.json()["status"], job)
        else:
            assert (reply.status_code, reply.json()["code"]) == (422, "idempotency_mismatch")
            assert made in reply.json()["message"]

    @staticmethod
    def _status_is(status: str, job: Job) -> None:
        assert status == ("cancelled" if job.cancelled else "queued"), (status, job)

    # -- what must hold at every moment -------------------------------------------------------

    async def check_now(self) -> None:
        kv = await self.nc.jetstream().key_value(self.subjects.jobs_bucket)
        try:
            stored = set(await kv.keys())
        except NoKeysError:
            stored = set()
        assert stored == set(self.model.jobs), stored ^ set(self.model.jobs)
        events = await read_events(self.nc, self.subjects)
        for job_id, job in self.model.jobs.items():
            kinds = [type(e).__name__ for e in events.get(job_id, [])]
            assert kinds[:1] == ["Queued"] and kinds.count("Queued") == 1, (job_id, kinds)
            assert kinds[-1:] == (["Cancelled"] if job.cancelled else ["Queued"]), (job_id, kinds)
            first = events[job_id][0]
            assert isinstance(first, Queued) and first.data.request.caller == job.owner
        if self.model.jobs:  # one job a step, seen by its caller only
            job_id = self.rng.choice(sorted(self.model.jobs))
            for who, client in self.clients.items():
                reply = await client.get(f"/workflow/status/{job_id}")
                expected = 200 if who == self.model.jobs[job_id].owner else 404
                assert reply.status_code == expected, (who, job_id, reply.text)
        for batch_id, batch in self.model.batches.items():
            for who, client in self.clients.items():
                reply = await client.get(f"/workflow/batch/{batch_id}")
                if who != batch.owner:
                    assert reply.status_code == 404, reply.text
                    continue
                size = len(BATCHES[batch.body]["overrides"])
                statuses = Counter(
                    "cancelled" if self.model.jobs[f"{batch_id}-{i}"].cancelled else "queued"
                    for i in range(size)
                )
                view = reply.json()
                assert (view["size"], view["counts"]) == (size, statuses), view["counts"]
                assert view["cancelled"] == batch.cancelled


@pytest.fixture
async def clients(settings: Settings) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    entries = [f"user/{who}@plain:{key}" for who, key in CALLERS.items()]
    async with running_gateway(msgspec.structs.replace(settings, api_keys=entries)) as url:
        made = {
            who: httpx.AsyncClient(
                base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"}
            )
            for who, key in CALLERS.items()
        }
        try:
            yield made
        finally:
            for client in made.values():
                await client.aclose()


async def test_every_interleaving_of_keyed_submits_and_batches_keeps_the_invariants(
    clients: dict[str, httpx.AsyncClient], nc: Client
) -> None:
    seed = int(os.environ.get("DELIVERY_SEED", random.randrange(2**32)))
    run = Run(clients, nc, random.Random(seed))
    try:
        for _ in range(STEPS):
            await run.step()
            await run.check_now()
    except BaseException as exc:
        trail = "\n  ".join(run.model.steps)
        raise AssertionError(
            f"DELIVERY_SEED={seed} DELIVERY_STEPS={STEPS} replays this; steps:\n  {trail}\n{exc!r}"
        ) from exc
