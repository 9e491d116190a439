"""Where jobs go: speed, pins, labels, missing models, dead servers, replicas, restarts.

One system for the module: each test registers servers of its own and removes them at the end
(a gateway it starts it stops), so the next one's jobs go only to its own servers.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import System, system_of_its_own, tiny
from tests.helpers import poll_until

NODE_SECONDS = 0.1  # three nodes: 0.3 s a job on a 1x server


@pytest_asyncio.fixture(scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with system_of_its_own(tmp_path_factory.mktemp("balancing")) as running:
        yield running


async def _remove(system: System, *server_ids: str) -> None:
    for server_id in server_ids:
        await system.remove_server(server_id)


async def _submit_all(client: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> list[str]:
    replies = await asyncio.gather(*(client.post("/workflow/submit", json=b) for b in bodies))
    for reply in replies:
        assert reply.status_code == 202, reply.text
    return [r.json()["job_id"] for r in replies]


async def _results(client: httpx.AsyncClient, job_ids: list[str]) -> list[dict[str, Any]]:
    replies = await asyncio.gather(
        *(client.get(f"/workflow/result/{j}", params={"wait": 60}) for j in job_ids)
    )
    return [r.json() for r in replies]


async def test_faster_servers_run_more_jobs(shared: System) -> None:
    # How close the makespan comes to the ideal is a matter of speed, measured in
    # bench/balance.py; here only the shape: work follows speed.
    for server_id, speed in (("x1", 1.0), ("x2", 2.0), ("x4", 4.0)):
        await shared.add_server(server_id, SimulatorConfig(node_seconds=NODE_SECONDS, speed=speed))
    jobs = 70
    async with httpx.AsyncClient(base_url=shared.url, timeout=90) as client:
        ids = await _submit_all(client, [{"workflow": tiny(1000 + i)} for i in range(jobs)])
        results = await _results(client, ids)
    await _remove(shared, "x1", "x2", "x4")
    assert all(r["status"] == "succeeded" for r in results)
    per_server = Counter(r["server_id"] for r in results)
    assert per_server["x4"] > per_server["x2"] > per_server["x1"] > 0, per_server


async def test_pinned_and_labelled_jobs_go_only_where_allowed(shared: System) -> None:
    await shared.add_server("a", labels={"tier": "gold"})
    await shared.add_server("b", labels={"tier": "lead"})
    bodies = [{"workflow": tiny(2000 + i), "server": "b"} for i in range(4)]
    bodies += [{"workflow": tiny(3000 + i), "labels": {"tier": "gold"}} for i in range(4)]
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        results = await _results(client, await _submit_all(client, bodies))
    await _remove(shared, "a", "b")
    assert [r["server_id"] for r in results] == ["b"] * 4 + ["a"] * 4


async def test_a_job_needing_a_missing_model_fails_at_once_naming_it(shared: System) -> None:
    await shared.add_server("models")
    workflow = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nowhere.ckpt"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}},
    }
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        reply = await client.post("/workflow/submit", json={"workflow": workflow})
    await _remove(shared, "models")
    assert reply.status_code == 422
    assert reply.json()["code"] == "unschedulable"
    assert "nowhere.ckpt" in reply.json()["message"]


async def test_all_jobs_succeed_when_a_server_dies_mid_load(shared: System) -> None:
    config = SimulatorConfig(node_seconds=NODE_SECONDS)
    doomed = await shared.add_server("doomed", config)
    await shared.add_server("steady", config)
    async with httpx.AsyncClient(base_url=shared.url, timeout=90) as client:
        ids = await _submit_all(client, [{"workflow": tiny(4000 + i)} for i in range(20)])
        await poll_until(lambda: _running_on(client, ids, "doomed"), "a job runs on doomed")
        doomed.crash()
        results = await _results(client, ids)
    await _remove(shared, "doomed", "steady")
    assert [r["status"] for r in results] == ["succeeded"] * 20, results
    assert any(r["attempts"] > 1 for r in results)


async def _running_on(client: httpx.AsyncClient, ids: list[str], server: str) -> bool:
    for job_id in ids:
        status = (await client.get(f"/workflow/status/{job_id}")).json()
        if status["server_id"] == server and status["status"] == "running":
            return True
    return False


async def test_two_gateways_dispatch_every_job_exactly_once(shared: System) -> None:
    second = await shared.start_gateway()
    sims = [
        await shared.add_server(server_id, SimulatorConfig(node_seconds=0.01))
        for server_id in ("one", "two")
    ]
    async with (
        httpx.AsyncClient(base_url=shared.url, timeout=60) as one,
        httpx.AsyncClient(base_url=second, timeout=60) as two,
    ):
        ids = await _submit_all(one, [{"workflow": tiny(5000 + i)} for i in range(15)])
        ids += await _submit_all(two, [{"workflow": tiny(6000 + i)} for i in range(15)])
        results = await _results(two, ids)
        histories = [(await one.get(f"{sim.url}/history")).json() for sim in sims]
    await shared.stop_gateway(1)
    await _remove(shared, "one", "two")
    assert all(r["status"] == "succeeded" for r in results)
    assert all(r["attempts"] == 1 for r in results), [r["attempts"] for r in results]
    assert sum(len(history) for history in histories) == 30


async def test_pending_jobs_survive_a_gateway_restart(shared: System) -> None:
    sim = await shared.add_server("pending", SimulatorConfig(node_seconds=NODE_SECONDS))
    sim.set_hang(True)  # ComfyUI accepts but runs nothing, so jobs pile up pending
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        ids = await _submit_all(client, [{"workflow": tiny(7000 + i)} for i in range(6)])
    await shared.stop_all_gateways()
    sim.set_hang(False)
    shared.url = await shared.start_gateway()
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        results = await _results(client, ids)
    await _remove(shared, "pending")
    assert [r["status"] for r in results] == ["succeeded"] * 6
