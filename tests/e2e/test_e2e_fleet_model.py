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
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest
import pytest_asyncio
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from gateway.app.serve import storage_for
from gateway.balancer.idempotency import open_keys
from gateway.balancer.servers import ServerTable
from gateway.balancer.submit import Submitter
from gateway.bus.connection import connect, session
from gateway.bus.contract import (
    TERMINAL_EVENTS,
    Dispatched,
    Event,
    JobRequest,
    JobStatus,
    Retried,
    Running,
    ServerRecord,
    Subjects,
    event_type,
    now,
)
from gateway.bus.events import EventPublisher
from gateway.bus.jobstate import BOUND, record_from_log
from gateway.bus.natsserver import NatsServer, start_nats_server
from gateway.settings import Settings
from gateway.storage import Storage
from gateway.webhooks.policy import WebhookPolicy
from plugins.comfyui.adapter import run_adapter
from plugins.comfyui.options import AdapterOptions
from plugins.simulator import Simulator, SimulatorConfig, run_simulator
from tests.chaos.ledger import read_events
from tests.e2e.conftest import System, tiny
from tests.helpers import poll_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

STEPS = int(os.environ.get("FLEET_STEPS", "4"))
HEARTBEAT_S = 0.3  # a server is taken for dead after three of these without a heartbeat
FAST = SimulatorConfig(class_seconds={"EmptyImage": 0.03, "ImageInvert": 0.03, "SaveImage": 0.01})
# Stopping an adapter (a removal) waits this long for what runs, not a GPU server's 30 s.
OPTIONS = AdapterOptions(grace_s=0.5, stop_wait_s=1.0)
SETTLE_S = 15.0  # how long a rule may take to act: a removal to fail the jobs pinned there


class Link:
    """A loopback path to the broker that can be cut and healed, like a GPU box's network.

    Cut, it holds what either side sends (as TCP would retransmit it), so a connection outlives
    a short cut, as it outlives a short partition, and what was sent meanwhile arrives late.
    """

    def __init__(self, broker_url: str) -> None:
        parts = urlsplit(broker_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 4222)
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    @property
    def cut(self) -> bool:
        return not self._open.is_set()

    def set_cut(self, cut: bool) -> None:
        (self._open.clear if cut else self._open.set)()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            pump = asyncio.create_task(self._pump(source, sink))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        # A side that closes or resets ends this direction; the other pump sees it in turn.
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                await self._open.wait()
                sink.write(data)
                await sink.drain()
        sink.close()

    async def close(self) -> None:
        self.set_cut(False)
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


@dataclass
class Adapter:
    """A server's adapter as the test runs it: on its own connection, through its own link."""

    link: Link
    nc: Client
    stop: asyncio.Event
    task: asyncio.Task[None]


