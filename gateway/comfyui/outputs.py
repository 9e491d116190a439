"""The names ComfyUI's outputs are stored under, as the adapter and the ComfyUI-compatible API
both give them."""

from __future__ import annotations


def stored_name(filename: str, subfolder: str = "", folder: str = "output") -> str:
    """The name a ComfyUI output is stored under in its job's folder (before clashes).

    ComfyUI tells files apart by folder type, subfolder and name; all three go into the name
    (`temp~ComfyUI_temp_x_00001_.png`, `sub~a_00001_.png`) so that files which differ only in
    the first two do not collide. The gateway names files with this too, before they are stored.
    """
    # A storage key segment may not be hidden or hold a slash; ComfyUI names are plain anyway.
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].lstrip(".") or "output"
    parts = [] if folder == "output" else [folder]
    parts += [p.lstrip(".") for p in subfolder.replace("\\", "/").split("/")]
    parts = [p for p in parts if p]
    return "~".join([*parts, name])


# Nodes whose images come over the websocket while they execute, and are outputs (ComfyUI
# sends latent previews the same way, from other nodes: those are not).
WEBSOCKET_OUTPUT_CLASSES = frozenset({"SaveImageWebsocket"})

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


def websocket_image_name(node_id: str, index: int, content_type: str) -> str:
    """The name an image sent over the websocket is stored under in its job's folder.

    Only a file in a subfolder `ws` of the output folder could be named alike; the adapter
    gives such a file another key.
    """
    node = stored_name(node_id)
    extension = _EXTENSIONS.get(content_type, "bin")
    return f"ws~{node}_{index:05d}.{extension}"
