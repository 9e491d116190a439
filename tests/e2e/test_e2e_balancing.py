"""Where jobs go: speed, pins, labels, missing models, dead servers, replicas, restarts.

One system for the module: each test registers servers of its own and removes them at the end
(a gateway it starts it stops), so the next one's jobs go only to its own servers.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio

from gateway.api.schemas import QueueShare, ServerHealth
from gateway.app.jobview import waiting_reason
from gateway.bus.contract import Error, JobRequest, Subjects, decode, encode
from gateway.settings import Settings
from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import System, running_system, system_of_its_own, tiny
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


FAIR_KEYS = {"ops": "ops-key-1f3a", "heavy": "heavy-key-77c2", "light": "light-key-90d1"}
HEAVY_PENDING = 20  # the heavy key's bound on waiting jobs
HEAVY_CAP = 4  # and on bound ones: the whole fleet (2 servers of capacity 2)


def _key(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {FAIR_KEYS[who]}"}


async def _queued_and_dispatched(
    client: httpx.AsyncClient, started: asyncio.Event, last: asyncio.Future[str]
) -> list[tuple[str, str, str]]:
    """(type, job id, caller) of every queued and dispatched event from now on (`started` is
    set once the stream is open), in the order EVENTS holds them, up to the dispatch of the
    job `last` names."""
    seen = []
    params = {"status": "queued,dispatched"}
    async with asyncio.timeout(30), client.stream("GET", "/events", params=params) as stream:
        started.set()
        async for line in stream.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                seen.append((event["type"], event["job_id"], event["caller"]))
                if event["type"] == "dispatched" and event["job_id"] == await last:
                    return seen
    raise AssertionError("the event stream ended")


async def test_a_flooding_key_neither_delays_another_key_nor_queues_past_its_bound(
    settings: Settings,
) -> None:
    keyed = msgspec.structs.replace(
        settings,
        api_keys=[
            f"admin/ops@plain:{FAIR_KEYS['ops']}",
            f"user/heavy@plain:{FAIR_KEYS['heavy']}",
            f"user/light@plain:{FAIR_KEYS['light']}",
        ],
        max_pending_per_caller=HEAVY_PENDING,
        caller_max_running={"heavy": HEAVY_CAP},
    )
    async with running_system(keyed, headers=_key("ops")) as system:
        heavy = httpx.AsyncClient(base_url=system.url, headers=_key("heavy"), timeout=30)
        light = httpx.AsyncClient(base_url=system.url, headers=_key("light"), timeout=30)
        ops = httpx.AsyncClient(base_url=system.url, headers=_key("ops"), timeout=30)
        async with heavy, light, ops:
            # No server yet: nothing leaves the queue, and every path meets the same bound.
            await _flood_to_the_bound(system, heavy)
            started, light_job = asyncio.Event(), asyncio.get_running_loop().create_future()
            events = asyncio.create_task(_queued_and_dispatched(ops, started, light_job))
            try:
                await started.wait()
                config = SimulatorConfig(node_seconds=0.15)
                await asyncio.gather(*(system.add_server(s, config) for s in ("f1", "f2")))
                # Another key's job, behind the flood.
                reply = await light.post("/workflow/submit", json={"workflow": tiny(4100)})
                assert reply.status_code == 202, reply.text
                light_job.set_result(reply.json()["job_id"])
                await _wait_at_cap(heavy, ops)
                order = await events
            finally:
                events.cancel()
    queued_at = order.index(("queued", light_job.result(), "light"))
    bound_first = [e for e in order[:queued_at] if e[0] == "dispatched" and e[2] == "heavy"]
    # The servers may take a while to register on a busy machine: some of the flood ran first.
    assert HEAVY_PENDING - len(bound_first) >= 5, "too little of the flood waited to tell"
    heavy_before = [e for e in order[queued_at:-1] if e[0] == "dispatched" and e[2] == "heavy"]
    # At most about one job per server, where first come first served would bind every job
    # the flood had waiting.
    assert len(heavy_before) <= 2, order[queued_at:]


async def _flood_to_the_bound(system: System, heavy: httpx.AsyncClient) -> None:
    """The heavy key submits until refused; then each submit path refuses it too."""
    first = {"workflow": tiny(4000)}
    replay = {"Idempotency-Key": "flood-0"}
    reply = await heavy.post("/workflow/submit", json=first, headers=replay)
    assert reply.status_code == 202, reply.text
    for seed in range(4001, 4000 + HEAVY_PENDING):
        reply = await heavy.post("/workflow/submit", json={"workflow": tiny(seed)})
        assert reply.status_code == 202, reply.text
    refused = await heavy.post("/workflow/submit", json={"workflow": tiny(4050)})
    assert refused.status_code == 429, refused.text
    body = refused.json()
    assert body["code"] == "queue_full" and body["details"]["reason"] == "max_pending_per_caller"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    refused = await heavy.post("/workflow/execute", json={"workflow": tiny(4050)})
    assert refused.status_code == 429 and "Retry-After" in refused.headers, refused.text
    # A job sent again is answered, full queue or not.
    again = await heavy.post("/workflow/submit", json=first, headers=replay)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"

    # Sent before the leader's count catches up with the flood, a batch passes the gateway's
    # check and is refused job by job: refused all the same, it leaves nothing behind.
    early = {"batch_id": "early", "workflow": tiny(4050), "overrides": [{"1.color": 1}]}
    refused = await heavy.post("/workflow/batch", json=early)
    assert refused.status_code == 429 and refused.json()["code"] == "queue_full", refused.text
    assert (await heavy.get("/workflow/batch/early")).status_code == 404

    async def counted() -> bool:
        share = (await heavy.get("/workflow/queue")).json()
        return bool(share["callers"][0]["pending"] == HEAVY_PENDING)

    await poll_until(counted, "the leader counting the flood")
    batch = {"batch_id": "over", "workflow": tiny(4051), "overrides": [{"1.color": 1}]}
    refused = await heavy.post("/workflow/batch", json=batch)
    assert refused.status_code == 429 and refused.json()["code"] == "queue_full", refused.text
    assert "Retry-After" in refused.headers
    assert (await heavy.get("/workflow/batch/over")).status_code == 404  # refused whole
    refused = await heavy.post("/prompt", json={"prompt": tiny(4052)})
    assert refused.status_code == 429 and "Retry-After" in refused.headers
    assert refused.json()["error"]["type"] == "queue_full"  # ComfyUI's error shape
    said = msgspec.json.decode(refused.json()["error"]["details"])  # a string, as ComfyUI's
    assert said["reason"] == "max_pending_per_caller", said
    assert system.nc is not None
    request = JobRequest(workflow=tiny(4053), caller="heavy")
    answer = await system.nc.request(
        Subjects(system.settings.subject_prefix).submit, encode(request), timeout=10
    )
    assert decode(answer.data, Error).code == "queue_full"


async def _wait_at_cap(heavy: httpx.AsyncClient, ops: httpx.AsyncClient) -> None:
    """The heavy key's jobs fill its cap; its next ones wait for that reason."""

    async def at_cap() -> bool:
        share = (await heavy.get("/workflow/queue")).json()
        return bool(share["callers"][0]["at_cap"])

    await poll_until(at_cap, "the heavy key at its cap")
    share = msgspec.convert((await heavy.get("/workflow/queue")).json(), QueueShare)
    assert [c.caller for c in share.callers] == ["heavy"]  # its own entry, no other
    reason = waiting_reason(await _servers(ops), share=share.callers[0])
    assert reason.startswith("caller at its cap"), reason


async def _servers(client: httpx.AsyncClient) -> list[ServerHealth]:
    return msgspec.convert((await client.get("/servers")).json(), list[ServerHealth])
