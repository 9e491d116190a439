"""A job's own timeout: it ends `failed` (code timeout), its prompt interrupted on ComfyUI,
whatever ComfyUI does next."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.bus.contract import Failed
from gateway.storage import NotFound, Storage
from plugins.simulator import Simulator
from tests.adapter.kit import Bus, tiny

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


def _long_sampler() -> dict[str, Any]:
    """The SD 1.5 example with as many sampler steps as ComfyUI takes: a long run of quick
    steps, each of them a point where ComfyUI honours an interrupt."""
    workflow: dict[str, Any] = json.loads((WORKFLOWS / "text_to_image_sd15.json").read_text())
    workflow["3"]["inputs"]["steps"] = 10_000
    return workflow


def _history(sim: Simulator, prompt_id: str) -> dict[str, Any]:
    entry: dict[str, Any] = sim.engine.history.get(prompt_id)[prompt_id]
    return entry


def _last_message(entry: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    event, data = entry["status"]["messages"][-1]
    return event, data


async def _stored(storage: Storage, key: str) -> bool:
    try:
        await storage.stat(key)
    except NotFound:
        return False
    return True


async def test_a_long_sampler_is_interrupted_at_the_timeout(bus: Bus, make_sim, start_adapter):
    # Steps that take no time of their own: the fake must still answer /interrupt meanwhile,
    # as ComfyUI does while its worker thread samples.
    async with make_sim() as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(_long_sampler(), timeout_s=0.5)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Failed), end
        assert end.data.code == "timeout" and not end.data.retryable, end
        entry = _history(sim, job.prompt_id)
        assert entry["status"]["status_str"] == "error"
        event, data = _last_message(entry)
        assert (event, data["node_id"], data["node_type"]) == (
            "execution_interrupted",
            "3",
            "KSampler",
        )
        assert entry["outputs"] == {}
        assert "history" in bus.types(job.job_id)


async def test_a_prompt_that_finishes_after_its_timeout_fails_without_outputs(
    bus: Bus, make_sim, start_adapter, storage: Storage
):
    # The interrupt reaches ComfyUI while its last node works; a node is never stopped in the
    # middle, so ComfyUI finishes the prompt and saves its file. The job's time was up all
    # the same: it fails, and that file is no output of it.
    async with make_sim(class_seconds={"SaveImage": 3.0}) as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(tiny("late"), timeout_s=0.5)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Failed), end
        assert end.data.code == "timeout" and not end.data.retryable, end
        assert "after" in end.data.message, end.data.message
        entry = _history(sim, job.prompt_id)
        assert entry["status"]["status_str"] == "success"  # ComfyUI did finish it
        saved = entry["outputs"]["3"]["images"][0]["filename"]
        assert not await _stored(storage, f"{job.job_id}/{saved}")
        record = await bus.record(job.job_id)  # the test's balancer applied the end first
        assert record.outputs == []
        assert "history" in bus.types(job.job_id)
