"""Images a SaveImageWebsocket node sends over ComfyUI's websocket are outputs of the job:
stored as they come, listed with their node and index, and gone with a run that failed."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from gateway.api.native.frames import split_frame
from gateway.bus.contract import (
    Failed,
    History,
    NodeImage,
    NodeProgress,
    Retried,
    Subjects,
    Succeeded,
    event_type,
)
from gateway.storage import NotFound, Storage
from plugins.simulator import png
from tests.adapter.kit import Bus, tiny

SAMPLING = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "5": {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1},
    },
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 5,
            "steps": 3,
            "cfg": 7.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["8", 0]}},
}


def _websocket_saving(batch: int) -> dict[str, Any]:
    workflow = tiny()
    workflow["1"]["inputs"]["batch_size"] = batch
    workflow["4"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["2", 0]}}
    return workflow


async def _read(storage: Storage, key: str) -> bytes:
    return b"".join([chunk async for chunk in storage.open(key)])


async def test_websocket_images_are_stored_and_listed(
    bus: Bus, make_sim, start_adapter, storage: Storage
):
    async with make_sim() as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(_websocket_saving(batch=3))
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Succeeded), end
    sent = [o for o in end.data.outputs if o.source == "websocket"]
    assert [(o.node_id, o.index) for o in sent] == [("4", 0), ("4", 1), ("4", 2)]
    assert len({o.key for o in sent}) == 3
    for output in sent:
        assert output.key.startswith(f"{job.job_id}/")
        assert output.content_type == "image/png"
        assert output.url == storage.url(output.key)
        data = await _read(storage, output.key)
        assert output.size == len(data)
        info = png.read_info(data)
        assert (info.width, info.height) == (64, 64)
    files = [o for o in end.data.outputs if o.source == "file"]
    assert [(o.node_id, o.index) for o in files] == [("3", 0), ("3", 1), ("3", 2)]

    # Each image is an event of its own, in its place among the node's steps: ComfyUI sends
    # a client with preview metadata (as the adapter is) the image before its step's progress.
    steps = [
        (e.data.node_id, e.data.index if isinstance(e, NodeImage) else e.data.value, event_type(e))
        for e in bus.events[job.job_id]
        if isinstance(e, NodeImage | NodeProgress)
    ]
    expected = []
    for index in range(3):
        expected += [("4", index, "node_image"), ("4", index, "node_progress")]
    assert steps == expected
    images = [e.data.output for e in bus.events[job.job_id] if isinstance(e, NodeImage)]
    assert images == sent
    # ComfyUI's own history lists no file of them.
    history = next(e for e in bus.events[job.job_id] if isinstance(e, History))
    assert set(history.data.history["outputs"]) == {"3"}


async def test_websocket_images_of_a_failed_run_are_deleted(
    bus: Bus, make_sim, start_adapter, storage: Storage
):
    workflow = _websocket_saving(batch=2)
    # Runs after the SaveImageWebsocket node ("4" < "5" among output nodes), and fails.
    workflow["5"] = {
        "class_type": "ImageBlur",
        "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0},
    }
    workflow["6"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["5", 0], "filename_prefix": "late"},
    }
    async with make_sim(fail_nodes=["5"]) as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(workflow)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Failed), end
    images = [e.data.output for e in bus.events[job.job_id] if isinstance(e, NodeImage)]
    assert len(images) == 2  # stored while the run went on
    for output in images:
        try:
            await storage.stat(output.key)
        except NotFound:
            continue
        raise AssertionError(f"{output.key} outlived its failed run")


async def test_latent_previews_stay_previews(
    bus: Bus, make_sim, start_adapter, nc: Client, subjects: Subjects
):
    """The sampler's previews come as the same binary frames as SaveImageWebsocket's images:
    only those sent while SaveImageWebsocket executes are outputs; the rest go to the
    gateways as previews, as before."""
    previews: list[str] = []
    all_previews = asyncio.Event()

    async def on_preview(msg: Msg) -> None:
        parts = split_frame(msg.data)
        if parts is not None and parts[0] == 4:
            previews.append(parts[1]["node_id"])
            if len(previews) == 3:
                all_previews.set()

    sub = await nc.subscribe(subjects.all_previews, cb=on_preview)
    try:
        async with make_sim(sampler_previews=True) as sim:
            await start_adapter(sim.address)
            job = await bus.dispatch(SAMPLING)
            end = await bus.wait_event(job.job_id)
            assert isinstance(end, Succeeded), end
            await asyncio.wait_for(all_previews.wait(), 10)
    finally:
        await sub.unsubscribe()
    assert [(o.node_id, o.index, o.source) for o in end.data.outputs] == [("9", 0, "websocket")]
    assert previews == ["3", "3", "3"]  # the sampler's, and not the saved image


async def test_a_run_whose_images_went_unheard_is_handed_back(bus: Bus, make_sim, start_adapter):
    """The socket is cut while SaveImageWebsocket sends: ComfyUI keeps no copy of those images,
    so the run succeeded without them; only another run makes them again."""
    async with make_sim(drop_ws_on_message="progress") as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(_websocket_saving(batch=3))
        end = await bus.wait_event(job.job_id)
    assert isinstance(end, Retried), end
    assert "websocket" in end.data.reason and end.data.counts
