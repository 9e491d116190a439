"""ComfyUI's binary websocket frames as the adapters publish them, and as sockets get them.

An adapter publishes preview frames with metadata (type 4) as its server sent them, and TEXT
frames (type 3) wrapped in the same layout, since ComfyUI's own TEXT frame names no prompt (see
`plugins.comfyui.progress.text_with_prompt`): event type, 4-byte JSON length, JSON naming the
prompt, then the image or the server's TEXT frame.

Images that nodes sent over the websocket are outputs, in storage: a socket gets them as a
`StoredFrame`, a header read with its image only when the socket's writer sends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import msgspec

from gateway.bus.contract import OutputFile
from gateway.storage import Storage

PREVIEW_IMAGE: Final = 1
TEXT: Final = 3
PREVIEW_WITH_METADATA: Final = 4
# Type 1's image format codes.
_FORMATS: Final = {"image/jpeg": 1, "image/png": 2}

_encoder = msgspec.json.Encoder()


def split_frame(frame: bytes) -> tuple[int, dict[str, Any], bytes] | None:
    """(event type, metadata, payload) of a published type 3 or 4 frame; None for others."""
    if len(frame) < 8:
        return None
    event = int.from_bytes(frame[:4], "big")
    if event not in (TEXT, PREVIEW_WITH_METADATA):
        return None
    length = int.from_bytes(frame[4:8], "big")
    try:
        metadata = msgspec.json.decode(frame[8 : 8 + length])
    except msgspec.DecodeError:
        return None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("prompt_id"), str):
        return None
    payload = frame[8 + length :]
    if event == TEXT and int.from_bytes(payload[:4], "big") != TEXT:
        return None  # the wrapped frame must be the server's TEXT frame
    return event, metadata, payload


def parse_preview(frame: bytes) -> tuple[dict[str, Any], bytes] | None:
    """(metadata, image) of ComfyUI's binary type 4 frame; None for anything else."""
    parts = split_frame(frame)
    if parts is None or parts[0] != PREVIEW_WITH_METADATA:
        return None
    return parts[1], parts[2]


def preview_frame(metadata: dict[str, Any], image: bytes) -> bytes:
    """A binary type 4 frame: event type, metadata length, metadata JSON, image bytes."""
    encoded = _encoder.encode(metadata)
    header = PREVIEW_WITH_METADATA.to_bytes(4, "big") + len(encoded).to_bytes(4, "big")
    return header + encoded + image


@dataclass(frozen=True)
class StoredFrame:
    """A binary frame whose image is in storage: `header`, then the stored object's bytes."""

    header: bytes
    key: str
    storage: Storage

    def __len__(self) -> int:
        # What waits in a socket's backlog: the image is read only when it is sent.
        return len(self.header)

    async def read(self) -> bytes:
        """The whole frame (one image in memory, as a websocket frame must be)."""
        return self.header + b"".join([chunk async for chunk in self.storage.open(self.key)])


def image_header(prompt_id: str, output: OutputFile, *, flagged: bool) -> bytes | None:
    """The header of a stored image's frame, as ComfyUI would send it to a client that
    negotiated preview metadata (`flagged`: type 4) or not (type 1); None if type 1 has no
    code for the image's format."""
    if flagged:
        node = output.node_id
        metadata = {
            "node_id": node,
            "prompt_id": prompt_id,
            "display_node_id": node,
            "parent_node_id": None,
            "real_node_id": node,
            "image_type": output.content_type,
        }
        return preview_frame(metadata, b"")
    code = _FORMATS.get(output.content_type)
    if code is None:
        return None
    return PREVIEW_IMAGE.to_bytes(4, "big") + code.to_bytes(4, "big")
