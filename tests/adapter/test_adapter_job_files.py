"""A job's input files belong to its attempt: uploaded under a folder of its own, cleared when
it ends however it ends, and never found by another job naming the same file."""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from gateway.bus.contract import (
    Cancelled,
    Failed,
    History,
    JobInput,
    Retried,
    Succeeded,
)
from gateway.bus.natsserver import NatsServer
from gateway.storage import Storage
from plugins.comfyui.inputs import upload_name
from plugins.simulator import Simulator, png
from plugins.simulator.asgi import empty
from tests.adapter.kit import FAST, Bus, adapter_process
from tests.adapter.test_adapter_process import _healthy_from
from tests.helpers import poll_until

RED = (200, 10, 10)
BLUE = (10, 10, 200)


def load(name: str = "input.png") -> dict[str, Any]:
    """LoadImage(name) → SaveImage: the output has the colour of the file loaded."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "in"}},
    }


def image(rgb: tuple[int, int, int]) -> bytes:
    return png.encode_solid(8, 8, rgb)


def sent(data: bytes, name: str = "input.png") -> JobInput:
    return JobInput(name=name, source="base64", value=base64.b64encode(data).decode())


async def _colour(storage: Storage, end: Succeeded) -> tuple[int, ...]:
    data = b"".join([chunk async for chunk in storage.open(end.data.outputs[0].key)])
    return png.read_info(data).first_pixel[:3]


def _holding(folder: Path, data: bytes) -> list[Path]:
    """Files under `folder` (subfolders included) whose content is `data`."""
    return [p for p in folder.rglob("*") if p.is_file() and p.read_bytes() == data]


def _ran(bus: Bus, job_id: str) -> dict[str, Any]:
    """The workflow ComfyUI ran for the job, from the job's history event."""
    history = next(e for e in bus.events[job_id] if isinstance(e, History))
    workflow: dict[str, Any] = history.data.history["prompt"][2]
    return workflow


async def test_jobs_sending_input_png_each_load_their_own_under_their_own_name(
    bus: Bus, make_sim, start_adapter, storage: Storage
):
    async with make_sim() as sim:
        await start_adapter(sim.address)
        red = await bus.dispatch(load(), inputs=[sent(image(RED))])
        blue = await bus.dispatch(load(), inputs=[sent(image(BLUE))])
        for job, rgb in ((red, RED), (blue, BLUE)):
            end = await bus.wait_event(job.job_id)
            assert isinstance(end, Succeeded), end
            assert await _colour(storage, end) == rgb
            name = _ran(bus, job.job_id)["1"]["inputs"]["image"]
            assert name == f"comfyautomate-jobs/{job.job_id}-1/input.png"
        assert not (sim.folders.input / "input.png").exists()


async def test_a_job_naming_a_file_it_did_not_send_never_gets_an_earlier_jobs(
    bus: Bus, make_sim, start_adapter, storage: Storage
):
    async with make_sim() as sim:
        await start_adapter(sim.address)
        first = await bus.dispatch(load(), inputs=[sent(image(RED))])
        assert isinstance(await bus.wait_event(first.job_id), Succeeded)
        later = await bus.dispatch(load())
        end = await bus.wait_event(later.job_id)
        assert isinstance(end, Failed), end
        assert end.data.code == "validation_error"
        assert "Invalid image file: input.png" in end.data.message
        # A file the server has of its own stays usable by name, as on one ComfyUI.
        (sim.folders.input / "own.png").write_bytes(image(BLUE))
        own = await bus.dispatch(load("own.png"))
        end = await bus.wait_event(own.job_id)
        assert isinstance(end, Succeeded), end
        assert await _colour(storage, end) == BLUE


def _ending(sim_config: dict[str, Any], end_type: type) -> Any:
    return pytest.param(sim_config, end_type, id=end_type.__name__.lower())


@pytest.mark.parametrize(
    ("config", "end_type"),
    [
        _ending({}, Succeeded),
        _ending({"fail_nodes": ["SaveImage"]}, Failed),
        _ending(
            {"fail_nodes": ["SaveImage"], "fail_exception_type": "torch.OutOfMemoryError"},
            Retried,
        ),
        _ending({"hang_queue": True}, Cancelled),
    ],
)
async def test_the_files_are_emptied_when_the_attempt_ends_however_it_ends(
    bus: Bus, make_sim, start_adapter, config: dict[str, Any], end_type: type
):
    data = image(RED)
    async with make_sim(**config) as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(load(), inputs=[sent(data)])
        if end_type is Cancelled:
            await bus.wait_pending(sim, job)
            assert (await bus.cancel(job.job_id)).ok
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, end_type), end
        # Told the end, nothing on the server holds the file's content any more; what is left
        # is an empty file under the attempt's own name.
        assert _holding(sim.folders.input, data) == []
        left = sim.folders.input / "comfyautomate-jobs" / f"{job.job_id}-1" / "input.png"
        assert left.read_bytes() == b""


