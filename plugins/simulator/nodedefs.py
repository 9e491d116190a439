"""The simulator's node catalogue: the `/object_info` entries of the classes it can run.

The entries live in node_defs.json. Those recorded from the real server (SaveImage, EmptyImage,
ImageInvert, LoadImage, ImageBlur, GetImageSize, SaveImageWebsocket, PreviewImage) are copied
verbatim; the others follow the same shapes. Two placeholders stand for lists that depend on
the running server: "__input_files__" (LoadImage's choices) and "__models__:<folder>".
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any

from gateway.comfyui.nodedef import NodeDef

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_INPUT_FILES = "__input_files__"
_MODELS = "__models__:"


@cache
def _all_definitions() -> dict[str, dict[str, Any]]:
    text = resources.files(__package__).joinpath("node_defs.json").read_text(encoding="utf-8")
    data: dict[str, dict[str, Any]] = json.loads(text)
    return data


def known_classes() -> frozenset[str]:
    """Every class_type the simulator knows how to describe and run."""
    return frozenset(_all_definitions())


class NodeRegistry:
    """The node classes this server claims, with their dynamic choices filled in."""

    def __init__(
        self,
        node_types: list[str],
        models: dict[str, list[str]],
        input_files: Callable[[], list[str]],
    ) -> None:
        unknown = sorted(set(node_types) - known_classes())
        if unknown:
            raise ValueError(f"the simulator cannot run these node types: {unknown}")
        self._types = list(node_types)
        self._models = models
        self._input_files = input_files
        # Built once: LoadImage's file list is the only dynamic part, and validation skips
        # the choice check for it (its own VALIDATE_INPUTS decides).
        self._defs = {name: NodeDef(name, self._entry(name, dynamic=False)) for name in node_types}

    def __contains__(self, class_type: object) -> bool:
        return class_type in self._types

    def names(self) -> list[str]:
        return list(self._types)

    def get(self, class_type: object) -> NodeDef | None:
        return self._defs.get(class_type) if isinstance(class_type, str) else None

    def object_info_entry(self, class_type: str) -> dict[str, Any]:
        """The `/object_info/{class_type}` entry, with current choices."""
        return self._entry(class_type, dynamic=True)

    def _entry(self, class_type: str, dynamic: bool) -> dict[str, Any]:
        entry = copy.deepcopy(_all_definitions()[class_type])
        for category in ("required", "optional"):
            for spec in entry["input"].get(category, {}).values():
                if isinstance(spec[0], str):
                    spec[0] = self._resolve(spec[0], dynamic)
        return entry

    def _resolve(self, kind: str, dynamic: bool) -> str | list[str]:
        if kind == _INPUT_FILES:
            return self._input_files() if dynamic else kind
        if kind.startswith(_MODELS):
            return list(self._models.get(kind[len(_MODELS) :], []))
        return kind

    def object_info(self) -> dict[str, Any]:
        """The whole `/object_info` body."""
        return {name: self.object_info_entry(name) for name in self._types}
