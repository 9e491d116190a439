"""Fixtures of the log sink tests: a data folder, a sink on the test's broker, a publisher."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from gateway.bus.contract import Subjects
from gateway.bus.events import EventPublisher
from gateway.logsink import LogSink
from tests.logsink.jobs import FAST


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def sink(
    nc: Client, js: JetStreamContext, subjects: Subjects, data_dir: Path
) -> AsyncIterator[LogSink]:
    async with LogSink(nc, subjects, data_dir, FAST) as running:
        yield running


@pytest.fixture
def publisher(js: JetStreamContext, subjects: Subjects) -> EventPublisher:
    return EventPublisher(js, subjects)
