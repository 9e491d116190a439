"""Images a SaveImageWebsocket node sends over ComfyUI's websocket are outputs of the job:
stored as they come, listed with their node and index, and gone with a run that failed."""

from __future__ import annotations

from typing import Any

from gateway.bus.contract import (
    Failed,
    History,
    NodeImage,
    NodeProgress,
    Succeeded,
    event_type,
)
from gateway.storage import NotFound, Storage
from plugins.simulator import png
from tests.adapter.kit import Bus, tiny


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
