"""A fleet whose servers the test runs itself: each adapter on its own connection to the
broker, through a `Link` that can be cut like a GPU box's network, beside the system's gateway
(with its balancer) and log sink. Servers are registered by REST; their adapters are started and
stopped here, as the adapter host of `up` would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import msgspec
from nats.aio.client import Client

from gateway.app.serve import storage_for
from gateway.balancer.idempotency import open_keys
from gateway.balancer.servers import ServerTable
from gateway.balancer.submit import Submitter
from gateway.bus.connection import connect, session
from gateway.bus.contract import ServerRecord, Subjects, now
from gateway.bus.events import EventPublisher
from gateway.settings import Settings
from gateway.storage import Storage
from gateway.webhooks.policy import WebhookPolicy
from plugins.comfyui.adapter import run_adapter
from plugins.comfyui.options import AdapterOptions
from plugins.simulator import Simulator, SimulatorConfig, run_simulator
from tests.e2e.conftest import System
from tests.helpers import poll_until

FAST = SimulatorConfig(class_seconds={"EmptyImage": 0.03, "ImageInvert": 0.03, "SaveImage": 0.01})
# Stopping an adapter (a removal) waits this long for what runs, not a GPU server's 30 s.
OPTIONS = AdapterOptions(grace_s=0.5, stop_wait_s=1.0)


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
            await poll_until(lambda: healthy(client, server_id), f"{server_id} healthy")

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


async def healthy(client: httpx.AsyncClient, server_id: str) -> bool:
    """Heartbeating, healthy, and its capabilities known: it can be given jobs."""
    return await status_is(client, server_id, "healthy", described=True)


async def status_is(
    client: httpx.AsyncClient, server_id: str, status: str, *, described: bool = False
) -> bool:
    servers = (await client.get("/servers")).json()
    return any(
        s["server_id"] == server_id and s["status"] == status and (s["node_types"] or not described)
        for s in servers
    )


@contextlib.asynccontextmanager
async def running_fleet(settings: Settings, broker_url: str) -> AsyncIterator[Fleet]:
    """The system on `settings`' broker, without adapters of its own; every adapter and fake
    server started through the fleet is stopped on exit, also when the block fails."""
    subjects = Subjects(settings.subject_prefix)
    async with AsyncExitStack() as stack:
        nc = await stack.enter_async_context(session(settings.nats_url, "e2e", subjects))
        storage = await stack.enter_async_context(storage_for(settings, nc.jetstream()))
        system = System(settings, stack)
        system.nc = nc
        system.start_log_sink()
        fleet = Fleet(system, stack, storage, broker_url)
        try:
            system.url = await system.start_gateway()
            yield fleet
        finally:
            await fleet.close()
            await system.stop_all_gateways()
            await system.stop_log_sink()


async def stale_replica(fleet: Fleet, server_ids: list[str]) -> Submitter:
    """The submit path of a balancer replica whose view of the fleet has every one of
    `server_ids` registered and has not heard of any removal (its registry watch lags)."""
    js = fleet.nc.jetstream()
    view = ServerTable()
    for server_id in server_ids:
        view.on_registered(
            ServerRecord(server_id=server_id, name=server_id, address="-", registered_at=now()),
            revision=1,
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
