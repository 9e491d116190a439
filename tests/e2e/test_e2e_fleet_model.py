"""Jobs on a fleet that changes under them: servers removed and registered again, adapters cut
off from the broker and back, prompts held, submissions through a replica that has not heard of
a removal, cancels.

One system for the module, as on a fleet: the gateway (with the balancer) and the log sink here,
each server's adapter on a connection of its own through a `Link` that the test can cut, the
way a GPU box drops off the network while its ComfyUI goes on. The targeted tests pin down what
was wrong; the seeded interleaving checks after every step that no job pinned to a removed
server stays queued, that none is bound to a server after its removal, that each job ends at
most once, and that each server's bound count (`comfyautomate_server_bound`) is the jobs its
log shows bound there. A failure prints its seed: `FLEET_SEED=<seed>` replays it, and
`FLEET_STEPS=200 uv run pytest -n 0 tests/e2e/test_e2e_fleet_model.py` runs longer.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from gateway.balancer.submit import Submitter
from gateway.bus.contract import (
    TERMINAL_EVENTS,
    Dispatched,
    Event,
    JobRequest,
    JobStatus,
    Retried,
    Running,
    event_type,
)
from gateway.bus.jobstate import BOUND, record_from_log
from gateway.bus.natsserver import NatsServer, start_nats_server
from gateway.settings import Settings
from tests.chaos.ledger import read_events
from tests.e2e.conftest import tiny
from tests.e2e.fleetkit import Fleet, running_fleet, stale_replica, status_is
from tests.helpers import poll_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

STEPS = int(os.environ.get("FLEET_STEPS", "4"))
HEARTBEAT_S = 0.3  # a server is taken for dead after three of these without a heartbeat
SETTLE_S = 15.0  # how long a rule may take to act: a removal to fail the jobs pinned there


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsServer]:
    path = tmp_path_factory.mktemp("fleet-broker")
    server = await start_nats_server(
        port=0, store_dir=path / "nats", log_file=path / "nats-server.log"
    )
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(
    broker: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    settings = Settings(
        nats_url=broker.url,
        data_dir=str(tmp_path_factory.mktemp("fleet") / "data"),
        port=0,
        register_burst=1000,
        heartbeat_interval_s=HEARTBEAT_S,
    )
    async with running_fleet(settings, broker.url) as running:
        yield running


POOL = {"pool": "model"}
SERVERS = ("p1", "p2")
CAPACITY = {"p1": 2, "p2": 1}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(fleet: Fleet) -> tuple[str, str]:
    """Two servers for the module's jobs (labelled POOL); each test leaves them as it found
    them: registered, reachable, nothing held."""
    async with httpx.AsyncClient(base_url=fleet.system.url, timeout=60) as client:
        for server_id, capacity in CAPACITY.items():
            await fleet.add(client, server_id, labels=POOL, capacity=capacity)
    return SERVERS


async def _result(client: httpx.AsyncClient, job_id: str, wait: float = 20) -> dict[str, Any]:
    reply = await client.get(f"/workflow/result/{job_id}", params={"wait": wait})
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


async def _status(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    status: dict[str, Any] = (await client.get(f"/workflow/status/{job_id}")).json()
    return status


async def _bound_gauge(client: httpx.AsyncClient) -> dict[str, float]:
    """`comfyautomate_server_bound` per server, from this gateway's /metrics."""
    text = (await client.get("/metrics")).text
    return {
        sample.labels["server"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "comfyautomate_server_bound"
    }


# -- what was wrong ------------------------------------------------------------------------------


async def test_a_job_pinned_to_a_removed_server_fails_however_late_it_comes(
    fleet: Fleet,
) -> None:
    async with httpx.AsyncClient(base_url=fleet.system.url, timeout=60) as client:
        # Registered, but no adapter: jobs pinned to it wait.
        await fleet.add(client, "gone", labels={"test": "gone"}, adapter=False)
        body = {"workflow": tiny(1), "server": "gone"}
        waiting = (await client.post("/workflow/submit", json=body)).json()["job_id"]
        stale = await stale_replica(fleet, ["gone"])
        assert (await client.delete("/servers/gone")).status_code == 204
        assert _failed_for_removal(await _result(client, waiting))
        # The leader has acted on the removal. A job pinned to the server that reaches it
        # only now (through a replica that had not heard of the removal, or a queued event
        # applied late) fails the same way, instead of waiting for ever.
        late = await stale.submit(JobRequest(workflow=tiny(2), server="gone"))
        assert _failed_for_removal(await _result(client, late.job_id, wait=SETTLE_S))


async def test_a_late_end_of_an_attempt_handed_back_is_booked_to_its_own_server(
    fleet: Fleet, pool: tuple[str, str]
) -> None:
    first, second = pool
    links = {server_id: fleet.adapters[server_id].link for server_id in pool}
    async with httpx.AsyncClient(base_url=fleet.system.url, timeout=60) as client:
        learnt = await _learnt(client, second)
        try:
            for server_id in pool:  # a prompt starts (`running`) and stays there
                fleet.sims[server_id].hold_setup(True)
            links[second].set_cut(True)
            await poll_until(lambda: status_is(client, second, "offline"), f"{second} silent")
            body = {"workflow": tiny(3), "labels": POOL, "max_attempts": 3}
            job_id = (await client.post("/workflow/submit", json=body)).json()["job_id"]

            async def running_on(server_id: str) -> bool:
                status = await _status(client, job_id)
                return (status["status"], status["server_id"]) == ("running", server_id)

            await poll_until(lambda: running_on(first), f"attempt 1 running on {first}")
            # The first server drops off the network, its prompt still held on its ComfyUI:
            # the balancer hands the attempt back, and the next one starts on the second.
            links[first].set_cut(True)
            links[second].set_cut(False)
            await poll_until(lambda: running_on(second), f"the next attempt running on {second}")
            # The first comes back and its attempt succeeds: the job's end (the log takes one).
            links[first].set_cut(False)
            fleet.sims[first].hold_setup(False)
            result = await _result(client, job_id)
            ran = (result["status"], result["server_id"], result["attempts"])
            assert ran == ("succeeded", first, 1), result
            # Nothing of that run is taken for the second server's, which finished nothing.
            assert await _learnt(client, second) == learnt
            # The second is told to drop the abandoned attempt; its slot takes the next job.
            fleet.sims[second].hold_setup(False)
            again = {"workflow": tiny(4), "server": second}
            next_job = (await client.post("/workflow/submit", json=again)).json()["job_id"]
            assert (await _result(client, next_job))["status"] == "succeeded"
        finally:
            for server_id in pool:
                fleet.sims[server_id].hold_setup(False)
                links[server_id].set_cut(False)


def _failed_for_removal(result: dict[str, Any]) -> bool:
    code = (result.get("error") or {}).get("code")
    assert (result["status"], code) == ("failed", "server_removed"), result
    return True


async def _learnt(client: httpx.AsyncClient, server_id: str) -> tuple[Any, ...]:
    """What the balancer has learnt of the server's speed from the jobs it saw end there."""
    servers = (await client.get("/servers/health")).json()["servers"]
    [server] = [s for s in servers if s["server_id"] == server_id]
    return (server["seconds_per_job"], server["seconds_per_unit"], server["shapes_learnt"])


# -- the interleaving ----------------------------------------------------------------------------


@dataclass
class Truth:
    """What the test did and was told: what the system must agree with."""

    jobs: dict[str, str | None] = field(default_factory=dict)  # job id -> the server pinned
    max_attempts: dict[str, int] = field(default_factory=dict)
    registered: set[str] = field(default_factory=lambda: set(SERVERS))
    # Server id -> (removed, registered again) wall-clock moments: no binding in between.
    removals: dict[str, list[tuple[float, float | None]]] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)
    steps: list[str] = field(default_factory=list)

    def removed(self, server_id: str) -> bool:
        spans = self.removals.get(server_id, [])
        return bool(spans) and spans[-1][1] is None


