"""What a workflow costs to run, read from its graph: the models its loaders name and its size.

A job's time on a server is mostly two things: loading the models its loader nodes name (unless
the server still holds them) and sampling, which grows with steps x pixels x frames. The shape
is what the balancer learns costs by (jobs of one shape cost about the same on one server) and
what the adapter and the fake ComfyUI read the loaded models from; pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Final

import msgspec

# Inputs that name a model file, and the model folders ComfyUI looks for them in.
MODEL_INPUTS: Final[dict[str, tuple[str, ...]]] = {
    "ckpt_name": ("checkpoints",),
    "vae_name": ("vae",),
    "lora_name": ("loras",),
    "control_net_name": ("controlnet",),
    "clip_name": ("text_encoders", "clip"),
    "clip_name1": ("text_encoders", "clip"),
    "clip_name2": ("text_encoders", "clip"),
    "clip_name3": ("text_encoders", "clip"),
    "unet_name": ("diffusion_models", "unet"),
    "model_name": ("upscale_models",),
    "style_model_name": ("style_models",),
    "clip_vision_name": ("clip_vision",),
    "gligen_name": ("gligen",),
    "hypernetwork_name": ("hypernetworks",),
    "embedding_name": ("embeddings",),
}

# Inputs that size the work of a sampler: steps, the image or latent it makes, its frames.
_STEP_INPUTS: Final = ("steps",)
_FRAME_INPUTS: Final = ("length", "frames", "video_frames", "num_frames")
# Sizes are counted against a 512 x 512 image, one step, one frame: a unit of work.
_UNIT_PIXELS: Final = 512 * 512


def node_models(node: Any) -> tuple[str, ...]:
    """The model files one node of an API-format workflow names (a loader's, usually)."""
    if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
        return ()
    return tuple(
        value
        for name, value in sorted(node["inputs"].items())
        if name in MODEL_INPUTS and isinstance(value, str)
    )


def loaders(workflow: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Node id -> the model files it loads, for every node that names one."""
    found = {}
    for node_id, node in workflow.items():
        models = node_models(node)
        if models:
            found[str(node_id)] = models
    return found


class JobShape(msgspec.Struct, frozen=True, kw_only=True):
    """What sizes a job: its kind (node types, models), steps, pixels and frames."""

    key: str
    """Jobs with the same node types, models, steps, pixels and frames share it."""
    models: tuple[str, ...] = ()
    loaders: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(node id, the models it loads), in node-id order."""
    steps: int = 0
    pixels: int = 0
    frames: int = 1

    @property
    def units(self) -> float:
        """The sampling work in 512 x 512-image steps (at least a small fraction of one)."""
        return max(1, self.steps) * max(self.pixels / _UNIT_PIXELS, 1 / 64) * max(1, self.frames)

    def models_of(self, node_ids: Iterable[str]) -> set[str]:
        """The models loaded by the given nodes."""
        wanted = set(node_ids)
        return {model for node_id, models in self.loaders if node_id in wanted for model in models}


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def shape_of(workflow: Mapping[str, Any]) -> JobShape:
    """The shape of an API-format workflow; tolerant of anything malformed (it counts 0)."""
    types: list[str] = []
    steps = pixels = 0
    frames = 1
    for node in workflow.values():
        if not isinstance(node, dict):
            continue
        class_type = node.get("class_type")
        if isinstance(class_type, str):
            types.append(class_type)
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            continue
        steps += sum(_int(inputs.get(name)) for name in _STEP_INPUTS)
        width, height = _int(inputs.get("width")), _int(inputs.get("height"))
        batch = max(1, _int(inputs.get("batch_size")))
        pixels = max(pixels, width * height * batch)
        frames = max([frames, *(_int(inputs.get(name)) for name in _FRAME_INPUTS)])
    found = loaders(workflow)
    models = tuple(sorted({m for ms in found.values() for m in ms}))
    kind = "|".join([*sorted(types), *models, str(steps), str(pixels), str(frames)])
    return JobShape(
        key=hashlib.sha256(kind.encode()).hexdigest()[:16],
        models=models,
        loaders=tuple(sorted(found.items())),
        steps=steps,
        pixels=pixels,
        frames=frames,
    )
