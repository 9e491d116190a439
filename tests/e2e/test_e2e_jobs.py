"""Jobs end to end: REST and NATS, results, images, events in order, logs.

One system for the module, with one server (gpu1) that every job may run on; a test that needs
another kind of server adds its own, pins its jobs to it and removes it at the end.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
import websockets

from gateway.bus.connection import connect
from gateway.bus.contract import JobAccepted, JobRequest, Subjects, decode, encode
from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import System, sse_events, system_of_its_own, tiny
from tests.helpers import poll_until


@pytest_asyncio.fixture(scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    """The module's system, gpu1 registered and healthy."""
    async with system_of_its_own(tmp_path_factory.mktemp("jobs")) as running:
        await running.add_server("gpu1")
        yield running


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, after checking that it is one (signature, IHDR, IDAT)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    zlib.decompress(data[idat + 4 : idat + 4 + length])
    return width, height


async def test_execute_by_rest_returns_images_that_download(shared: System) -> None:
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        reply = await client.post("/workflow/execute", json={"workflow": tiny(1)})
        assert reply.status_code == 200, reply.text
        result = reply.json()
        assert result["status"] == "succeeded"
        assert result["server_id"] == "gpu1"
        assert len(result["images"]) == 1
        assert result["log_file_path"].endswith(f"_{result['job_id']}.jsonl")
        image = await client.get(result["images"][0])
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        assert png_size(image.content) == (64, 64)
        output = result["outputs"][0]
        assert output["size"] == len(image.content)
        assert output["node_id"] == "3"
        assert result["timings"]["run_s"] >= 0


async def test_rest_and_nats_submissions_give_the_same_result(shared: System) -> None:
    nc = await connect(shared.settings.nats_url, "client")
    try:
        reply = await nc.request(
            Subjects().submit, encode(JobRequest(workflow=tiny(2), priority=1)), timeout=10
        )
        by_nats = decode(reply.data, JobAccepted)
    finally:
        await nc.close()
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        by_rest = (await client.post("/workflow/submit", json={"workflow": tiny(3)})).json()
        results = []
        for job_id in (by_nats.job_id, by_rest["job_id"]):
            reply = await client.get(f"/workflow/result/{job_id}", params={"wait": 30})
            results.append(reply.json())
    assert [r["status"] for r in results] == ["succeeded", "succeeded"]
    assert results[0].keys() == results[1].keys()
    assert all(len(r["images"]) == 1 for r in results)


async def test_submit_status_result_and_events_in_order(shared: System) -> None:
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        job = (await client.post("/workflow/submit", json={"workflow": tiny(4)})).json()
        status = (await client.get(f"/workflow/status/{job['job_id']}")).json()
        assert status["status"] in {"queued", "dispatched", "running", "succeeded"}
        events = await sse_events(client, job["job_id"])
        result = (await client.get(f"/workflow/result/{job['job_id']}")).json()
    assert result["status"] == "succeeded"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "succeeded"
    for kind in ("dispatched", "running", "node_started", "node_output", "history"):
        assert kind in kinds, kind
    assert kinds.index("dispatched") < kinds.index("running") < kinds.index("history")
    assert events[0]["data"]["request"]["workflow"] == tiny(4)


async def test_the_job_log_holds_every_event(shared: System) -> None:
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        result = (await client.post("/workflow/execute", json={"workflow": tiny(5)})).json()
        job_id = result["job_id"]
        events = await sse_events(client, job_id)

        async def logged() -> bool:
            reply = await client.get(f"/workflow/logs/{job_id}")
            return reply.status_code == 200 and reply.json()["entry_count"] >= len(events)

        await poll_until(logged, "the sink has every event of the job")
        log = (await client.get(f"/workflow/logs/{job_id}")).json()
        assert log["entry_count"] == len(events)
        assert [e["event_id"] for e in log["entries"]] == [e["event_id"] for e in events]
        assert log["log_file_path"].endswith(f"_{job_id}.jsonl")
        rows = (
            await client.post(
                "/logs/query", json={"sql": f"SELECT status FROM jobs WHERE job_id = '{job_id}'"}
            )
        ).json()["rows"]
        assert rows == [["succeeded"]]


async def test_overrides_by_title_reach_comfyui(shared: System) -> None:
    body = {"workflow": tiny(6), "overrides": {"Save.filename_prefix": "renamed", "1.width": 32}}
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        result = (await client.post("/workflow/execute", json=body)).json()
        assert result["status"] == "succeeded", result
        assert result["outputs"][0]["filename"].startswith("renamed_")
        image = await client.get(result["images"][0])
    assert png_size(image.content) == (32, 64)


async def test_a_failing_node_fails_the_job_with_the_error(shared: System) -> None:
    await shared.add_server(
        "failing", SimulatorConfig(fail_nodes=["ImageInvert"], fail_exception_message="boom")
    )
    body = {"workflow": tiny(7), "server": "failing"}
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        result = (await client.post("/workflow/execute", json=body)).json()
        assert (await client.delete("/servers/failing")).status_code == 204
    assert result["status"] == "failed"
    error = result["error"]
    assert error["node_id"] == "2"
    assert "boom" in error["message"]
    assert error["traceback"]


async def test_events_also_come_over_a_websocket(shared: System) -> None:

    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        job = (await client.post("/workflow/submit", json={"workflow": tiny(8)})).json()
    ws_url = shared.url.replace("http://", "ws://") + f"/workflow/events/{job['job_id']}/ws"
    async with websockets.connect(ws_url) as socket:
        events = [json.loads(frame) async for frame in socket]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "succeeded"


async def test_health_is_ok_once_the_system_can_take_run_and_log_a_job(shared: System) -> None:
    async with httpx.AsyncClient(base_url=shared.url, timeout=30) as client:
        # The leader takes the lease a moment after it starts: wait for the report to say so.
        await poll_until(
            lambda: _status_is(client, 200), "/health ok with every role running", within=20
        )
        report = (await client.get("/health")).json()
    assert report["missing"] == [] and report["balancer"] and report["log_sink"]


async def _status_is(client: httpx.AsyncClient, status: int) -> bool:
    return (await client.get("/health")).status_code == status


async def test_an_override_of_an_input_the_node_lacks_is_refused_with_the_closest(
    shared: System,
) -> None:
    async with httpx.AsyncClient(base_url=shared.url, timeout=30) as client:
        body = {"workflow": tiny(61), "overrides": {"Save.filenme_prefix": "x"}}
        reply = await client.post("/workflow/submit", json=body)
        assert reply.status_code == 422, reply.text
        assert reply.json()["code"] == "invalid_override"
        assert "did you mean 'filename_prefix'?" in reply.json()["message"]
        wrong = {"workflow": tiny(62), "overrides": {"1.width": "wide"}}
        assert (await client.post("/workflow/execute", json=wrong)).status_code == 422


async def test_a_prompt_in_comfyuis_history_is_in_the_log_index_too(shared: System) -> None:
    async with httpx.AsyncClient(base_url=shared.url, timeout=30) as client:
        reply = await client.post("/prompt", json={"prompt": tiny(71), "client_id": "ryw"})
        prompt_id = reply.json()["prompt_id"]

        async def in_history() -> bool:
            return bool((await client.get(f"/history/{prompt_id}")).json())

        await poll_until(in_history, "the prompt in /history")
        sql = f"SELECT status FROM jobs WHERE job_id = '{prompt_id}'"
        rows = (await client.post("/logs/query", json={"sql": sql})).json()["rows"]
        assert rows == [["succeeded"]]
