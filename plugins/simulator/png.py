"""A tiny PNG encoder for solid-colour images, and just enough of a reader for our own needs.

Solid colours keep encoding cheap: one row is built once and repeated with bytes
multiplication, so even 2048x2048 images encode in a few milliseconds of zlib time.
"""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE_RGB = 2
_COLOR_TYPE_RGBA = 6
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


class PngError(ValueError):
    """The bytes are not a PNG this module understands."""


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def encode_solid(
    width: int, height: int, rgb: tuple[int, int, int], alpha: int | None = None
) -> bytes:
    """A width x height PNG of one colour; RGBA when `alpha` is given, else RGB."""
    pixel = bytes(rgb) if alpha is None else bytes((*rgb, alpha))
    color_type = _COLOR_TYPE_RGB if alpha is None else _COLOR_TYPE_RGBA
    row = b"\x00" + pixel * width
    raw = row * height
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


class PngInfo:
    """Size and first pixel of a PNG: what LoadImage and /view?channel=a need."""

    __slots__ = ("color_type", "first_pixel", "height", "width")

    def __init__(
        self, width: int, height: int, color_type: int, first_pixel: tuple[int, ...]
    ) -> None:
        self.width = width
        self.height = height
        self.color_type = color_type
        self.first_pixel = first_pixel


def read_info(data: bytes) -> PngInfo:
    """Parse IHDR and the first pixel of an 8-bit, non-interlaced PNG.

    The first pixel of the first row never depends on a filter predictor, so it can be read
    from the inflated data without unfiltering anything.
    """
    if not data.startswith(SIGNATURE):
        raise PngError("not a PNG file")
    pos = len(SIGNATURE)
    width = height = color_type = bit_depth = -1
    idat = bytearray()
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        payload = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, bit_depth, color_type = struct.unpack(">IIBB", payload[:10])
        elif kind == b"IDAT":
            idat += payload
        elif kind == b"IEND":
            break
    if width <= 0 or color_type not in _CHANNELS:
        raise PngError("missing or unsupported IHDR")
    channels = _CHANNELS[color_type]
    first: tuple[int, ...] = (0, 0, 0)
    if bit_depth == 8 and idat:
        raw = zlib.decompressobj().decompress(bytes(idat), 1 + channels)
        pixel = tuple(raw[1 : 1 + channels])
        if len(pixel) == channels:
            first = pixel
    return PngInfo(width, height, color_type, first)
