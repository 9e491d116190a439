"""The server registry keeps its word: one ComfyUI is one server, registering again changes
only what changed, and removal is final for the adapter, the heartbeats and pinned jobs."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gateway.bus.connection import connect
from gateway.bus.contract import Heartbeat, Subjects, encode, now
from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import System, tiny
from tests.helpers import poll_until

SLOW = SimulatorConfig(class_seconds={"EmptyImage": 0.6, "ImageInvert": 0.6})


async def _servers(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    return {s["server_id"]: s for s in (await client.get("/servers")).json()}


async def _status(client: httpx.AsyncClient, job_id: str) -> str:
    status: str = (await client.get(f"/workflow/status/{job_id}")).json()["status"]
    return status


async def test_registering_a_server_again_changes_only_what_changed(system: System) -> None:
    sim = await system.add_server("gpu1", SLOW)
    body = {"name": "gpu1", "server_id": "gpu1", "address": sim.address}
    async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
        job = (await client.post("/workflow/submit", json={"workflow": tiny(31)})).json()
        await poll_until(lambda: _is(client, job["job_id"], "running"), "the job running")
        # The seed's quick start, run a second time, while a job runs there.
        again = await client.post("/servers", json=body)
        assert again.status_code == 200, again.text
        relabelled = await client.post("/servers", json={**body, "labels": {"gpu": "a100"}})
        assert relabelled.status_code == 200, relabelled.text
        result = (await client.get(f"/workflow/result/{job['job_id']}", params={"wait": 30})).json()
        assert (result["status"], result["attempts"]) == ("succeeded", 1), result
        log = (await client.get(f"/workflow/logs/{job['job_id']}")).json()
        assert "retried" not in [e["type"] for e in log["entries"]]  # nothing was restarted
        assert (await _servers(client))["gpu1"]["labels"] == {"gpu": "a100"}


async def test_one_comfyui_is_one_server(system: System) -> None:
    sim = await system.add_server("gpu1")
    other = await system.add_server("gpu2")
    async with httpx.AsyncClient(base_url=system.url, timeout=30) as client:
        twin = await client.post(
            "/servers", json={"name": "twin", "server_id": "twin", "address": sim.address}
        )
        assert twin.status_code == 409, twin.text
        assert twin.json()["code"] == "address_registered"
        assert twin.json()["details"]["server_id"] == "gpu1"
        # By name only, it is the server that is there already (the quick start, run again).
        same = await client.post("/servers", json={"name": "My Server", "address": sim.address})
        assert same.status_code == 200, same.text
        assert (same.json()["server_id"], same.json()["name"]) == ("gpu1", "gpu1")
        moved = await client.post(
            "/servers", json={"name": "gpu1", "server_id": "gpu1", "address": other.address}
        )
        assert moved.status_code == 409, moved.text
        assert moved.json()["code"] in ("server_exists", "address_registered")
        # Other spellings of the same address are the same server.
        port = sim.address.rsplit(":", 1)[1]
        for spelling in (f"127.1:{port}", f"2130706433:{port}"):
            alias = await client.post("/servers", json={"name": spelling, "address": spelling})
            assert (alias.status_code, alias.json().get("server_id")) == (200, "gpu1"), alias.text
        # "Any" address is no server's, not even this machine's one.
        anywhere = await client.post("/servers", json={"name": "any", "address": f"0.0.0.0:{port}"})
        assert (anywhere.status_code, anywhere.json()["code"]) == (403, "address_not_allowed")
        odd = await client.post(
            "/servers", json={"name": "odd", "address": f"127.000.000.001:{port}"}
        )
        assert (odd.status_code, odd.json()["code"]) == (400, "invalid_address"), odd.text
        servers = await _servers(client)
        assert servers["gpu1"]["address"] == sim.address and set(servers) == {"gpu1", "gpu2"}


async def test_registrations_at_once_of_one_comfyui_make_one_server(system: System) -> None:
    await system.add_server("gpu1")
    extra = await system.add_server("spare")
    async with httpx.AsyncClient(base_url=system.url, timeout=30) as client:
        assert (await client.delete("/servers/spare")).status_code == 204
        bodies = [{"name": f"same{i}", "address": extra.address} for i in range(6)]
        replies = await asyncio.gather(*(client.post("/servers", json=b) for b in bodies))
        assert sorted(r.status_code for r in replies) == [200] * 5 + [201], [
            r.text for r in replies
        ]
        at_address = [s for s in (await _servers(client)).values() if s["address"] == extra.address]
        assert len(at_address) == 1, at_address


async def test_the_gateway_is_not_taken_for_a_comfyui_server(system: System) -> None:
    await system.add_server("gpu1")
    address = system.url.removeprefix("http://")
    async with httpx.AsyncClient(base_url=system.url, timeout=30) as client:
        reply = await client.post("/servers", json={"name": "me", "address": address})
        assert reply.status_code == 422, reply.text
        assert reply.json()["code"] == "own_gateway"


async def test_a_removed_server_stays_removed_and_its_pinned_jobs_fail(system: System) -> None:
    await system.add_server("gpu1", SLOW, capacity=1)
    await system.add_server("gpu2")
    async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
        pinned = [
            (
                await client.post(
                    "/workflow/submit", json={"workflow": tiny(40 + i), "server": "gpu1"}
                )
            ).json()["job_id"]
            for i in range(4)
        ]
        await poll_until(lambda: _is(client, pinned[0], "running"), "a pinned job running")
        assert (await client.delete("/servers/gpu1")).status_code == 204
        assert (await client.delete("/servers/gpu1")).status_code == 204  # harmless again
        # The running one finishes (its adapter stops gracefully); those waiting fail.
        results = [
            (await client.get(f"/workflow/result/{job_id}", params={"wait": 30})).json()
            for job_id in pinned
        ]
        assert results[0]["status"] == "succeeded", results[0]
        for result in results[1:]:
            assert result["status"] == "failed", result
            assert result["error"]["code"] == "server_removed", result["error"]
        refused = await client.post(
            "/workflow/submit", json={"workflow": tiny(50), "server": "gpu1"}
        )
        assert refused.status_code == 404 and refused.json()["code"] == "unknown_server"
        await poll_until(lambda: _gone(client, "gpu1"), "gpu1 gone from the list")
        # A heartbeat under its id (an adapter nobody stopped, on another box) is ignored:
        # sent before another server's first one, it is handled before that one shows.
        nc = await connect(system.settings.nats_url, "test")
        try:
            subjects = Subjects(system.settings.subject_prefix)
            for server_id in ("gpu1", "later"):
                beat = Heartbeat(server_id=server_id, address="127.0.0.1:1", ts=now(), healthy=True)
                await nc.publish(subjects.heartbeat(server_id), encode(beat))
            await nc.flush()
        finally:
            await nc.close()
        await poll_until(lambda: _listed(client, "later"), "the later heartbeat handled")
        assert "gpu1" not in await _servers(client)
        elsewhere = (await client.post("/workflow/execute", json={"workflow": tiny(51)})).json()
        assert (elsewhere["status"], elsewhere["server_id"]) == ("succeeded", "gpu2")


async def _is(client: httpx.AsyncClient, job_id: str, status: str) -> bool:
    return await _status(client, job_id) == status


async def _gone(client: httpx.AsyncClient, server_id: str) -> bool:
    return server_id not in await _servers(client)


async def _listed(client: httpx.AsyncClient, server_id: str) -> bool:
    return server_id in await _servers(client)
