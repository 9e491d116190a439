"""Storage fixtures: each backend built on its own ground (tmp_path, a real nats-server).

`storage` is parametrized over every backend, so the shared suite runs once per backend; a new
backend is added to BACKENDS with a fixture `<name>_storage` and is correct when it passes.
The nats backend's tests share one nats-server per module, each with its object stores made
afresh (`js`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import pytest
import pytest_asyncio
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from gateway.bus.connection import ensure_resources
from gateway.bus.contract import Subjects
from gateway.bus.natsserver import NatsServer
from gateway.storage import Storage
from plugins.storage.local import LocalStorage
from plugins.storage.nats import NatsStorage
from tests.conftest import own_broker

BACKENDS = ["local", "nats"]
TINY_BUCKET = "tiny"
BASE_URL = "http://gw.example:8000/"


@pytest_asyncio.fixture(scope="module")
async def storage_broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsServer]:
    async with own_broker(tmp_path_factory.mktemp("storage-nats")) as broker:
        yield broker


@pytest.fixture
def nats_server(storage_broker: NatsServer) -> NatsServer:
    """The module's broker: a nats-server start per test cost more than the test."""
    return storage_broker


@pytest.fixture
async def js(nc: Client, subjects: Subjects) -> JetStreamContext:
    """The contract's resources, the object stores an earlier test filled made empty again."""
    context = nc.jetstream()
    for bucket in (subjects.outputs_bucket, TINY_BUCKET):
        with contextlib.suppress(NotFoundError):
            await context.delete_object_store(bucket)
    await ensure_resources(context, subjects)
    return context


@pytest.fixture
async def local_storage(tmp_path: Path) -> AsyncIterator[LocalStorage]:
    storage = LocalStorage(tmp_path / "outputs", base_url=BASE_URL)
    async with storage:
        yield storage


@pytest.fixture
async def nats_storage(js: JetStreamContext) -> AsyncIterator[NatsStorage]:
    storage = NatsStorage(js, base_url=BASE_URL)
    async with storage:
        yield storage


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest) -> Storage:
    """Every backend in turn; only the chosen backend's own fixtures are set up."""
    backend = request.getfixturevalue(f"{request.param}_storage")
    assert isinstance(backend, Storage)
    return backend


class DiskFullLocalStorage(LocalStorage):
    """LocalStorage whose temporary file is /dev/full, where every write fails with ENOSPC.

    Making a really tiny file system needs root (mount), so the failure is injected at the one
    place a file is created for writing; everything after it (writes, error translation,
    cleanup) is the real code path.
    """

    def _create_temp(self, directory: Path, name: str) -> tuple[Path, BinaryIO]:
        placeholder, _ = super()._create_temp(directory, name)
        _.close()
        # The placeholder is what the storage deletes on failure; /dev/full is never unlinked.
        return placeholder, os.fdopen(os.open("/dev/full", os.O_WRONLY), "wb")


@pytest.fixture
async def local_full_storage(tmp_path: Path) -> AsyncIterator[LocalStorage]:
    async with DiskFullLocalStorage(tmp_path / "outputs") as storage:
        yield storage


@pytest.fixture
async def nats_full_storage(js: JetStreamContext) -> AsyncIterator[NatsStorage]:
    # A bucket capped at 512 KiB: JetStream refuses chunks beyond it (discard new).
    config = api.ObjectStoreConfig(bucket=TINY_BUCKET, max_bytes=512 * 1024)
    await js.create_object_store(TINY_BUCKET, config)
    async with NatsStorage(js, bucket=TINY_BUCKET) as storage:
        yield storage


@pytest.fixture(params=BACKENDS)
def full_storage(request: pytest.FixtureRequest) -> Storage:
    """Every backend in turn, with no room left after a few hundred KiB (or none at all)."""
    backend = request.getfixturevalue(f"{request.param}_full_storage")
    assert isinstance(backend, Storage)
    return backend
