"""Checks and edits of a ComfyUI workflow in API format: `{node_id: {class_type, inputs}}`."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


class WorkflowError(ValueError):
    """A workflow or its overrides cannot be used; the message says why, in plain words."""


def workflow_problems(workflow: Mapping[str, Any]) -> list[str]:
    """Why a workflow is not in ComfyUI's API format; empty when it is."""
    if not workflow:
        return ["the workflow has no nodes"]
    if "nodes" in workflow and "links" in workflow:
        return [
            "this is a workflow in ComfyUI's UI format (it has 'nodes' and 'links'); export it "
            "in API format instead: in ComfyUI, enable Dev mode in the settings and use "
            "'Save (API Format)', or Workflow > Export (API)"
        ]
    problems = []
    for node_id, node in workflow.items():
        if not isinstance(node, dict):
            problems.append(f"node {node_id!r} is not an object")
        elif not isinstance(node.get("class_type"), str):
            problems.append(f"node {node_id!r} has no class_type")
        elif not isinstance(node.get("inputs", {}), dict):
            problems.append(f"node {node_id!r}: inputs must be an object")
    return problems


def _find_node(workflow: Mapping[str, Any], ref: str) -> str:
    if ref in workflow:
        return ref
    titled = [
        node_id
        for node_id, node in workflow.items()
        if isinstance(node, dict) and node.get("_meta", {}).get("title") == ref
    ]
    if len(titled) == 1:
        return titled[0]
    if len(titled) > 1:
        raise WorkflowError(f"override target {ref!r}: {len(titled)} nodes have that title")
    raise WorkflowError(f"override target {ref!r}: no node has that id or title")


def apply_overrides(workflow: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `workflow` with `{"<node id or title>.<input>": value}` applied.

    The node part may be an id or a `_meta.title`; the split is at the last dot, so titles may
    contain dots but input names may not. An unknown node is an error; a new input name is
    allowed (optional inputs are often absent from exported workflows).
    """
    result = copy.deepcopy(dict(workflow))
    for target, value in overrides.items():
        ref, dot, input_name = target.rpartition(".")
        if not dot or not ref or not input_name:
            raise WorkflowError(f"override {target!r} must look like '<node id or title>.<input>'")
        node = result[_find_node(result, ref)]
        node.setdefault("inputs", {})[input_name] = value
    return result
