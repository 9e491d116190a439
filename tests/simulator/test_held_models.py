"""The fake's model of what costs time: held models, least recently used out, loads, sampling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from plugins.simulator import SimulatorConfig, run_simulator
from plugins.simulator.costs import load_seconds, sampling_step_seconds
from plugins.simulator.images import Latent
from tests.simulator.test_features import SD, run_prompt

CHECKPOINTS = ["a.safetensors", "b.safetensors", "c.safetensors"]


def sd_with(checkpoint: str, seed: int) -> dict[str, Any]:
    prompt: dict[str, Any] = json.loads(json.dumps(SD))
    prompt["4"]["inputs"]["ckpt_name"] = checkpoint
    prompt["3"]["inputs"]["seed"] = seed  # the sampler runs each time; only the loader may not
    return prompt


def loader_cached(messages: list[dict[str, Any]]) -> bool:
    cached = next(m["data"]["nodes"] for m in messages if m["type"] == "execution_cached")
    return "4" in cached


def config(tmp_path: Path, **kw: Any) -> SimulatorConfig:
    return SimulatorConfig(base_dir=str(tmp_path), models={"checkpoints": CHECKPOINTS}, **kw)


async def test_held_models_serve_their_loaders_from_the_cache_and_the_oldest_leaves(
    tmp_path: Path,
) -> None:
    async with run_simulator(config(tmp_path, resident_models=2)) as sim:
        seen = []
        for seed, name in enumerate("abacba"):
            _, messages = await run_prompt(sim, sd_with(f"{name}.safetensors", seed))
            seen.append(loader_cached(messages))
        # a, b loaded; a held; c loads and b (least recent) leaves; b loads, a leaves; a loads.
        assert seen == [False, False, True, False, False, False]
        assert sim.engine.held.models() == ["a.safetensors", "b.safetensors"]


async def test_without_held_models_only_the_last_prompts_loader_is_cached(tmp_path: Path) -> None:
    async with run_simulator(config(tmp_path)) as sim:
        seen = []
        for seed, name in enumerate("aaba"):
            _, messages = await run_prompt(sim, sd_with(f"{name}.safetensors", seed))
            seen.append(loader_cached(messages))
        assert seen == [False, True, False, False]  # ComfyUI's classic cache


async def test_free_unloads_the_held_models(tmp_path: Path) -> None:
    async with run_simulator(config(tmp_path, resident_models=2)) as sim:
        await run_prompt(sim, sd_with("a.safetensors", 1))
        await run_prompt(sim, sd_with("b.safetensors", 2))
        async with httpx.AsyncClient(base_url=sim.url) as http:
            answer = await http.post("/free", json={"unload_models": True})
        assert answer.status_code == 200
        assert sim.engine.held.models() == []
        _, messages = await run_prompt(sim, sd_with("a.safetensors", 3))
        assert not loader_cached(messages)


def test_a_load_costs_its_files_time_divided_by_speed() -> None:
    cfg = SimulatorConfig(load_seconds={"a.safetensors": 2.0}, default_load_seconds=0.5, speed=2)
    assert load_seconds(cfg, {"inputs": {"ckpt_name": "a.safetensors"}}) == 1.0
    assert load_seconds(cfg, {"inputs": {"ckpt_name": "x.safetensors"}}) == 0.25
    assert load_seconds(cfg, {"inputs": {"image": "x.png"}}) == 0.0


@pytest.mark.parametrize(
    ("width", "height", "batch", "speed", "expected"),
    [
        (64, 64, 1, 1.0, 0.1),
        (128, 64, 1, 1.0, 0.2),
        (128, 128, 2, 1.0, 0.8),
        (64, 64, 1, 4.0, 0.025),
    ],
)
def test_a_sampler_step_scales_with_pixels_batch_and_speed(
    width: int, height: int, batch: int, speed: float, expected: float
) -> None:
    cfg = SimulatorConfig(sample_seconds=0.1, speed=speed)
    latent = Latent(width, height, batch, 0)  # latent pixels: 64 is a 512-pixel image
    assert sampling_step_seconds(cfg, {"steps": 20, "latent_image": latent}) == pytest.approx(
        expected
    )
    assert sampling_step_seconds(cfg, {"latent_image": latent}) == 0.0
    assert sampling_step_seconds(SimulatorConfig(), {"steps": 20, "latent_image": latent}) == 0.0
