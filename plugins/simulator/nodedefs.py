"""Node definitions: the `/object_info` entries and what validation and execution read from them.

The entries live in node_defs.json. Those recorded from the real server (SaveImage, EmptyImage,
ImageInvert, LoadImage, ImageBlur, GetImageSize, SaveImageWebsocket, PreviewImage) are copied
verbatim; the others follow the same shapes. Two placeholders stand for lists that depend on
the running server: "__input_files__" (LoadImage's choices) and "__models__:<folder>".
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_INPUT_FILES = "__input_files__"
_MODELS = "__models__:"

# Classes with a VALIDATE_INPUTS hook: its arguments skip the generic checks (from the source).
_VALIDATED_BY_NODE: dict[str, tuple[str, ...]] = {"LoadImage": ("image",)}
# Classes whose cache signature includes their node id (they take a hidden UNIQUE_ID).
_NOT_IDEMPOTENT = frozenset({"SaveImageWebsocket"})


@cache
def _all_definitions() -> dict[str, dict[str, Any]]:
    text = resources.files(__package__).joinpath("node_defs.json").read_text(encoding="utf-8")
    data: dict[str, dict[str, Any]] = json.loads(text)
    return data


def known_classes() -> frozenset[str]:
    """Every class_type the simulator knows how to describe and run."""
    return frozenset(_all_definitions())


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    type: str | list[Any]
    """"INT", "IMAGE", … or the list of choices of a combo."""
    extra: dict[str, Any]
    category: str
    """"required" or "optional"."""


class NodeDef:
    """One node class as validation and execution see it."""

    def __init__(self, class_type: str, entry: dict[str, Any]) -> None:
        self.class_type = class_type
        self.entry = entry
        inputs: dict[str, Any] = entry["input"]
        self.inputs: dict[str, InputSpec] = {}
        for category in ("required", "optional"):
            for name, spec in inputs.get(category, {}).items():
                extra = spec[1] if len(spec) > 1 else {}
                self.inputs[name] = InputSpec(name, spec[0], extra, category)
        self.hidden: dict[str, str] = {}
        for name, spec in inputs.get("hidden", {}).items():
            self.hidden[name] = spec if isinstance(spec, str) else spec[0]
        self.outputs: list[str] = list(entry["output"])
        self.is_output: bool = bool(entry["output_node"])
        self.validate_args: tuple[str, ...] = _VALIDATED_BY_NODE.get(class_type, ())
        self.has_unique_id = "UNIQUE_ID" in self.hidden.values()
        self.not_idempotent = class_type in _NOT_IDEMPOTENT


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


def types_match(received: str, expected: str | list[Any]) -> bool:
    """ComfyUI's link type check: equal, a wildcard, or overlapping comma-separated unions."""
    if isinstance(expected, list):
        return received == "COMBO"
    if received == expected or "*" in (received, expected):
        return True
    return bool(set(received.split(",")) & set(expected.split(",")))
