"""Fake execution of each node class: real PNG files, sizes and colours, no models."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import png
from .images import Image, Latent, Mask, color_from_int
from .tracebacks import EXECUTION_FRAMES, SAVE_IMAGE_ESCAPE_FRAMES

_TEMP_LETTERS = "abcdefghijklmnopqrstupvxyz"  # sic: ComfyUI's own alphabet for temp names
_ANNOTATIONS = {" [input]": "input", " [output]": "output", " [temp]": "temp"}


class NodeError(Exception):
    """A node failed: becomes an `execution_error` with these fields."""

    def __init__(self, exception_type: str, message: str, frames: list[str]) -> None:
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message
        self.frames = frames


class Interrupted(Exception):
    """The prompt was interrupted while this node ran (or just before it)."""


class RunContext(Protocol):
    """What a node may do besides computing outputs."""

    node_id: str
    sampler_previews: bool

    def folder(self, kind: str) -> Path:
        """The absolute output, input or temp folder."""

    async def progress(self, value: int, total: int, preview: bytes | None = None) -> None:
        """Report progress (and optionally a PNG preview) for this node; raise Interrupted
        first if an interrupt is pending, as ComfyUI's progress hook does."""

    def send_text(self, text: str) -> None:
        """Broadcast a binary TEXT frame for this node."""

    def check_interrupted(self) -> None:
        """Raise Interrupted if an interrupt is pending."""

    def step_seconds(self) -> float:
        """How long one progress step takes."""


@dataclass(slots=True)
class NodeResult:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None = None


Runner = Callable[[dict[str, Any], RunContext], Awaitable[NodeResult]]


async def _encode(image: Image) -> bytes:
    # Large images take milliseconds of zlib time: keep the event loop free meanwhile.
    return await asyncio.to_thread(png.encode_solid, image.width, image.height, image.rgb8())


def save_path(prefix: str, output_dir: str, width: int, height: int) -> tuple[str, str, int, str]:
    """ComfyUI's get_save_image_path: (folder, filename, counter, subfolder).

    String path functions on purpose: normpath and commonpath semantics decide what escapes.
    """
    prefix = prefix.replace("%width%", str(width)).replace("%height%", str(height))
    subfolder = os.path.dirname(os.path.normpath(prefix))  # noqa: PTH120
    filename = os.path.basename(os.path.normpath(prefix))  # noqa: PTH119
    folder = os.path.join(output_dir, subfolder)  # noqa: PTH118
    common = os.path.commonpath((output_dir, os.path.abspath(folder)))  # noqa: PTH100
    if common != output_dir:
        err = (
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {os.path.abspath(folder)}"  # noqa: PTH100
            f"\n         output_dir: {output_dir}"
            f"\n         commonpath: {common}"
        )
        raise NodeError("Exception", err + "\n", [*EXECUTION_FRAMES, *SAVE_IMAGE_ESCAPE_FRAMES])
    counter = 1
    path = Path(folder)
    if path.is_dir():
        numbers = []
        for entry in path.iterdir():
            name = entry.name
            head = name[: len(filename) + 1]
            if os.path.normcase(head[:-1]) != os.path.normcase(filename) or head[-1:] != "_":
                continue
            try:
                numbers.append(int(name[len(filename) + 1 :].split("_")[0]))
            except ValueError:
                numbers.append(0)
        if numbers:
            counter = max(numbers) + 1
    else:
        path.mkdir(parents=True, exist_ok=True)
    return folder, filename, counter, subfolder


async def _save(image: Image, prefix: str, ctx: RunContext, kind: str) -> NodeResult:
    folder, filename, counter, subfolder = save_path(
        prefix, str(ctx.folder(kind)), image.width, image.height
    )
    data = await _encode(image)
    results = []
    for batch_number in range(image.batch):
        name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        await asyncio.to_thread((Path(folder) / name).write_bytes, data)
        results.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    return NodeResult((), {"images": results})


