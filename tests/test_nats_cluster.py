"""Resources on a 3-node JetStream cluster: replicas raised in place, never lowered, reported;
the leases and the REST API ride out the loss of a node (gateway/bus/retry.py).

One cluster of three nats-server processes on loopback for the module
(gateway/bus/natscluster.py, what `comfyautomate nats-cluster` runs): each test that stops a
node starts it again before it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from nats.aio.client import Client

from gateway.bus.connection import BusResources, connect, ensure_resources, resources_for
from gateway.bus.contract import Subjects
from gateway.bus.lease import hold_lease
from gateway.bus.natscluster import NatsCluster, nats_cluster
from gateway.bus.replication import replication_status
from gateway.bus.retry import through_election
from gateway.settings import Settings
from tests.conftest import running_gateway
from tests.helpers import poll_until

pytestmark = pytest.mark.asyncio(loop_scope="module")


TINY = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}},
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsCluster]:
    async with nats_cluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


@pytest_asyncio.fixture(loop_scope="module")
async def cnc(cluster: NatsCluster) -> AsyncIterator[Client]:
    client = await connect(cluster.url, "test")
    try:
        yield client
    finally:
        await client.close()


async def _all_current(client: Client, replicas: int) -> bool:
    status = await replication_status(client.jetstream(), Subjects())
    return all(r.current and r.replicas == replicas for r in status)


async def test_replicas_are_raised_in_place_never_lowered_and_reported(
    cnc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    js = cnc.jetstream()
    subjects = Subjects()
    # As a fleet made before the setting existed: one copy of everything.
    await through_election(lambda: ensure_resources(js, subjects), "creating")
    assert {r.replicas for r in await replication_status(js, subjects)} == {1}
    kv = await js.key_value(subjects.jobs_bucket)
    await kv.put("j1", b"kept")
    sizing = resources_for(cnc, "auto")
    assert sizing.replicas == 3  # three brokers: auto means 3
    with caplog.at_level(logging.WARNING, logger="gateway.bus.connection"):
        await ensure_resources(js, subjects, sizing)
    assert "KV_comfy_jobs has 1 replicas; raising it to 3" in caplog.text
    await poll_until(lambda: _all_current(cnc, 3), "every resource current with 3 copies")
    assert (await kv.get("j1")).value == b"kept"
    status = await replication_status(js, subjects)
    assert all(r.leader and not r.lagging and not r.offline for r in status), status
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.bus.connection"):
        await ensure_resources(js, subjects, BusResources(replicas=1))
    assert "lowering is refused" in caplog.text
    assert {r.replicas for r in await replication_status(js, subjects)} == {3}


async def test_a_lease_rides_out_the_loss_of_its_buckets_leader(
    cluster: NatsCluster, cnc: Client
) -> None:
    js = cnc.jetstream()
    subjects = Subjects()
    await ensure_resources(js, subjects, BusResources(replicas=3))
    kv = await js.key_value(subjects.balancer_bucket)
    leading: asyncio.Queue[str] = asyncio.Queue()

    def work_of(name: str):  # type: ignore[no-untyped-def]
        async def work() -> None:
            await leading.put(name)
            await asyncio.Event().wait()

        return work

    stop = asyncio.Event()
    holders = {
        name: asyncio.create_task(hold_lease(kv, name, work_of(name), stop, renew_every=0.1))
        for name in ("a", "b")
    }
    try:
        async with asyncio.timeout(10):
            await leading.get()
        info = await js.stream_info(f"KV_{subjects.balancer_bucket}")
        assert info.cluster is not None and info.cluster.leader is not None
        lost = cluster.node(info.cluster.leader)
        before = (await kv.get("leader")).revision
        await lost.stop(kill=True)

        async def renewed() -> bool:
            try:
                entry = await kv.get("leader")
            except Exception:  # noqa: BLE001 - the bucket is electing: ask again
                return False
            # Renewals every 0.1 s: at most one or two landed between reading and the kill.
            return entry.revision >= before + 4 and entry.value in (b"a", b"b")

        # After the election the lease is renewed again, and both holders are still there:
        # the standby asked for it all along, the holder renewed it all along.
        await poll_until(renewed, "the lease renewed after the election", within=30)
        ended = {name: task for name, task in holders.items() if task.done()}
        assert not ended, {name: task.exception() for name, task in ended.items()}

        async def reported_away() -> bool:
            status = await replication_status(js, subjects)
            return all(lost.name in r.offline and not r.current for r in status)

        await poll_until(reported_away, f"{lost.name} reported offline everywhere", within=30)
        await lost.start()
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*holders.values(), return_exceptions=True)


async def test_a_submission_without_a_quorum_is_503_with_retry_after(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    stopped = cluster.nodes[1:]
    settings = Settings(
        nats_url=cluster.url, data_dir=str(tmp_path / "data"), port=0, nats_replicas=3
    )
    async with running_gateway(settings) as url, httpx.AsyncClient(base_url=url) as client:
        try:
            # Two of three nodes gone: no stream can elect a leader, no write can be stored.
            for node in stopped:
                await node.stop(kill=True)
            answer = await client.post("/workflow/submit", json={"workflow": TINY}, timeout=30)
            assert answer.status_code == 503, answer.text
            assert answer.json()["code"] == "unavailable"
            assert answer.headers["Retry-After"] == "1"
        finally:
            for node in stopped:
                await node.start()
