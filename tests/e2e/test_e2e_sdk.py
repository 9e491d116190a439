"""Every SDK method against the running system, the sync client and its async twin."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from gateway.bus.contract import Subjects
from gateway.settings import Settings
from plugins.simulator import SimulatorConfig
from sdk import (
    AsyncComfyUISDK,
    ComfyUISDK,
    InvalidWorkflow,
    JobFailed,
    NotFound,
    RateLimited,
    Unschedulable,
)
from tests.e2e.conftest import System, tiny
from tests.e2e.test_e2e_jobs import png_size
from tests.helpers import poll_until

# A submit rate limit that the tests stay under, but for the burst that empties it on purpose.
LIMITED = {"submit_rate_per_s": 3.0, "submit_burst": 20}
LOAD = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "input.png"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "in"}},
}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, **LIMITED)


async def test_the_sync_client(system: System, tmp_path: Path) -> None:
    sim = await system.add_server("gpu1")
    await asyncio.to_thread(_drive_sync, system.url, sim.address, tmp_path)


def _drive_sync(url: str, address: str, tmp_path: Path) -> None:
    # The sync client blocks, so it runs in a thread beside the system's event loop.
    with ComfyUISDK(gateway_url=url, timeout=60) as sdk:
        record = sdk.register_server(name="Second name", address=address, server_id="gpu1")
        assert record.address == address
        assert [s.server_id for s in sdk.list_servers()] == ["gpu1"]
        assert sdk.get_servers_health()[0].status == "healthy"

        result = sdk.execute_workflow(tiny(11))
        assert result["status"] == result.status == "succeeded"
        files = sdk.download_outputs(result, tmp_path / "out")
        assert png_size(files[0].read_bytes()) == (64, 64)

        events: list[dict[str, Any]] = []
        result = sdk.execute_workflow(tiny(12), on_progress=events.append)
        assert events[0]["type"] == "queued" and events[-1]["type"] == "succeeded"

        job_id = sdk.submit_workflow(tiny(13), overrides={"Save.filename_prefix": "sdk"})
        assert sdk.get_status(job_id).job_id == job_id
        done = sdk.wait(job_id, timeout=30)
        assert done.status == "succeeded"
        assert done.outputs[0].filename.startswith("sdk_")
        assert sdk.get_result(job_id).status == "succeeded"
        seqs = [e["seq"] for e in sdk.stream_events(job_id)]
        assert seqs == list(range(1, len(seqs) + 1))

        logs = _logs_when_written(sdk, job_id)
        assert logs["job_id"] == job_id and logs["entry_count"] >= 1
        rows = sdk.query_logs("SELECT count(*) AS n FROM jobs", max_rows=5)["rows"]
        assert rows[0][0] >= 1
        assert any(job["job_id"] == job_id for job in sdk.list_jobs(limit=10))

        png = files[0].read_bytes()
        result = sdk.execute_workflow(LOAD, inputs={"input.png": png})
        assert result.status == "succeeded"

        with pytest.raises(InvalidWorkflow, match="UI format"):
            sdk.submit_workflow({"nodes": [], "links": []})
        with pytest.raises(Unschedulable, match="NoSuchNode"):
            sdk.submit_workflow({"1": {"class_type": "NoSuchNode", "inputs": {}}})
        with pytest.raises(NotFound):
            sdk.get_status("nosuchjob")

        sdk.remove_server("gpu1")
        assert sdk.list_servers() == []


def _logs_when_written(sdk: ComfyUISDK, job_id: str) -> dict[str, Any]:
    # The sink writes a moment after the job ends; this runs in a thread, so it asks in a loop.
    deadline = time.monotonic() + 20
    while True:
        try:
            return sdk.get_logs(job_id)
        except NotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def test_the_async_client(system: System) -> None:
    sim = await system.add_server("gpu1", SimulatorConfig(fail_nodes=["ImageInvert"]))
    async with AsyncComfyUISDK(gateway_url=system.url, timeout=60, retry_for=20) as sdk:
        assert (await sdk.list_servers())[0].address == sim.address
        with pytest.raises(JobFailed) as failure:
            await sdk.execute_workflow(tiny(21))
        assert failure.value.result.error.node_id == "2"
        result = await sdk.execute_workflow(tiny(22), raise_on_failure=False)
        assert result.status == "failed"

        seen: list[str] = []

        async def on_progress(event: dict[str, Any]) -> None:
            seen.append(event["type"])

        await sdk.execute_workflow(tiny(23), on_progress=on_progress, raise_on_failure=False)
        assert seen[-1] == "failed"
        job_id = await sdk.submit_workflow(tiny(24))
        assert (await sdk.wait(job_id, timeout=30)).status == "failed"
        assert [e async for e in sdk.stream_events(job_id)][-1]["type"] == "failed"

        async def logged() -> bool:
            try:
                return bool((await sdk.get_logs(job_id))["entry_count"])
            except NotFound:  # the sink writes a moment after the job ends
                return False

        await poll_until(logged, "the job's log is written")
        assert (await sdk.query_logs("SELECT 1"))["rows"] == [[1]]
        await _a_burst_past_the_rate_limit(system, sdk)


async def test_submitting_on_the_bus(system: System) -> None:
    from gateway.bus.contract import Succeeded, event_type
    from sdk.nats import NatsClient

    await system.add_server("gpu1")
    async with await NatsClient.connect(system.settings.nats_url) as bus:
        accepted = await bus.submit(tiny(41), overrides={"Save.filename_prefix": "bus"})
        kinds = [event_type(e) async for e in bus.events(accepted.job_id)]
        assert kinds[0] == "queued" and kinds[-1] == "succeeded"
        end = await bus.wait(accepted.job_id)
        assert isinstance(end, Succeeded)
        assert end.data.outputs[0].filename.startswith("bus_")
        with pytest.raises(InvalidWorkflow, match="UI format"):
            await bus.submit({"nodes": [], "links": []})
        with pytest.raises(Unschedulable, match="NoSuchNode"):
            await bus.submit({"1": {"class_type": "NoSuchNode", "inputs": {}}})


async def _a_burst_past_the_rate_limit(system: System, sdk: AsyncComfyUISDK) -> None:
    """Submits refused with 429 are sent again after their Retry-After: each makes one job."""
    assert system.nc is not None
    jobs = await system.nc.jetstream().key_value(Subjects().jobs_bucket)
    before = set(await jobs.keys())
    async with httpx.AsyncClient(base_url=system.url) as raw:
        # Every submit takes a token before its body is read: refused bodies empty the bucket
        # without making a job, until the gateway says 429.
        for _ in range(LIMITED["submit_burst"] * 2):
            if (await raw.post("/workflow/submit", json={})).status_code == 429:
                break
        else:
            raise AssertionError("the submit rate limit never answered 429")
    ids = await asyncio.gather(*(sdk.submit_workflow(tiny(60 + i)) for i in range(3)))
    assert set(await jobs.keys()) - before == set(ids) and len(set(ids)) == 3
    await asyncio.to_thread(_gives_up, system.url)


def _gives_up(url: str) -> None:
    # A Retry-After (1 s at least) longer than retry_for allows: refused at once, saying why.
    with (
        ComfyUISDK(gateway_url=url, timeout=60, retry_for=0.5) as sdk,
        pytest.raises(RateLimited) as refused,  # the first submit the bucket cannot take
    ):
        for seed in range(70, 90):
            sdk.submit_workflow(tiny(seed))
    assert refused.value.status == 429 and refused.value.tries == 1
    assert "the gateway asked to wait 1 s, past the 0.5 s that retry_for allows" in str(
        refused.value
    )
