"""ComfyUI's binary image frames: which prompt and node sent one, and where its image starts.

Two layouts carry an image (see the protocol notes): type 1, a 4-byte format (1 JPEG, 2 PNG)
then the image, sent to a client that did not negotiate preview metadata; and type 4, a 4-byte
JSON length, JSON naming the prompt and node, then the image. A type 1 frame names neither:
it belongs to the prompt and node executing when it came, as ComfyUI runs one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec

PREVIEW_IMAGE: Final = 1
PREVIEW_WITH_METADATA: Final = 4
_FORMATS: Final = {1: "image/jpeg", 2: "image/png"}
_IMAGE_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/webp"})


@dataclass(frozen=True)
class FrameImage:
    """An image in a binary frame: whose it is, its type, where it starts in the frame."""

    prompt_id: str
    node_id: str
    content_type: str
    offset: int


def frame_image(frame: bytes, running: str | None, executing: str | None) -> FrameImage | None:
    """The image `frame` carries, with its prompt and node; None if it is no image frame or
    does not say (nor is sent while one of ours executes) whose it is."""
    if len(frame) < 8:
        return None
    event = int.from_bytes(frame[:4], "big")
    if event == PREVIEW_IMAGE:
        content_type = _FORMATS.get(int.from_bytes(frame[4:8], "big"))
        if content_type is None or running is None or executing is None:
            return None
        return FrameImage(running, executing, content_type, 8)
    if event != PREVIEW_WITH_METADATA:
        return None
    length = int.from_bytes(frame[4:8], "big")
    try:
        metadata = msgspec.json.decode(frame[8 : 8 + length])
    except msgspec.DecodeError:
        return None
    if not isinstance(metadata, dict):
        return None
    prompt_id, node_id = metadata.get("prompt_id"), metadata.get("node_id")
    content_type = metadata.get("image_type")
    if not isinstance(prompt_id, str) or not isinstance(node_id, str):
        return None
    if content_type not in _IMAGE_TYPES:
        content_type = "image/png"
    return FrameImage(prompt_id, node_id, str(content_type), 8 + length)