class Interleaving:
    def __init__(
        self, fleet: Fleet, client: httpx.AsyncClient, rng: random.Random, stale: Submitter
    ) -> None:
        self.fleet = fleet
        self.client = client
        self.rng = rng
        self.stale = stale
        self.truth = Truth()

    # -- actions --------------------------------------------------------------------------------

    async def submit(self) -> str:
        body: dict[str, Any] = {
            "workflow": tiny(self.rng.randrange(1_000_000), "fleet"),
            "labels": POOL,
            "max_attempts": self.rng.randint(1, 3),
        }
        if self.rng.random() < 0.4:
            body["server"] = self.rng.choice(SERVERS)
        reply = await self.client.post("/workflow/submit", json=body)
        if reply.status_code == 404:  # pinned to a server that is not registered now
            assert body.get("server") not in self.truth.registered, reply.text
            return f"submit pinned to {body['server']}: 404"
        assert reply.status_code == 202, reply.text
        self._note(reply.json()["job_id"], body.get("server"), body["max_attempts"])
        return f"submit {body.get('server', '-')} x{body['max_attempts']}"

    async def submit_stale(self) -> str:
        """A job pinned to a server, through a replica that has heard of no removal."""
        server_id = self.rng.choice(SERVERS)
        request = JobRequest(
            workflow=tiny(self.rng.randrange(1_000_000), "fleet"),
            server=server_id,
            labels=POOL,
            max_attempts=2,
        )
        accepted = await self.stale.submit(request)
        self._note(accepted.job_id, server_id, 2)
        return f"submit {server_id} through a stale replica"

    def _note(self, job_id: str, server_id: str | None, max_attempts: int) -> None:
        self.truth.jobs[job_id] = server_id
        self.truth.max_attempts[job_id] = max_attempts

    async def cancel(self) -> str:
        # Not one held by a cut-off adapter: the gateway would wait for its answer (5 s) before
        # it cancels the job itself, which tests/e2e/test_e2e_cancel.py covers.
        records = await self._records()
        cut = {s for s, a in self.fleet.adapters.items() if a.link.cut}
        candidates = [
            job_id
            for job_id, record in records.items()
            if record is not None and not (record.status in BOUND and record.server_id in cut)
        ]
        if not candidates:
            return "cancel: nothing to cancel"
        job_id = self.rng.choice(candidates)
        reply = await self.client.post(f"/workflow/cancel/{job_id}")
        assert reply.status_code in (200, 409), reply.text
        return f"cancel {job_id[:8]}: {reply.status_code}"

    async def registry(self) -> str:
        server_id = self.rng.choice(SERVERS)
        if server_id in self.truth.registered:
            reply = await self.client.delete(f"/servers/{server_id}")
            assert reply.status_code == 204, reply.text
            self.truth.removals.setdefault(server_id, []).append((time.time(), None))
            self.truth.registered.discard(server_id)
            self.fleet.stop_adapter(server_id)
            return f"remove {server_id}"
        await self._register(server_id)
        return f"register {server_id} again"

    async def _register(self, server_id: str) -> None:
        await self.fleet.stopped(server_id)
        # Before the request: a binding after this moment may be a binding after it.
        at = time.time()
        capacity = CAPACITY[server_id]
        await self.fleet.register(self.client, server_id, labels=POOL, capacity=capacity)
        removed, _ = self.truth.removals[server_id][-1]
        self.truth.removals[server_id][-1] = (removed, at)
        self.truth.registered.add(server_id)

    async def network(self) -> str:
        live = sorted(self.fleet.adapters.keys() & set(SERVERS))
        if not live:
            return "network: no adapter runs"
        server_id = self.rng.choice(live)
        link = self.fleet.adapters[server_id].link
        link.set_cut(not link.cut)
        return f"{server_id} {'cut off' if link.cut else 'back'}"

    async def hold(self) -> str:
        server_id = self.rng.choice(SERVERS)
        on = server_id not in self.truth.held
        self.fleet.sims[server_id].hold_setup(on)
        (self.truth.held.add if on else self.truth.held.discard)(server_id)
        return f"{'hold' if on else 'release'} {server_id}"

    async def wait(self) -> str:
        pause = self.rng.uniform(0, 0.3)
        await asyncio.sleep(pause)  # time passing is an action here, not a synchronisation
        return f"wait {pause:.2f} s"

    async def step(self) -> None:
        actions = [
            self.submit,
            self.submit_stale,
            self.cancel,
            self.registry,
            self.network,
            self.hold,
            self.wait,
        ]
        action = self.rng.choices(actions, weights=[30, 12, 8, 14, 12, 10, 14])[0]
        self.truth.steps.append(await action())

    # -- what must hold after every step --------------------------------------------------------

    async def check_now(self) -> None:
        events = await read_events(self.fleet.nc, self.fleet.subjects)
        for job_id in self.truth.jobs:
            self._check_log(job_id, events.get(job_id, []))
            for event in events.get(job_id, []):
                if isinstance(event, Dispatched):
                    self._check_not_removed(job_id, event)
        await poll_until(
            self._pinned_to_removed_gone, "jobs pinned to removed servers failed", within=SETTLE_S
        )
        await poll_until(
            self._bound_counts_agree, "bound counts agree with the log", within=SETTLE_S
        )

    def _check_log(self, job_id: str, trail: list[Event]) -> None:
        kinds = [event_type(e) for e in trail]
        assert [e.seq for e in trail] == list(range(1, len(trail) + 1)), (job_id, kinds)
        ends = [i for i, e in enumerate(trail) if isinstance(e, TERMINAL_EVENTS)]
        assert len(ends) <= 1 and (not ends or ends[0] == len(trail) - 1), (job_id, kinds)
        # A try counts once, whether its start or its hand-back says so: an attempt handed back
        # may still report its start late, from a server that was only cut off.
        tries = {e.data.attempt for e in trail if isinstance(e, Running)} | {
            e.data.attempt for e in trail if isinstance(e, Retried) and e.data.counts
        }
        assert len(tries) <= self.truth.max_attempts[job_id], (job_id, kinds)

    def _check_not_removed(self, job_id: str, event: Dispatched) -> None:
        for removed, again in self.truth.removals.get(event.data.server_id, []):
            assert not (removed <= event.ts and (again is None or event.ts < again)), (
                f"{job_id} bound to {event.data.server_id} after its removal"
            )

    async def _records(self) -> dict[str, Any]:
        events = await read_events(self.fleet.nc, self.fleet.subjects)
        return {job_id: record_from_log(events.get(job_id, [])) for job_id in self.truth.jobs}

    async def _pinned_to_removed_gone(self) -> bool:
        records = await self._records()
        return not [
            job_id
            for job_id, server_id in self.truth.jobs.items()
            if server_id is not None
            and self.truth.removed(server_id)
            and records[job_id] is not None
            and records[job_id].status is JobStatus.QUEUED
        ]

    async def _bound_counts_agree(self) -> bool:
        records = await self._records()
        from_log = Counter(
            record.server_id
            for record in records.values()
            if record is not None and record.status in BOUND
        )
        gauge = await _bound_gauge(self.client)
        for server_id in SERVERS:
            assert from_log[server_id] <= CAPACITY[server_id], (server_id, from_log)
        return all(gauge.get(s, 0) == from_log[s] for s in SERVERS)

    # -- once the changes stop ------------------------------------------------------------------

    async def heal(self) -> None:
        for server_id in SERVERS:
            self.fleet.sims[server_id].hold_setup(False)
            adapter = self.fleet.adapters.get(server_id)
            if adapter is not None:
                adapter.link.set_cut(False)
        self.truth.held.clear()
        for server_id in SERVERS:
            if server_id not in self.truth.registered:
                await self._register(server_id)
                self.truth.steps.append(f"register {server_id} again")

    async def check_end(self) -> None:
        for job_id in self.truth.jobs:
            result = await _result(self.client, job_id, wait=60)
            assert result["status"] in ("succeeded", "failed", "cancelled"), result
        events = await read_events(self.fleet.nc, self.fleet.subjects)
        for job_id in self.truth.jobs:
            trail = events[job_id]
            self._check_log(job_id, trail)
            assert isinstance(trail[-1], TERMINAL_EVENTS), (job_id, [event_type(e) for e in trail])
        await poll_until(self._bound_counts_agree, "no slot left taken", within=SETTLE_S)


async def test_every_interleaving_of_fleet_changes_keeps_the_invariants(
    fleet: Fleet, pool: tuple[str, str]
) -> None:
    seed = int(os.environ.get("FLEET_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=fleet.system.url, timeout=90) as client:
        run = Interleaving(fleet, client, rng, await stale_replica(fleet, list(SERVERS)))
        try:
            for _ in range(STEPS):
                await run.step()
                await run.check_now()
            await run.heal()
            await run.check_end()
        except BaseException as exc:
            trail = "\n  ".join(run.truth.steps)
            raise AssertionError(
                f"FLEET_SEED={seed} FLEET_STEPS={STEPS} replays this; steps:\n  {trail}\n{exc!r}"
            ) from exc
