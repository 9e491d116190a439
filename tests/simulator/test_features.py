"""Simulator features beyond the recordings: injected faults, SD nodes, configuration."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import websockets

from plugins.simulator import Simulator, SimulatorConfig, load_config, run_simulator

WORKFLOWS = Path(__file__).resolve().parents[1] / "data" / "comfyui-protocol" / "workflows"
TINY = json.loads((WORKFLOWS / "tiny.json").read_text())
SD = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "5": {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": 512, "height": 512, "batch_size": 1},
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
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "sd", "images": ["8", 0]}},
}
DEADLINE = 5.0


async def run_prompt(sim: Simulator, prompt: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Submit with a fresh clientId and collect text messages until the done signal."""
    client_id = f"test-{id(prompt)}"
    async with websockets.connect(f"{sim.ws_url}?clientId={client_id}") as ws:
        async with httpx.AsyncClient(base_url=sim.url) as http:
            response = await http.post("/prompt", json={"prompt": prompt, "client_id": client_id})
        assert response.status_code == 200, response.text
        prompt_id = response.json()["prompt_id"]
        messages = []
        async with asyncio.timeout(DEADLINE):
            async for frame in ws:
                if isinstance(frame, bytes):
                    continue
                message = json.loads(frame)
                messages.append(message)
                data = message["data"]
                if message["type"] == "executing" and data.get("node") is None:
                    break
        return prompt_id, messages


def types(messages: list[dict[str, Any]]) -> list[str]:
    return [m["type"] for m in messages if m["type"] not in ("status", "progress_state")]


async def test_injected_node_failure(tmp_path: Path) -> None:
    config = SimulatorConfig(
        base_dir=str(tmp_path), fail_nodes=["ImageInvert"], fail_exception_message="boom"
    )
    async with run_simulator(config) as sim:
        prompt_id, messages = await run_prompt(sim, TINY)
        error = next(m["data"] for m in messages if m["type"] == "execution_error")
        assert error["node_id"] == "2"
        assert error["exception_type"] == "RuntimeError"
        assert error["exception_message"] == "boom\n"
        assert error["executed"] == ["1"]
        assert "execution_success" not in types(messages)
        async with httpx.AsyncClient(base_url=sim.url) as http:
            job = (await http.get(f"/api/jobs/{prompt_id}")).json()
        assert job["status"] == "failed"


async def test_sd_workflow_reports_steps_and_decodes_to_full_size(sim: Simulator) -> None:
    _, messages = await run_prompt(sim, SD)
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [
        (1, 3, "3"),
        (2, 3, "3"),
        (3, 3, "3"),
    ]
    executed = next(m["data"] for m in messages if m["type"] == "executed")
    name = executed["output"]["images"][0]["filename"]
    assert name == "sd_00001_.png"
    data = (sim.folders.output / name).read_bytes()
    assert data[16:24] == (512).to_bytes(4, "big") * 2


async def test_unknown_model_file_is_a_validation_error(sim: Simulator) -> None:
    prompt = json.loads(json.dumps(SD))
    prompt["4"]["inputs"]["ckpt_name"] = "missing.safetensors"
    async with httpx.AsyncClient(base_url=sim.url) as http:
        response = await http.post("/prompt", json={"prompt": prompt})
    assert response.status_code == 400
    errors = response.json()["node_errors"]["4"]["errors"]
    assert errors[0]["type"] == "value_not_in_list"


async def test_hang_queue_accepts_but_does_not_run(sim: Simulator) -> None:
    sim.set_hang(True)
    async with httpx.AsyncClient(base_url=sim.url) as http:
        response = await http.post("/prompt", json={"prompt": TINY})
        assert response.status_code == 200
        queue = (await http.get("/queue")).json()
        assert len(queue["queue_pending"]) == 1 and queue["queue_running"] == []
    sim.set_hang(False)
    _, messages = await run_prompt(sim, TINY)
    assert "execution_success" in types(messages)


async def test_hang_http_never_answers(sim: Simulator) -> None:
    sim.set_hang_http(True)
    async with httpx.AsyncClient(base_url=sim.url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/system_stats")
    sim.set_hang_http(False)


async def test_crash_cuts_connections_and_closes_the_port(sim: Simulator) -> None:
    async with websockets.connect(f"{sim.ws_url}?clientId=c") as ws:
        await ws.recv()
        sim.crash()
        with pytest.raises(websockets.ConnectionClosedError):
            async with asyncio.timeout(DEADLINE):
                await ws.recv()
        assert ws.close_code == 1006  # no close frame: the peer just vanished
    async with httpx.AsyncClient(base_url=sim.url) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/system_stats")


async def test_crash_on_node(tmp_path: Path) -> None:
    config = SimulatorConfig(base_dir=str(tmp_path), crash_on_node="ImageInvert")
    async with run_simulator(config) as sim:
        with pytest.raises(websockets.ConnectionClosedError):
            await run_prompt(sim, TINY)
        async with asyncio.timeout(DEADLINE):
            await sim.crashed.wait()


async def test_drop_websockets(sim: Simulator) -> None:
    async with websockets.connect(f"{sim.ws_url}?clientId=d") as ws:
        await ws.recv()
        assert sim.drop_websockets() == 1
        with pytest.raises(websockets.ConnectionClosedError):
            async with asyncio.timeout(DEADLINE):
                await ws.recv()


async def test_drop_on_message(tmp_path: Path) -> None:
    config = SimulatorConfig(base_dir=str(tmp_path), drop_ws_on_message="executed")
    async with run_simulator(config) as sim:
        with pytest.raises(websockets.ConnectionClosedError):
            await run_prompt(sim, TINY)
        # The prompt still finished: the history has it.
        async with httpx.AsyncClient(base_url=sim.url) as http:
            history = (await http.get("/history")).json()
        assert len(history) == 1


def test_config_loads_from_json_and_toml(tmp_path: Path) -> None:
    (tmp_path / "sim.json").write_text('{"node_seconds": 0.5, "speed": 2.0}')
    (tmp_path / "sim.toml").write_text("node_seconds = 0.5\n[class_seconds]\nKSampler = 4.0\n")
    assert load_config(tmp_path / "sim.json").seconds_for("EmptyImage") == 0.25
    assert load_config(tmp_path / "sim.toml").seconds_for("KSampler") == 4.0
    (tmp_path / "bad.json").write_text('{"node_secs": 1}')
    with pytest.raises(msgspec.ValidationError):
        load_config(tmp_path / "bad.json")
