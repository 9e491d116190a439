"""Shared fixtures: a real nats-server per test, on a free port, with JetStream in a temp folder.

Every process a fixture starts is stopped by that fixture, also when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from gateway.app.serve import run_gateway
from gateway.bus.connection import connect, ensure_resources
from gateway.bus.contract import Subjects
from gateway.bus.natsserver import NatsServer, start_nats_server
from gateway.comfyui.tls import tls_context
from gateway.settings import Settings

# httpx reads the whole CA bundle for each client made without a TLS context (60 ms of CPU), and
# the tests make thousands of clients (theirs, and the SDK's they drive), nearly all to plain HTTP
# on loopback. Here they share the product's one context (gateway/comfyui/tls.py) by default:
# the same verification, read once per test process.
for _client in (httpx.Client, httpx.AsyncClient):
    _client.__init__.__kwdefaults__["verify"] = tls_context()


@contextlib.asynccontextmanager
async def own_broker(base: Path) -> AsyncIterator[NatsServer]:
    """A nats-server on a free port, its store and log under `base`; stopped on exit.

    For fixtures that outlive one test (a module's shared system); a test's own is `nats_server`.
    """
    server = await start_nats_server(
        port=0, store_dir=base / "nats", log_file=base / "nats-server.log"
    )
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    async with own_broker(tmp_path) as server:
        yield server


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await connect(nats_server.url, "test")
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def subjects() -> Subjects:
    return Subjects()


@pytest.fixture
async def js(nc: Client, subjects: Subjects) -> JetStreamContext:
    """A JetStream context on a broker where the contract's resources exist."""
    context = nc.jetstream()
    await ensure_resources(context, subjects)
    return context


def settings_on(server: NatsServer, base: Path, **overrides: Any) -> Settings:
    """Settings of a one-machine deployment on `server`, its data under `base`, and `overrides`."""
    # Tests register and remove servers freely (the model test, dozens of times): the limit on
    # registrations is tested with its own settings.
    fields: dict[str, Any] = {"port": 0, "register_burst": 1000, **overrides}
    return Settings(nats_url=server.url, data_dir=str(base / "data"), **fields)


@pytest.fixture
def settings(nats_server: NatsServer, tmp_path: Path) -> Settings:
    """Settings of a one-machine deployment on the test's broker and temp folder."""
    return settings_on(nats_server, tmp_path)


async def start_gateway(
    settings: Settings, stop: asyncio.Event, sock: socket.socket | None = None
) -> tuple[str, asyncio.Task[None]]:
    """Run a gateway (with its balancer) in this event loop; return its URL and task.

    `sock` (bound and listening) is served instead of `settings.host:port`.
    """
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_gateway(settings, settings.nats_url, stop, listening=listening, sock=sock)
    )
    done, _ = await asyncio.wait({task, listening}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what stopped it
    if listening not in done:
        stop.set()
        raise TimeoutError("the gateway did not start listening within 20 s")
    return listening.result(), task


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, sock: socket.socket | None = None
) -> AsyncIterator[str]:
    """A gateway for the block: its base URL; stopped on exit, also when the block fails."""
    stop = asyncio.Event()
    url, task = await start_gateway(settings, stop, sock)
    try:
        yield url
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await task


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[str]:
    """Base URL of a real gateway over real HTTP, on a free port."""
    async with running_gateway(settings) as url:
        yield url