async def test_inputs_uploaded_under_one_name_are_each_loaded_and_emptied(
    bus: Bus, make_sim, start_adapter, storage: Storage
):
    workflow = load("a/input.png")
    workflow["3"] = {"class_type": "LoadImage", "inputs": {"image": "b/input.png"}}
    workflow["4"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["3", 0], "filename_prefix": "b"},
    }
    red, blue = image(RED), image(BLUE)
    async with make_sim() as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(
            workflow, inputs=[sent(red, "a/input.png"), sent(blue, "b/input.png")]
        )
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Succeeded), end
        by_node = {o.node_id: o for o in end.data.outputs}
        for node_id, rgb in (("2", RED), ("4", BLUE)):
            data = b"".join([c async for c in storage.open(by_node[node_id].key)])
            assert png.read_info(data).first_pixel[:3] == rgb
        folder = sim.folders.input / "comfyautomate-jobs" / f"{job.job_id}-1"
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == {
            "input.png": b"",
            "input (1).png": b"",
        }


async def test_with_comfyuis_input_folder_at_hand_the_files_are_deleted(
    bus: Bus, make_sim, start_adapter
):
    async with make_sim() as sim:
        options = msgspec.structs.replace(FAST, comfyui_input_dir=str(sim.folders.input))
        await start_adapter(sim.address, options=options)
        job = await bus.dispatch(load(), inputs=[sent(image(RED)), sent(image(BLUE), "b.png")])
        assert isinstance(await bus.wait_event(job.job_id), Succeeded)
        assert not (sim.folders.input / "comfyautomate-jobs" / f"{job.job_id}-1").exists()
        assert sorted(p.name for p in sim.folders.input.iterdir()) == ["comfyautomate-jobs"]


async def test_files_that_cannot_be_cleared_are_logged_with_the_job(
    bus: Bus, make_sim, start_adapter, caplog: pytest.LogCaptureFixture
):
    async with make_sim() as sim:
        routes = sim.app._routes
        upload = routes[("POST", "/upload/image")]

        async def refuse_overwrites(request, param):
            # The first upload of each file goes through; emptying it (overwrite) fails.
            if b'name="overwrite"' in request.body:
                return empty(500)
            return await upload(request, param)

        routes[("POST", "/upload/image")] = refuse_overwrites
        await start_adapter(sim.address)
        with caplog.at_level(logging.WARNING, logger="plugins.comfyui"):
            job = await bus.dispatch(load(), inputs=[sent(image(RED))])
            assert isinstance(await bus.wait_event(job.job_id), Succeeded)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        folder = f"comfyautomate-jobs/{job.job_id}-1"
        assert any(job.job_id in m and f"{folder}/input.png not cleared" in m for m in warnings)


async def test_a_folder_annotation_is_not_part_of_the_uploaded_name(
    bus: Bus, make_sim, start_adapter, storage: Storage
):
    assert upload_name("sub/x.png [input]") == "x.png"
    assert upload_name("x.png [output]") == "x.png"
    async with make_sim() as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(load("x.png [input]"), inputs=[sent(image(RED), "x.png [input]")])
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Succeeded), end
        assert await _colour(storage, end) == RED


@pytest.mark.parametrize("found", ["running", "done"])
async def test_an_adapter_that_adopts_a_job_clears_its_files(
    bus: Bus, make_sim, nats_server: NatsServer, tmp_path: Path, found: str
):
    data = image(RED)
    log = tmp_path / "adapter.log"
    loop = asyncio.get_running_loop()
    async with make_sim() as sim:
        sim.hold_setup()  # the prompt starts, then waits: it is running when the adapter dies
        looked_up = _history_requests(sim)
        with adapter_process(sim.address, nats_server.url, tmp_path / "data", log) as first:
            started = loop.time()
            await bus.wait(lambda: _healthy_from(bus, started), 20, "the adapter's heartbeat")
            job = await bus.dispatch(load(), inputs=[sent(data)])
            await bus.wait_event(job.job_id, "running")
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
        if found == "done":
            sim.hold_setup(False)
            await poll_until(lambda: _ended_on(sim, job.prompt_id), "the prompt's end")
        with adapter_process(sim.address, nats_server.url, tmp_path / "data", log) as second:
            if found == "running":
                # The second look at the prompt is the adopting adapter's first poll.
                await bus.wait(lambda: looked_up.count(job.prompt_id) >= 2, 30, "its adoption")
                sim.hold_setup(False)
            end = await bus.wait_event(job.job_id, within=30)
            assert isinstance(end, Succeeded), (end, log.read_text()[-3000:])
            assert f"already on ComfyUI ({found})" in log.read_text()
            assert _holding(sim.folders.input, data) == []
            second.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(second.wait, 15) == 0


def _history_requests(sim: Simulator) -> list[str]:
    """The prompt ids of GET /history/{id} requests to the fake, as they come."""
    seen: list[str] = []
    original = sim.app._routes[("GET", "/history/")]

    async def recording(request: Any, param: str) -> Any:
        seen.append(param)
        return await original(request, param)

    sim.app._routes[("GET", "/history/")] = recording
    return seen


async def _ended_on(sim: Simulator, prompt_id: str) -> bool:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        return prompt_id in (await http.get(f"/history/{prompt_id}")).json()
