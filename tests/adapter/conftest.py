"""Fixtures for the adapter tests: a fake ComfyUI, local storage, an adapter, and `Bus`.

Each process or server a fixture starts is stopped by that fixture, also when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from gateway.bus.contract import Subjects, new_id
from gateway.bus.natsserver import NatsServer
from gateway.settings import Settings
from gateway.storage import Storage
from plugins.comfyui import AdapterOptions, run_adapter
from plugins.simulator import Simulator, SimulatorConfig, run_simulator
from plugins.storage.registry import create_storage
from tests.adapter.kit import FAST, SERVER, Bus


@pytest.fixture
async def bus(nc: Client, js: JetStreamContext, subjects: Subjects) -> Bus:
    kv = await js.key_value(subjects.jobs_bucket)
    helper = Bus(nc, js, kv, subjects)
    await helper.start()
    return helper


@pytest.fixture
def make_sim(tmp_path: Path) -> Callable[..., contextlib.AbstractAsyncContextManager[Simulator]]:
    """`async with make_sim(node_seconds=..., ...) as sim`: a fake ComfyUI under tmp_path."""

    def make(port: int = 0, **config: Any) -> contextlib.AbstractAsyncContextManager[Simulator]:
        base = tmp_path / f"comfy-{new_id()[:8]}"
        return run_simulator(SimulatorConfig(base_dir=str(base), **config), port=port)

    return make


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    backend = create_storage("local", data_dir=tmp_path / "data")
    async with backend:
        yield backend


@pytest.fixture
def adapter_settings(nats_server: NatsServer, tmp_path: Path) -> Settings:
    return Settings(
        nats_url=nats_server.url, data_dir=str(tmp_path / "data"), heartbeat_interval_s=0.5
    )


@pytest.fixture
async def start_adapter(
    nc: Client, js: JetStreamContext, adapter_settings: Settings, storage: Storage
) -> AsyncIterator[Callable[..., Awaitable[asyncio.Event]]]:
    """`stop = await start_adapter(sim.address)`: an in-process adapter, stopped at the end."""
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(
        address: str,
        *,
        server_id: str = SERVER,
        capacity: int = 2,
        options: AdapterOptions = FAST,
        settings: Settings | None = None,
    ) -> asyncio.Event:
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_adapter(
                nc,
                settings or adapter_settings,
                stop,
                server_id=server_id,
                address=address,
                capacity=capacity,
                labels={"zone": "test"},
                storage=storage,
                options=options,
            )
        )
        running.append((stop, task))
        return stop

    try:
        yield start
    finally:
        for stop, _ in running:
            stop.set()
        async with asyncio.timeout(30):
            for _, task in running:
                await task
