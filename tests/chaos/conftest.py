"""One cluster of processes for the module: its start-up is the costly part of these tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from gateway.bus.contract import Subjects
from tests.chaos.cluster import Cluster, running_cluster
from tests.chaos.stream import Tracker


class Fleet:
    def __init__(self, cluster: Cluster, tracker: Tracker) -> None:
        self.cluster = cluster
        self.tracker = tracker


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    async with running_cluster(tmp_path_factory.mktemp("chaos")) as cluster:
        assert cluster.nc is not None
        tracker = Tracker(cluster.nc, Subjects())
        await tracker.start()
        yield Fleet(cluster, tracker)
