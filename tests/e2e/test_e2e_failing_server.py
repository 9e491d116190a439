"""A server that fails every prompt: every try counts, and the server is taken out.

The fake answers POST /prompt with a 500, as ComfyUI does when its handler raises. A job pinned
to it ends `failed` after its tries, each in its log; the server is marked unhealthy with the
reason, and stays so while its health checks pass.
"""

from __future__ import annotations

import asyncio

import httpx
import msgspec

from gateway.bus.connection import connect
from gateway.bus.contract import Heartbeat, Subjects
from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import System, tiny


async def test_a_job_on_a_server_that_refuses_every_prompt_ends_after_its_tries(
    system: System,
) -> None:
    await system.add_server("broken", SimulatorConfig(fail_prompt=True))
    await system.add_server("fine")
    nc = await connect(system.settings.nats_url, "test")
    beats: asyncio.Queue[Heartbeat] = asyncio.Queue()

    async def on_beat(msg: object) -> None:
        beats.put_nowait(msgspec.json.decode(msg.data, type=Heartbeat))  # type: ignore[attr-defined]

    await nc.subscribe(Subjects().heartbeat("broken"), cb=on_beat)
    try:
        async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
            body = {"workflow": tiny(7), "server": "broken", "max_attempts": 3}
            job = (await client.post("/workflow/submit", json=body)).json()
            result = (
                await client.get(f"/workflow/result/{job['job_id']}", params={"wait": 60})
            ).json()
            assert result["status"] == "failed", result
            assert result["error"]["code"] == "attempts_exhausted", result["error"]
            assert "3 tries" in result["error"]["message"]
            events = (await client.get(f"/workflow/logs/{job['job_id']}")).json()["entries"]
            tries = [e for e in events if e["type"] == "retried"]
            assert len(tries) == 3, [e["type"] for e in events]
            assert all("500" in e["data"]["reason"] for e in tries)
            assert all(not e["data"]["started"] and e["data"]["counts"] for e in tries)
            # Another job is not held up: it runs on the other server.
            other = (await client.post("/workflow/execute", json={"workflow": tiny(8)})).json()
            assert (other["status"], other["server_id"]) == ("succeeded", "fine")
            servers = {s["server_id"]: s for s in (await client.get("/servers")).json()}
        assert servers["broken"]["status"] == "unhealthy", servers["broken"]
        assert "in a row" in servers["broken"]["reason"]
        # Its health checks keep passing; its heartbeats keep saying it gets no work.
        async with asyncio.timeout(20):
            while not (beat := await beats.get()).reason or "in a row" not in beat.reason:
                pass
            for _ in range(3):
                beat = await beats.get()
                assert not beat.healthy and "in a row" in (beat.reason or ""), beat
    finally:
        await nc.close()
