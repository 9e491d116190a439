"""What costs time on a GPU server, as the fake models it: model loads, held models, sampling.

How ComfyUI behaves (comfy_execution/caching.py, execution.py, comfy/model_management.py):
- A loader node (CheckpointLoaderSimple, LoraLoader, UNETLoader, VAELoader, ...) is a node like
  any other: its output is cached under the signature of its inputs (the file name, and for a
  LoRA also its upstream model's signature). A prompt whose loader has that signature cached
  lists it in `execution_cached` and does not load anything; otherwise the loader runs and
  reads the file.
- The classic cache keeps only the outputs of the most recent prompt, so a server holds the
  models of its last prompt; with an LRU or RAM-pressure cache it keeps more, as long as they fit.
  Of those, `load_models_gpu` keeps the most recently used in VRAM and `free_memory` unloads
  the least recently used when a new one needs room.

The fake folds both into one bound: `resident_models` model files stay held, least recently
used out first; a loader whose output is held is served from the cache like any other cached
node (listed in `execution_cached`), and one that runs costs the load time of its files.
Sampling (KSampler and any node with a `steps` input and a latent) costs `sample_seconds` per
step of a 512 x 512 image, times the pixels and batch of its latent. Every time is divided by
the server's `speed`. With the defaults (no load times, no held models, no sampling cost) the
fake runs as before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from gateway.comfyui.shape import node_models

from .config import SimulatorConfig
from .images import Latent

_UNIT_PIXELS = 512 * 512


def load_seconds(config: SimulatorConfig, node: Mapping[str, Any]) -> float:
    """How long a loader node takes to load its files (0 for a node that loads nothing)."""
    models = node_models(node)
    if not models:
        return 0.0
    base = sum(config.load_seconds.get(m, config.default_load_seconds) for m in models)
    return base / config.speed if config.speed > 0 else base


def sampling_step_seconds(config: SimulatorConfig, inputs: Mapping[str, Any]) -> float:
    """How long one sampler step takes on this latent, beyond `step_seconds`."""
    latent = inputs.get("latent_image")
    if config.sample_seconds <= 0 or "steps" not in inputs or not isinstance(latent, Latent):
        return 0.0
    pixels = latent.width * 8 * latent.height * 8 * max(1, latent.batch)
    base = config.sample_seconds * pixels / _UNIT_PIXELS
    return base / config.speed if config.speed > 0 else base


class HeldModels:
    """The loaders whose outputs the server keeps across prompts, least recently used first."""

    def __init__(self, capacity: int, on_evict: Callable[[Hashable], object]) -> None:
        self._capacity = capacity  # model files; 0: nothing beyond the classic cache
        self._on_evict = on_evict  # the cache drops the loader's output: its model is gone
        self._held: OrderedDict[Hashable, tuple[str, ...]] = OrderedDict()

    def __contains__(self, signature: Hashable) -> bool:
        return signature in self._held

    def signatures(self) -> set[Hashable]:
        return set(self._held)

    def models(self) -> list[str]:
        """The files held, most recently used first."""
        return [m for models in reversed(self._held.values()) for m in models]

    def used(self, signature: Hashable, models: tuple[str, ...]) -> None:
        """A loader ran or was served from the cache: its models are the most recent now."""
        if self._capacity <= 0 or not models:
            return
        self._held[signature] = models
        self._held.move_to_end(signature)
        while sum(len(ms) for ms in self._held.values()) > self._capacity and len(self._held) > 1:
            self._on_evict(self._held.popitem(last=False)[0])

    def clear(self) -> None:
        """`POST /free`: every model leaves (ComfyUI keeps the files in RAM, where a later
        use moves them back to VRAM faster than from disk; the fake counts a whole load)."""
        for signature in list(self._held):
            self._on_evict(signature)
        self._held.clear()
