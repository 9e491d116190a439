"""The values that flow between fake nodes, and their torch-like text form.

An image is a solid colour with a size and a batch count; that is enough to write real PNGs,
to answer GetImageSize, and to print `current_inputs` the way torch prints a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

_EDGE = 3
"""torch prints the first and last 3 entries of a long dimension (PRINT_OPTS.edgeitems)."""
_SUMMARY_THRESHOLD = 1000


@dataclass(frozen=True, slots=True)
class Image:
    """A batch of `batch` images of width x height, every pixel `rgb` (floats in 0..1)."""

    width: int
    height: int
    batch: int
    rgb: tuple[float, float, float]

    def rgb8(self) -> tuple[int, int, int]:
        """The colour as bytes, truncated like ComfyUI's `np.clip(255 * x, 0, 255)`."""
        r, g, b = (max(0, min(255, int(255.0 * c))) for c in self.rgb)
        return r, g, b

    def __str__(self) -> str:
        return tensor_repr((self.batch, self.height, self.width, 3), self.rgb)


@dataclass(frozen=True, slots=True)
class Mask:
    width: int
    height: int
    batch: int
    value: float

    def __str__(self) -> str:
        return tensor_repr((self.batch, self.height, self.width), (self.value,))


@dataclass(frozen=True, slots=True)
class Latent:
    """A latent batch; width and height are in latent pixels (image size / 8)."""

    width: int
    height: int
    batch: int
    seed: int

    def __str__(self) -> str:
        shape = (self.batch, 4, self.height, self.width)
        return "{'samples': " + tensor_repr(shape, (0.0,)) + "}"


def color_from_int(color: int) -> tuple[float, float, float]:
    """EmptyImage's `color` input (0xRRGGBB) as floats."""
    return (
        ((color >> 16) & 0xFF) / 0xFF,
        ((color >> 8) & 0xFF) / 0xFF,
        (color & 0xFF) / 0xFF,
    )


def _format_values(values: tuple[float, ...]) -> tuple[list[str], int]:
    # torch's _Formatter: integer-valued floats print as "1.", others with 4 decimals.
    if all(float(v).is_integer() for v in values):
        texts = [f"{v:.0f}." for v in values]
    else:
        texts = [f"{v:.4f}" for v in values]
    return texts, max(len(t) for t in texts)


def tensor_repr(shape: tuple[int, ...], channel_values: tuple[float, ...]) -> str:
    """What `str(tensor)` prints for a float tensor whose last dimension repeats
    `channel_values` (or is filled with the single value given)."""
    numel = 1
    for size in shape:
        numel *= size
    summarize = numel > _SUMMARY_THRESHOLD
    if len(channel_values) == 1:
        channel_values = channel_values * shape[-1]
    texts, width = _format_values(channel_values)
    padded = [t.rjust(width) for t in texts]
    indent = len("tensor(")
    body = _dims(shape, padded, indent, summarize)
    return f"tensor({body})"


def _dims(shape: tuple[int, ...], last: list[str], indent: int, summarize: bool) -> str:
    if len(shape) == 1:
        if summarize and shape[0] > 2 * _EDGE:
            items = [*last[:_EDGE], " ...", *last[-_EDGE:]]
        else:
            items = last[: shape[0]]
        return "[" + ", ".join(items) + "]"
    inner = _dims(shape[1:], last, indent + 1, summarize)
    if summarize and shape[0] > 2 * _EDGE:
        slices = [inner] * _EDGE + ["..."] + [inner] * _EDGE
    else:
        slices = [inner] * shape[0]
    separator = "," + "\n" * (len(shape) - 1) + " " * (indent + 1)
    return "[" + separator.join(slices) + "]"


def format_value(value: object) -> object:
    """How ComfyUI prints one input in `current_inputs`: scalars as they are, else str()."""
    if value is None or isinstance(value, int | float | bool | str):
        return value
    return str(value)
