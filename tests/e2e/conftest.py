"""The whole system in the test's event loop: real NATS, gateway, balancer, log sink, adapters.

Fake ComfyUI servers are the only stand-ins. Servers are registered through the REST API, and
the adapter host starts an adapter for each, as `comfyautomate up` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from nats.aio.client import Client

from gateway.app.adapterhost import AdapterHost
from gateway.app.serve import storage_for
from gateway.bus.connection import session
from gateway.bus.contract import Subjects
from gateway.logsink.sink import run_logsink
from gateway.settings import Settings
from plugins.comfyui import AdapterOptions
from plugins.simulator import Simulator, SimulatorConfig, run_simulator
from plugins.simulator.samples import tiny_workflow
from tests.conftest import own_broker, settings_on, start_gateway
from tests.helpers import poll_until

# The adapters' own timings, but for how long one waits for its next job: a stopping adapter
# lets that wait end first, and every test stops its system.
ADAPTER_OPTIONS = AdapterOptions(fetch_wait_s=0.2)


def tiny(seed: int = 0, prefix: str = "e2e") -> dict[str, Any]:
    """The sample workflow, its outputs named for these tests."""
    return tiny_workflow(seed, prefix)


class System:
    """Handles on a running system: its URL, its simulators, and ways to change it.

    `headers` go with the system's own REST calls: an API key when `settings.api_keys` is set.
    """

    def __init__(
        self, settings: Settings, stack: AsyncExitStack, headers: Mapping[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.headers = dict(headers or {})
        self.url = ""
        self.sims: dict[str, Simulator] = {}
        self._stack = stack
        self._gateways: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
        self._sink: tuple[asyncio.Event, asyncio.Task[None]] | None = None
        self.nc: Client | None = None

    def start_log_sink(self) -> None:
        assert self.nc is not None and self._sink is None
        stop = asyncio.Event()
        self._sink = (stop, asyncio.create_task(run_logsink(self.settings, stop, nc=self.nc)))

    async def stop_log_sink(self) -> None:
        """Stop the log sink gracefully (what it holds is stored first)."""
        if self._sink is not None:
            stop, task = self._sink
            self._sink = None
            stop.set()
            async with asyncio.timeout(60):
                await task

    async def add_server(
        self,
        server_id: str,
        config: SimulatorConfig | None = None,
        **registration: Any,
    ) -> Simulator:
        """Start a fake ComfyUI and register it by REST; wait until it heartbeats healthy."""
        base = Path(self.settings.data_dir) / "sims" / server_id
        config = msgspec.structs.replace(config or SimulatorConfig(), base_dir=str(base))
        sim = await self._stack.enter_async_context(run_simulator(config))
        self.sims[server_id] = sim
        body = {"name": server_id, "address": sim.address, "server_id": server_id, **registration}
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers) as client:
            reply = await client.post("/servers", json=body)
            assert reply.status_code == 201, reply.text
            await poll_until(lambda: _healthy(client, server_id), "server healthy")
        return sim

    async def remove_server(self, server_id: str) -> None:
        """Remove a server by REST (its adapter stops; its fake runs on until the end)."""
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers) as client:
            reply = await client.delete(f"/servers/{server_id}")
            assert reply.status_code == 204, reply.text

    async def revive_server(self, server_id: str) -> Simulator:
        """Start the fake ComfyUI of a server that died again, at its address and folders
        (its queue and history are gone, as a restarted ComfyUI's are)."""
        dead = self.sims[server_id]
        config = msgspec.structs.replace(dead.config, fail_prompt=False)
        sim = await self._stack.enter_async_context(run_simulator(config, port=dead.port))
        self.sims[server_id] = sim
        return sim

    async def start_gateway(self) -> str:
        stop = asyncio.Event()
        url, task = await start_gateway(self.settings, stop)
        self._gateways.append((stop, task))
        return url

    async def stop_gateway(self, index: int) -> None:
        stop, task = self._gateways.pop(index)
        stop.set()
        async with asyncio.timeout(20):
            await task

    async def stop_all_gateways(self) -> None:
        while self._gateways:
            await self.stop_gateway(0)


async def _healthy(client: httpx.AsyncClient, server_id: str) -> bool:
    servers = (await client.get("/servers")).json()
    return any(
        s["server_id"] == server_id and s["status"] == "healthy" and s["node_types"] > 0
        for s in servers
    )


async def sse_events(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    """Every event of a job from GET /workflow/events (the stream ends with the job)."""
    events = []
    async with client.stream("GET", f"/workflow/events/{job_id}") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for line in stream.aiter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))  # noqa: PERF401 - reads clearer
    return events


@pytest.fixture
async def system(settings: Settings) -> AsyncIterator[System]:
    async with running_system(settings) as running:
        yield running


@contextlib.asynccontextmanager
async def system_of_its_own(
    base: Path, headers: Mapping[str, str] | None = None, **overrides: Any
) -> AsyncIterator[System]:
    """A broker of its own under `base` and a running system on it (`settings_on` with
    `overrides`): what a module-scoped fixture shares between tests that need no fresh system.

    Such tests leave the system as they found it (servers they add for themselves are removed,
    jobs they start have ended), so that the next test's checks hold whatever ran before it.
    """
    async with own_broker(base) as broker:
        settings = settings_on(broker, base, **overrides)
        async with running_system(settings, headers) as system:
            yield system


@contextlib.asynccontextmanager
async def running_system(
    settings: Settings, headers: Mapping[str, str] | None = None
) -> AsyncIterator[System]:
    """Log sink, adapter host and a gateway on `settings`' broker, in this event loop.

    `headers` authenticate the system's own REST calls (see System). Every role and fake server
    it started is stopped on exit, also when the block fails.
    """
    subjects = Subjects(settings.subject_prefix)
    stop = asyncio.Event()
    async with AsyncExitStack() as stack:
        nc = await stack.enter_async_context(session(settings.nats_url, "e2e", subjects))
        storage = await stack.enter_async_context(storage_for(settings, nc.jetstream()))
        system = System(settings, stack, headers)
        system.nc = nc
        system.start_log_sink()
        host = AdapterHost(nc, settings, storage, ADAPTER_OPTIONS)
        roles = [asyncio.create_task(host.run(stop))]
        try:
            system.url = await system.start_gateway()
            yield system
        finally:
            await system.stop_all_gateways()
            await system.stop_log_sink()
            stop.set()
            async with asyncio.timeout(30):
                await asyncio.gather(*roles)
