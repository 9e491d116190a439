"""Placement by cost: jobs follow the server that holds their model, and say why they went; a
new leader places them by the run times the log index holds."""

from __future__ import annotations

from typing import Any

import httpx

from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import System
from tests.helpers import poll_until

MODELS = {"checkpoints": ["m.ckpt", "n.ckpt"]}


def sd(checkpoint: str, seed: int) -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": 2,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["6", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "p", "images": ["8", 0]}},
    }


async def _run(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    reply = await client.post("/workflow/execute", json={**body, "timeout": 60})
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    assert result["status"] == "succeeded", result
    return result


async def _dispatched(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    entries = (await client.get(f"/workflow/logs/{job_id}")).json()["entries"]
    found: dict[str, Any] = next(e for e in entries if e["type"] == "dispatched")
    return found


async def test_jobs_of_a_model_follow_the_server_holding_it_and_say_why(system: System) -> None:
    # Loading takes far longer than the job: sticking to the holder is right on an idle fleet.
    config = SimulatorConfig(models=MODELS, resident_models=1, load_seconds={"m.ckpt": 0.3})
    await system.add_server("a", config)
    await system.add_server("b", config)
    async with httpx.AsyncClient(base_url=system.url, timeout=90) as client:
        # "a" is first in every tie; the model goes to "b" first, pinned.
        first = await _run(client, {"workflow": sd("m.ckpt", 1), "server": "b"})
        fresh = (await _dispatched(client, first["job_id"]))["data"]["reason"]
        assert fresh["estimate_from"] == "fallback"  # a leader that has seen nothing run
        for seed in range(2, 4):
            result = await _run(client, {"workflow": sd("m.ckpt", seed)})
            assert result["server_id"] == "b"
            dispatched = await _dispatched(client, result["job_id"])
            reason = dispatched["data"]["reason"]
            assert reason["held"] == ["m.ckpt"]
            assert reason["loads"] == [] and reason["load_s"] == 0
            assert reason["next_best"] == "a"
            assert reason["next_best_finish_s"] > reason["finish_s"]
        health = (await client.get("/servers/health")).json()["servers"]
    learnt = {s["server_id"]: s for s in health}
    assert learnt["b"]["resident_models"] == ["m.ckpt"]
    assert learnt["b"]["seconds_per_unit"] is not None and learnt["b"]["shapes_learnt"] == 1
    assert learnt["b"]["load_seconds"]["m.ckpt"] > 0
    assert learnt["a"]["seconds_per_unit"] is None

    # A new leader (its gateway's table starts empty) learns from the log index before it
    # places a job: the shape ran on b already.
    await system.stop_all_gateways()
    system.url = await system.start_gateway()
    async with httpx.AsyncClient(base_url=system.url, timeout=90) as client:
        await poll_until(lambda: _both_known(client), "the new gateway knows both servers")
        result = await _run(client, {"workflow": sd("m.ckpt", 4)})
        reason = (await _dispatched(client, result["job_id"]))["data"]["reason"]
    assert (result["server_id"], reason["estimate_from"]) == ("b", "learnt"), reason


async def _both_known(client: httpx.AsyncClient) -> bool:
    servers = (await client.get("/servers")).json()
    return sum(s["status"] == "healthy" and s["node_types"] > 0 for s in servers) == 2
