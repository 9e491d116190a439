"""A job's own timeout: it ends `failed` (code timeout) once ComfyUI has run it that long, its
prompt interrupted there, whatever ComfyUI does next; the wait in ComfyUI's queue is not run
time, and is bounded on its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import msgspec

from gateway.bus.contract import Failed, Retried, Succeeded, new_id, now, prompt_id_for
from gateway.storage import Storage
from plugins.simulator import Simulator
from tests.adapter.kit import FAST, Bus, is_stored, tiny

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


async def test_a_long_sampler_is_interrupted_at_the_timeout(bus: Bus, make_sim, start_adapter):
    # 10,000 steps of 10 ms: the sampler outlasts the timeout however fast the machine is, and
    # the fake must answer /interrupt meanwhile, as ComfyUI does while its worker samples.
    async with make_sim(step_seconds=0.01) as sim:
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
        assert not await is_stored(storage, f"{job.job_id}/{saved}")
        record = await bus.record(job.job_id)  # the test's balancer applied the end first
        assert record.outputs == []
        assert "history" in bus.types(job.job_id)


async def test_the_timeout_counts_from_the_start_not_from_the_wait_in_the_queue(
    bus: Bus, make_sim, start_adapter
):
    async with make_sim(hang_queue=True) as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(tiny("waited"), timeout_s=0.5)
        await bus.wait_pending(sim, job)
        # Heartbeats come every 0.5 s: after four of them the job has waited longer than
        # its timeout, behind a queue that does not move.
        seen = len(bus.heartbeats)
        await bus.wait(lambda: len(bus.heartbeats) >= seen + 4, what="four more heartbeats")
        assert bus.types(job.job_id) == []  # still waiting, not timed out
        sim.set_hang(False)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Succeeded), end


async def test_a_prompt_comfyui_does_not_start_is_taken_back(bus: Bus, make_sim, start_adapter):
    options = msgspec.structs.replace(FAST, start_wait_s=0.5)
    async with make_sim(hang_queue=True) as sim:
        await start_adapter(sim.address, options=options)
        job = await bus.dispatch(tiny("never"), timeout_s=60)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Retried), end
        assert end.data.counts and not end.data.started, end
        assert "did not start" in end.data.reason, end.data.reason
        assert sim.engine.pending() == []  # taken off ComfyUI's queue
        assert sim.engine.history.get(job.prompt_id) == {}


async def test_an_adopted_prompt_keeps_the_time_it_has_run(bus: Bus, make_sim, start_adapter):
    # An adapter died while the prompt ran; the next delivery finds it running on ComfyUI and
    # the record saying since when. Its time counts from then, not from the adoption: two
    # minutes of a one-minute timeout are gone already.
    job_id = new_id()
    prompt_id = prompt_id_for(job_id, 1)
    # Its messages go to a client that is gone: nothing slows the steps down but their time.
    async with make_sim(step_seconds=0.01) as sim:
        async with httpx.AsyncClient(base_url=sim.url) as http:
            body = {"prompt": _long_sampler(), "prompt_id": prompt_id, "client_id": "gone"}
            assert (await http.post("/prompt", json=body)).status_code == 200
        await start_adapter(sim.address)
        job = await bus.dispatch(
            _long_sampler(), job_id=job_id, timeout_s=60, started_at=now() - 120
        )
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Failed) and end.data.code == "timeout", end
        event, data = _last_message(_history(sim, prompt_id))
        assert (event, data["node_type"]) == ("execution_interrupted", "KSampler")
        assert bus.types(job.job_id).count("running") == 0  # announced before the restart
