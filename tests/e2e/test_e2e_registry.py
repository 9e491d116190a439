"""The server registry keeps its word: one ComfyUI is one server, registering again changes
only what changed, draining takes a server out of service without losing a job, and removal is
final for the adapter, the heartbeats and pinned jobs."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import msgspec

from gateway.api.schemas import ServerHealth
from gateway.app.jobview import waiting_reason
from gateway.bus.connection import connect
from gateway.bus.contract import Heartbeat, Subjects, encode, now
from plugins.simulator import SimulatorConfig
from sdk import AsyncComfyUISDK
from tests.e2e.conftest import System, tiny
from tests.helpers import poll_until

SLOW = SimulatorConfig(class_seconds={"EmptyImage": 0.6, "ImageInvert": 0.6})


async def _servers(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    return {s["server_id"]: s for s in (await client.get("/servers")).json()}


async def _status(client: httpx.AsyncClient, job_id: str) -> str:
    status: str = (await client.get(f"/workflow/status/{job_id}")).json()["status"]
    return status


async def test_changing_a_server_while_it_runs_a_job_loses_nothing_and_draining_it_takes_no_more(
    system: System,
) -> None:
    gpu1, _ = await asyncio.gather(system.add_server("gpu1"), system.add_server("gpu2"))
    body = {"name": "gpu1", "server_id": "gpu1", "address": gpu1.address}
    async with (
        httpx.AsyncClient(base_url=system.url, timeout=60) as client,
        AsyncComfyUISDK(system.url, timeout=60) as sdk,
    ):
        gpu1.hold_setup(True)  # its prompt starts, then waits: the job runs until released
        held = await _submit(client, tiny(60), server="gpu1")
        await poll_until(lambda: _is(client, held, "running"), "the held job running")
        reply = await client.post("/servers/gpu1/drain")
        assert reply.status_code == 200, reply.text
        assert _drain_view(reply.json()) == ("gpu1", True, 1), reply.json()
        again = await sdk.drain_server("gpu1")  # harmless, and the same answer
        assert _drain_view(msgspec.to_builtins(again)) == ("gpu1", True, 1)
        for verb in ("drain", "undrain"):
            unknown = await client.post(f"/servers/nowhere/{verb}")
            assert (unknown.status_code, unknown.json()["code"]) == (404, "unknown_server")
        idle = (await client.post("/servers/gpu2/drain")).json()  # drained at once
        assert _drain_view(idle) == ("gpu2", True, 0), idle
        # The seed's quick start, run a second time, and a new label, while the job runs:
        # each changes only what it says (the server stays draining).
        same = await client.post("/servers", json=body)
        assert same.status_code == 200, same.text
        relabelled = await client.post("/servers", json={**body, "labels": {"gpu": "a100"}})
        assert relabelled.status_code == 200, relabelled.text
        assert relabelled.json()["draining"] is True
        pinned = await _submit(client, tiny(61), server="gpu1")
        free = await _submit(client, tiny(62))
        gpu1.hold_setup(False)
        done = (await client.get(f"/workflow/result/{held}", params={"wait": 30})).json()
        assert (done["status"], done["server_id"], done["attempts"]) == ("succeeded", "gpu1", 1)
        log = (await client.get(f"/workflow/logs/{held}")).json()
        assert "retried" not in [e["type"] for e in log["entries"]]  # nothing was restarted
        drained = await sdk.wait_drained("gpu1", timeout=30)
        assert (drained.draining, drained.jobs_held) == (True, 0)
        assert (await _servers(client))["gpu1"]["labels"] == {"gpu": "a100"}
        # Both healthy and idle, yet neither took a job; both jobs wait, saying why.
        assert [await _status(client, job) for job in (pinned, free)] == ["queued", "queued"]
        fleet = msgspec.convert((await client.get("/servers")).json(), list[ServerHealth])
        assert [s.status for s in fleet] == ["healthy", "healthy"]
        assert waiting_reason(fleet, server="gpu1") == "server gpu1 is draining"
        assert waiting_reason(fleet) == "every healthy server is draining (gpu1, gpu2)"
    await _restart_gateway(system)
    async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
        # The new leader reads the flag from the registry: still draining, the jobs still wait.
        await poll_until(lambda: _draining(client, "gpu1"), "gpu1 draining after the restart")
        metrics = (await client.get("/metrics")).text
        assert 'comfyautomate_server_draining{server="gpu1"} 1.0' in metrics
        assert (await client.post("/servers/gpu2/undrain")).status_code == 200
        elsewhere = (await client.get(f"/workflow/result/{free}", params={"wait": 30})).json()
        assert (elsewhere["status"], elsewhere["server_id"]) == ("succeeded", "gpu2")
        assert await _status(client, pinned) == "queued"
        back = await client.post("/servers/gpu1/undrain")
        assert back.status_code == 200, back.text
        assert _drain_view(back.json()) == ("gpu1", False, None), back.json()
        async with AsyncComfyUISDK(system.url) as sdk:
            back_again = await sdk.undrain_server("gpu1")  # harmless again
        assert _drain_view(msgspec.to_builtins(back_again)) == ("gpu1", False, None)
        ran = (await client.get(f"/workflow/result/{pinned}", params={"wait": 30})).json()
        assert (ran["status"], ran["server_id"], ran["attempts"]) == ("succeeded", "gpu1", 1)


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


def _drain_view(server: dict[str, Any]) -> tuple[str, bool, int | None]:
    return server["server_id"], server["draining"], server["jobs_held"]


async def _submit(client: httpx.AsyncClient, workflow: dict[str, Any], **options: Any) -> str:
    reply = await client.post("/workflow/submit", json={"workflow": workflow, **options})
    assert reply.status_code == 202, reply.text
    job_id: str = reply.json()["job_id"]
    return job_id


async def _draining(client: httpx.AsyncClient, server_id: str) -> bool:
    server = (await _servers(client)).get(server_id)
    return server is not None and bool(server["draining"])


async def _restart_gateway(system: System) -> None:
    """Stop the gateway (its balancer leads) and start another: a leader change."""
    await system.stop_all_gateways()
    system.url = await system.start_gateway()


async def _is(client: httpx.AsyncClient, job_id: str, status: str) -> bool:
    return await _status(client, job_id) == status


async def _gone(client: httpx.AsyncClient, server_id: str) -> bool:
    return server_id not in await _servers(client)


async def _listed(client: httpx.AsyncClient, server_id: str) -> bool:
    return server_id in await _servers(client)
