"""The simulator's configuration: one flat, typed Struct, loadable from JSON or TOML."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec

DEFAULT_NODE_TYPES: tuple[str, ...] = (
    # Model-free nodes used by the recorded workflows.
    "EmptyImage",
    "ImageInvert",
    "SaveImage",
    "PreviewImage",
    "LoadImage",
    "ImageAddNoise",
    "ImageBlur",
    "ImageSharpen",
    "ImageScale",
    "ImageCrop",
    "GetImageSize",
    "RepeatImageBatch",
    "SaveImageWebsocket",
    "SolidMask",
    # The usual Stable Diffusion graph.
    "CheckpointLoaderSimple",
    "CLIPTextEncode",
    "EmptyLatentImage",
    "KSampler",
    "VAEDecode",
    "VAEEncode",
    "LoraLoader",
)

DEFAULT_MODEL_FOLDERS: tuple[str, ...] = (
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "latent_upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
)


def _default_models() -> dict[str, list[str]]:
    return {
        "checkpoints": ["sd15.safetensors", "v1-5-pruned-emaonly.safetensors"],
        "loras": [],
        "vae": [],
    }


class SimulatorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Everything that shapes the fake server's behaviour.

    Durations are in seconds and divided by `speed`. Fault fields are off by default.
    """

    # Timing.
    node_seconds: float = 0.0
    """Time every executed node takes."""
    class_seconds: dict[str, float] = msgspec.field(default_factory=dict)
    """Per class_type override of `node_seconds`, e.g. {"ImageBlur": 2.5}."""
    step_seconds: float = 0.0
    """Time per progress step (KSampler steps, SaveImageWebsocket images)."""
    sampler_previews: bool = False
    """KSampler sends a preview image with each step, as ComfyUI does with a preview method."""
    setup_seconds: float = 0.0
    """Time between `execution_start` and `execution_cached` (the real server's cache and GC
    work, about 35 ms on the recording machine); requests arriving meanwhile are answered."""
    speed: float = 1.0
    """Factor applied to every duration: 2.0 runs twice as fast."""

    # What costs time on a GPU server (costs.py says what is modelled); off by default.
    load_seconds: dict[str, float] = msgspec.field(default_factory=dict)
    """Per model file, the time its loader node takes when the model is not held."""
    default_load_seconds: float = 0.0
    """Load time of a model file not in `load_seconds`."""
    resident_models: int = 0
    """How many model files the server holds across prompts (what fits in VRAM), least
    recently used out first; 0 keeps only the last prompt's, as ComfyUI's classic cache."""
    sample_seconds: float = 0.0
    """Time of one sampler step on a 512 x 512 latent, scaled by its pixels and batch."""

    # What the server claims to have.
    node_types: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_NODE_TYPES))
    models: dict[str, list[str]] = msgspec.field(default_factory=_default_models)
    """Model files per folder: combo inputs such as ckpt_name and GET /models/{folder}."""

    # Where files go; None makes a temporary directory that lives as long as the server.
    base_dir: str | None = None
    """Parent of comfy-output, comfy-input and comfy-temp when those are not given."""
    output_dir: str | None = None
    input_dir: str | None = None
    temp_dir: str | None = None

    # Injected failures.
    fail_nodes: list[str] = msgspec.field(default_factory=list)
    """class_types or node ids that end with an execution_error."""
    fail_exception_type: str = "RuntimeError"
    fail_exception_message: str = "Simulated failure"
    crash_on_node: str | None = None
    """class_type or node id: the server dies abruptly when that node starts."""
    crash_after_prompts: int | None = None
    """The server dies abruptly when it picks up the prompt after this many have run."""
    crash_exits_process: bool = False
    """A crash ends the whole process (the CLI sets this); otherwise only the server stops."""
    hang_queue: bool = False
    """Accept prompts but never run them."""
    hang_http: bool = False
    """Accept connections but never answer HTTP requests."""
    fail_prompt: bool = False
    """POST /prompt answers 500 as aiohttp does when a handler raises (a broken server)."""
    drop_ws_every_seconds: float | None = None
    """Cut every websocket abruptly at this interval."""
    drop_ws_on_message: str | None = None
    """Cut a websocket abruptly instead of sending it this message type (once per socket)."""

    def seconds_for(self, class_type: str) -> float:
        """Duration of one execution of `class_type`, speed applied."""
        base = self.class_seconds.get(class_type, self.node_seconds)
        return base / self.speed if self.speed > 0 else base

    def setup_duration(self) -> float:
        return self.setup_seconds / self.speed if self.speed > 0 else self.setup_seconds

    def step_duration(self) -> float:
        return self.step_seconds / self.speed if self.speed > 0 else self.step_seconds


def load_config(path: str | Path) -> SimulatorConfig:
    """Read a SimulatorConfig from a .json or .toml file; unknown keys are an error."""
    file = Path(path)
    data = file.read_bytes()
    if file.suffix.lower() == ".toml":
        return msgspec.convert(tomllib.loads(data.decode()), SimulatorConfig)
    return msgspec.json.decode(data, type=SimulatorConfig)
