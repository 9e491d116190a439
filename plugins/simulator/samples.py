"""Sample workflows that the simulator (and any ComfyUI) runs without models."""

from __future__ import annotations

from typing import Any


def tiny_workflow(seed: int = 0, prefix: str = "tiny") -> dict[str, Any]:
    """EmptyImage → ImageInvert → SaveImage (titled "Save"), 64 by 64.

    `seed` sets the image's colour, so that jobs made with different seeds never share
    ComfyUI's cache: each one really runs.
    """
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": seed % 16_777_216},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": prefix},
            "_meta": {"title": "Save"},
        },
    }
