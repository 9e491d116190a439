"""A node class as validation and execution read it from its `/object_info` entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Classes with a VALIDATE_INPUTS hook: its arguments skip the generic checks (from the source).
_VALIDATED_BY_NODE: dict[str, tuple[str, ...]] = {"LoadImage": ("image",)}
# Classes whose cache signature includes their node id (they take a hidden UNIQUE_ID).
_NOT_IDEMPOTENT = frozenset({"SaveImageWebsocket"})


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


def types_match(received: str, expected: str | list[Any]) -> bool:
    """ComfyUI's link type check: equal, a wildcard, or overlapping comma-separated unions."""
    if isinstance(expected, list):
        return received == "COMBO"
    if received == expected or "*" in (received, expected):
        return True
    return bool(set(received.split(",")) & set(expected.split(",")))
