"""Overrides checked against the node they change, as the servers' `/object_info` defines it.

An override that names an input the node's class does not have would be sent to ComfyUI and
silently ignored there (ComfyUI reads only the inputs it knows), so a typo would run the job
with the old value. Each problem names the closest inputs the class has.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from gateway.comfyui.graph import is_link
from gateway.comfyui.nodedef import InputSpec, NodeDef
from gateway.comfyui.workflow import WorkflowError, find_node

# What a value of each widget type must be (ComfyUI converts numbers given as strings too, but a
# string that is not a number fails validation there).
_CHECKS: dict[str, Callable[[Any], bool]] = {
    "INT": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "FLOAT": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "BOOLEAN": lambda v: isinstance(v, bool),
    "STRING": lambda v: isinstance(v, str),
}


def override_problems(
    workflow: Mapping[str, Any],
    overrides: Mapping[str, Any],
    definition: Callable[[str], NodeDef | None],
) -> list[str]:
    """Why each override does not fit its node; empty when all do (or cannot be judged).

    `definition(class_type)` is the class as the servers define it, None where none knows it.
    """
    problems = []
    for target, value in overrides.items():
        ref, _, input_name = target.rpartition(".")
        try:
            node_id = find_node(workflow, ref)
        except WorkflowError:
            continue  # the submit path refuses it with its own message
        target_node = workflow[node_id]
        if not isinstance(target_node, Mapping):
            continue  # the submit path refuses the workflow's shape
        class_type = target_node.get("class_type")
        if not isinstance(class_type, str):
            continue
        node = definition(class_type)
        if node is None:
            continue
        spec = node.inputs.get(input_name)
        if spec is None:
            problems.append(_unknown_input(target, class_type, input_name, node))
        elif not is_link(value) and input_name not in node.validate_args:
            # (An input the node validates itself, LoadImage's file, say, is its business.)
            wrong = _wrong_value(spec, value)
            if wrong is not None:
                problems.append(f"override {target!r}: {wrong}")
    return problems


def _unknown_input(target: str, class_type: str, name: str, node: NodeDef) -> str:
    known = sorted(node.inputs)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"override {target!r}: {class_type} has no input {name!r}{hint} "
        f"(its inputs: {', '.join(known) or 'none'})"
    )


def _wrong_value(spec: InputSpec, value: Any) -> str | None:
    if isinstance(spec.type, list):
        if value not in spec.type:
            shown = ", ".join(repr(c) for c in spec.type[:10])
            more = f" and {len(spec.type) - 10} more" if len(spec.type) > 10 else ""
            return f"{value!r} is not one of the choices ({shown}{more})"
        return None
    check = _CHECKS.get(spec.type)
    if check is None:
        # Not a widget: IMAGE, LATENT, MODEL, ... come from another node's output.
        return f'{spec.name} takes a link to a node\'s {spec.type} output, like ["1", 0]'
    if not check(value):
        return f"{spec.name} takes {spec.type}, not {type(value).__name__} {value!r}"
    if spec.type in ("INT", "FLOAT"):
        low, high = spec.extra.get("min"), spec.extra.get("max")
        if isinstance(low, int | float) and value < low:
            return f"{spec.name} is at least {low}, not {value!r}"
        if isinstance(high, int | float) and value > high:
            return f"{spec.name} is at most {high}, not {value!r}"
    return None