class Fleet:
    """The module's system, and servers registered by REST whose adapters the test runs."""

    def __init__(
        self, system: System, stack: AsyncExitStack, storage: Storage, broker_url: str
    ) -> None:
        self.system = system
        self._stack = stack
        self.settings = system.settings
        self.subjects = Subjects(system.settings.subject_prefix)
        self._storage = storage
        self._broker_url = broker_url
        self.sims: dict[str, Simulator] = {}
        self.adapters: dict[str, Adapter] = {}
        self._stopping: dict[str, asyncio.Task[None]] = {}

    @property
    def nc(self) -> Client:
        assert self.system.nc is not None
        return self.system.nc

    async def add(
        self,
        client: httpx.AsyncClient,
        server_id: str,
        *,
        labels: dict[str, str],
        capacity: int = 1,
        adapter: bool = True,
    ) -> Simulator:
        """A fake ComfyUI, registered; with its adapter running (healthy) unless told not to."""
        base = Path(self.settings.data_dir) / "sims" / server_id
        config = msgspec.structs.replace(FAST, base_dir=str(base))
        sim = await self._stack.enter_async_context(run_simulator(config))
        self.sims[server_id] = sim
        await self.register(client, server_id, labels=labels, capacity=capacity, adapter=adapter)
        return sim

    async def register(
        self,
        client: httpx.AsyncClient,
        server_id: str,
        *,
        labels: dict[str, str],
        capacity: int = 1,
        adapter: bool = True,
    ) -> None:
        """Register the server (again) by REST, and start its adapter as the host would."""
        await self.stopped(server_id)  # one adapter per server at a time
        body = {
            "name": server_id,
            "server_id": server_id,
            "address": self.sims[server_id].address,
            "capacity": capacity,
            "labels": labels,
        }
        reply = await client.post("/servers", json=body)
        assert reply.status_code == 201, reply.text
        if adapter:
            await self.start_adapter(server_id, labels=labels, capacity=capacity)
            await poll_until(lambda: _healthy(client, server_id), f"{server_id} healthy")

    async def start_adapter(self, server_id: str, *, labels: dict[str, str], capacity: int) -> None:
        link = Link(self._broker_url)
        await link.start()
        nc = await connect(link.url, f"adapter-{server_id}")
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_adapter(
                nc,
                self.settings,
                stop,
                server_id=server_id,
                address=self.sims[server_id].address,
                capacity=capacity,
                labels=labels,
                storage=self._storage,
                options=OPTIONS,
            ),
            name=f"adapter-{server_id}",
        )
        self.adapters[server_id] = Adapter(link, nc, stop, task)

    def stop_adapter(self, server_id: str) -> None:
        """Stop the adapter gracefully in the background, as the host does on a removal."""
        adapter = self.adapters.pop(server_id, None)
        if adapter is not None:
            self._stopping[server_id] = asyncio.create_task(self._stop(adapter))

    async def stopped(self, server_id: str) -> None:
        """Wait for the server's adapter to have stopped, if it is stopping."""
        stopping = self._stopping.pop(server_id, None)
        if stopping is not None:
            await stopping

    @staticmethod
    async def _stop(adapter: Adapter) -> None:
        adapter.stop.set()
        try:
            # A cut-off adapter cannot hand back what it holds: its link heals after a while.
            await asyncio.wait({adapter.task}, timeout=1.0)
            adapter.link.set_cut(False)
            async with asyncio.timeout(30):
                await adapter.task
        finally:
            await adapter.nc.close()
            await adapter.link.close()

    async def close(self) -> None:
        for server_id in list(self.adapters):
            self.stop_adapter(server_id)
        for server_id in list(self._stopping):
            await self.stopped(server_id)


async def _healthy(client: httpx.AsyncClient, server_id: str) -> bool:
    """Heartbeating, healthy, and its capabilities known: it can be given jobs."""
    return await _status_is(client, server_id, "healthy", described=True)


async def _status_is(
    client: httpx.AsyncClient, server_id: str, status: str, *, described: bool = False
) -> bool:
    servers = (await client.get("/servers")).json()
    return any(
        s["server_id"] == server_id and s["status"] == status and (s["node_types"] or not described)
        for s in servers
    )


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
    subjects = Subjects(settings.subject_prefix)
    async with AsyncExitStack() as stack:
        nc = await stack.enter_async_context(session(settings.nats_url, "e2e", subjects))
        storage = await stack.enter_async_context(storage_for(settings, nc.jetstream()))
        system = System(settings, stack)
        system.nc = nc
        system.start_log_sink()
        fleet = Fleet(system, stack, storage, broker.url)
        try:
            system.url = await system.start_gateway()
            yield fleet
        finally:
            await fleet.close()
            await system.stop_all_gateways()
            await system.stop_log_sink()


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


async def stale_replica(fleet: Fleet, server_ids: list[str]) -> Submitter:
    """The submit path of a balancer replica whose view of the fleet has every one of
    `server_ids` registered and has not heard of any removal (its registry watch lags)."""
    js = fleet.nc.jetstream()
    view = ServerTable()
    for server_id in server_ids:
        view.on_registered(
            ServerRecord(server_id=server_id, name=server_id, address="-", registered_at=now())
        )
    return Submitter(
        await js.key_value(fleet.subjects.jobs_bucket),
        fleet.subjects,
        view,
        EventPublisher(js, fleet.subjects),
        await open_keys(js, fleet.subjects, fleet.settings.idempotency_ttl_s),
        js,
        webhooks=WebhookPolicy(fleet.settings),
    )


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
            await poll_until(lambda: _status_is(client, second, "offline"), f"{second} silent")
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