async def _save_image(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    return await _save(inputs["images"], str(inputs["filename_prefix"]), ctx, "output")


async def _preview_image(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    suffix = "".join(random.choice(_TEMP_LETTERS) for _ in range(5))
    return await _save(inputs["images"], f"ComfyUI_temp_{suffix}", ctx, "temp")


async def _save_image_websocket(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    image: Image = inputs["images"]
    one = await _encode(Image(image.width, image.height, 1, image.rgb))
    for index in range(image.batch):
        await ctx.progress(index, image.batch, one)
    return NodeResult(())


def resolve_annotated(name: str, folders: Callable[[str], Path]) -> Path | None:
    """Where `name` ("x.png", "sub/x.png", "x.png [output]") points; None if it escapes."""
    kind = "input"
    for suffix, folder_kind in _ANNOTATIONS.items():
        if name.endswith(suffix):
            name, kind = name[: -len(suffix)], folder_kind
    base = folders(kind).resolve()
    path = (base / name).resolve()
    return path if path.is_relative_to(base) else None


async def _load_image(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    path = resolve_annotated(str(inputs["image"]), ctx.folder)
    if path is None or not path.is_file():
        raise NodeError("FileNotFoundError", f"Invalid image file: {inputs['image']}", [])
    info = png.read_info(await asyncio.to_thread(path.read_bytes))
    pixel = info.first_pixel
    rgb = (pixel[0] / 255, pixel[1 % len(pixel)] / 255, pixel[2 % len(pixel)] / 255)
    image = Image(info.width, info.height, 1, rgb)
    has_alpha = info.color_type in (4, 6)
    mask = (
        Mask(info.width, info.height, 1, 1 - pixel[-1] / 255) if has_alpha else Mask(64, 64, 1, 0)
    )
    return NodeResult((image, mask))


def fingerprint(class_type: str, inputs: dict[str, Any], folders: Callable[[str], Path]) -> Any:
    """The IS_CHANGED value that goes into a node's cache signature."""
    if class_type == "SaveImageWebsocket":
        return time.time()  # reports itself changed on every run, so it is never cached
    if class_type == "LoadImage" and not isinstance(inputs.get("image"), list):
        path = resolve_annotated(str(inputs.get("image")), folders)
        if path is not None and path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()
    return False


async def _empty_image(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    color = color_from_int(int(inputs["color"]))
    return NodeResult((Image(inputs["width"], inputs["height"], inputs["batch_size"], color),))


async def _invert(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    image: Image = inputs["image"]
    r, g, b = image.rgb
    return NodeResult((Image(image.width, image.height, image.batch, (1 - r, 1 - g, 1 - b)),))


async def _passthrough(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    return NodeResult((inputs["image"],))


async def _scale(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    image: Image = inputs["image"]
    width, height = int(inputs["width"]), int(inputs["height"])
    if width == 0 and height == 0:
        width, height = image.width, image.height
    elif width == 0:
        width = max(1, round(image.width * height / image.height))
    elif height == 0:
        height = max(1, round(image.height * width / image.width))
    return NodeResult((Image(width, height, image.batch, image.rgb),))


async def _crop(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    image: Image = inputs["image"]
    x = min(int(inputs["x"]), image.width - 1)
    y = min(int(inputs["y"]), image.height - 1)
    width = min(x + int(inputs["width"]), image.width) - x
    height = min(y + int(inputs["height"]), image.height) - y
    return NodeResult((Image(width, height, image.batch, image.rgb),))


async def _image_size(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    image: Image = inputs["image"]
    ctx.send_text(f"width: {image.width}, height: {image.height}\n batch size: {image.batch}")
    return NodeResult((image.width, image.height, image.batch))


async def _repeat(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    image: Image = inputs["image"]
    batch = image.batch * int(inputs["amount"])
    return NodeResult((Image(image.width, image.height, batch, image.rgb),))


async def _solid_mask(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    mask = Mask(int(inputs["width"]), int(inputs["height"]), 1, float(inputs["value"]))
    return NodeResult((mask,))


async def _checkpoint(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    name = inputs["ckpt_name"]
    return NodeResult((f"<MODEL {name}>", f"<CLIP {name}>", f"<VAE {name}>"))


async def _lora(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    return NodeResult((inputs["model"], inputs["clip"]))


async def _clip_text(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    return NodeResult((f"<CONDITIONING {inputs['text']!r}>",))


async def _empty_latent(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    latent = Latent(int(inputs["width"]) // 8, int(inputs["height"]) // 8, inputs["batch_size"], 0)
    return NodeResult((latent,))


async def _ksampler(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    latent: Latent = inputs["latent_image"]
    steps = int(inputs["steps"])
    preview = await _encode(Image(8, 8, 1, (0.5, 0.5, 0.5))) if ctx.sampler_previews else None
    for step in range(1, steps + 1):
        if ctx.step_seconds() > 0:
            await asyncio.sleep(ctx.step_seconds())
        await ctx.progress(step, steps, preview)  # where an interrupt stops the sampler
    return NodeResult((Latent(latent.width, latent.height, latent.batch, int(inputs["seed"])),))


async def _vae_decode(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    latent: Latent = inputs["samples"]
    seed = latent.seed
    rgb = (((seed >> 16) & 0xFF) / 255, ((seed >> 8) & 0xFF) / 255, (seed & 0xFF) / 255)
    return NodeResult((Image(latent.width * 8, latent.height * 8, latent.batch, rgb),))


async def _vae_encode(inputs: dict[str, Any], ctx: RunContext) -> NodeResult:
    image: Image = inputs["pixels"]
    return NodeResult((Latent(image.width // 8, image.height // 8, image.batch, 0),))


RUNNERS: dict[str, Runner] = {
    "EmptyImage": _empty_image,
    "ImageInvert": _invert,
    "SaveImage": _save_image,
    "PreviewImage": _preview_image,
    "LoadImage": _load_image,
    "ImageAddNoise": _passthrough,
    "ImageBlur": _passthrough,
    "ImageSharpen": _passthrough,
    "ImageScale": _scale,
    "ImageCrop": _crop,
    "GetImageSize": _image_size,
    "RepeatImageBatch": _repeat,
    "SaveImageWebsocket": _save_image_websocket,
    "SolidMask": _solid_mask,
    "CheckpointLoaderSimple": _checkpoint,
    "CLIPTextEncode": _clip_text,
    "EmptyLatentImage": _empty_latent,
    "KSampler": _ksampler,
    "VAEDecode": _vae_decode,
    "VAEEncode": _vae_encode,
    "LoraLoader": _lora,
}
