"""The models a server holds, as the adapter reads them from its prompts, and its heartbeat.

The recordings of a real ComfyUI are read exactly as the adapter reads a live server's
history: which nodes were served from the cache, and how long the prompt ran.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.bus.contract import event_type
from plugins.comfyui.conclusion import run_seconds
from plugins.comfyui.messages import HistoryEntry
from plugins.comfyui.residency import Residency, cached_nodes, models_used
from plugins.simulator import Simulator
from tests.adapter.kit import SERVER, Bus

RECORDINGS = Path(__file__).resolve().parents[1] / "data" / "comfyui-protocol"


def sd(checkpoint: str, seed: int = 1, lora: str | None = None) -> dict[str, Any]:
    workflow: dict[str, Any] = {
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
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "r", "images": ["8", 0]}},
    }
    if lora is not None:
        workflow["7"] = {
            "class_type": "LoraLoader",
            "inputs": {
                "lora_name": lora,
                "strength_model": 1.0,
                "strength_clip": 1.0,
                "model": ["4", 0],
                "clip": ["4", 1],
            },
        }
    return workflow


def test_loaders_served_from_the_cache_were_held_and_the_others_loaded() -> None:
    held, loaded = models_used(sd("a.ckpt", lora="ink.safetensors"), cached=["4"])
    assert (held, loaded) == (["a.ckpt"], ["ink.safetensors"])


def test_residency_keeps_the_most_recent_first_and_learns_how_many_are_kept() -> None:
    residency = Residency()
    residency.observe(sd("a"), cached=[])
    residency.observe(sd("a"), cached=["4"])  # held right after its own use: tells nothing
    residency.observe(sd("b"), cached=[])
    assert residency.models == ["b", "a"] and residency.slots is None
    residency.observe(sd("c"), cached=[])
    residency.observe(sd("b"), cached=[])  # loaded again after c only: one kept at most
    assert residency.slots == 1
    assert residency.models == ["b"]
    residency.observe(sd("c"), cached=["4"])  # still held with b used since: two at least
    assert residency.slots == 2
    assert residency.models == ["c", "b"]
    residency.observe(sd("a"), cached=["4"])  # a deeper hit than it reported held
    assert residency.slots == 3
    assert residency.models == ["a", "c", "b"]
    residency.forget()
    assert residency.models == []


def _recorded_histories() -> list[tuple[str, str, dict[str, Any], list[str] | None]]:
    """(file, prompt id, its history entry, the nodes its socket was told were cached)."""
    found = []
    for path in sorted(RECORDINGS.glob("*.jsonl")):
        told: dict[str, list[str]] = {}
        entries: dict[str, dict[str, Any]] = {}
        for line in path.read_text().splitlines():
            item = json.loads(line)
            message = item.get("msg")
            if isinstance(message, dict) and message.get("type") == "execution_cached":
                told[message["data"]["prompt_id"]] = message["data"]["nodes"]
            body = item.get("body_json")
            if item.get("kind") == "http" and str(item.get("path", "")).startswith("/history/"):
                entries.update(body or {})
        found += [(path.name, pid, entry, told.get(pid)) for pid, entry in entries.items()]
    return found


def test_the_recordings_have_histories_to_read() -> None:
    histories = _recorded_histories()
    assert len(histories) >= 5
    assert any(told for *_, told in histories), "some prompt was served from the cache"


@pytest.mark.parametrize(
    ("name", "prompt_id", "raw", "told"),
    _recorded_histories(),
    ids=lambda v: v if isinstance(v, str) and v.endswith(".jsonl") else "",
)
def test_a_real_servers_history_tells_what_was_cached_and_how_long_it_ran(
    name: str, prompt_id: str, raw: dict[str, Any], told: list[str] | None
) -> None:
    entry = msgspec.convert(raw, HistoryEntry)
    cached = cached_nodes(entry)
    assert cached is not None, f"{name}: every finished prompt's history says what was cached"
    if told is not None:
        assert cached == told, f"{name}: the history and the socket agree"
    assert set(cached) <= set(entry.workflow)
    residency = Residency()
    residency.observe_history(entry)
    held, loaded = models_used(entry.workflow, cached)
    assert residency.models == [*held, *loaded]  # the recorded server ran no model loaders
    assert entry.status is not None
    if entry.status.status_str == "success":
        seconds = run_seconds(entry)
        assert seconds is not None and 0 <= seconds < 60


async def test_the_heartbeat_says_which_models_the_server_holds(
    bus: Bus,
    make_sim: Callable[..., AbstractAsyncContextManager[Simulator]],
    start_adapter: Callable[..., Awaitable[asyncio.Event]],
) -> None:
    models = {"checkpoints": ["a.ckpt", "b.ckpt", "c.ckpt"]}
    async with make_sim(models=models, resident_models=2) as sim:
        await start_adapter(sim.address)
        for seed, checkpoint in enumerate(["a.ckpt", "b.ckpt", "a.ckpt", "c.ckpt", "b.ckpt"]):
            job = await bus.dispatch(sd(checkpoint, seed))
            end = await bus.wait_event(job.job_id)
            assert event_type(end) == "succeeded", end
        # The residency is read before the end is sent: a heartbeat after it tells all.
        beat = await bus.wait(
            lambda: next(
                (b for _, b in reversed(bus.heartbeats) if b.server_id == SERVER and b.ts > end.ts),
                None,
            ),
            what="a heartbeat after the last job",
        )
    assert beat.resident_models == ["b.ckpt", "c.ckpt"]
    assert beat.model_slots == 2
