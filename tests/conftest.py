"""Shared fixtures: a real nats-server per test, on a free port, with JetStream in a temp folder.

Every process a fixture starts is stopped by that fixture, also when the test fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from gateway.bus import connect, ensure_resources
from gateway.contract import Subjects
from gateway.natsserver import NatsServer, start_nats_server


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = await start_nats_server(
        port=0, store_dir=tmp_path / "nats", log_file=tmp_path / "nats-server.log"
    )
    try:
        yield server
    finally:
        await server.stop()


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
