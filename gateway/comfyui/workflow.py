"""Checks and edits of a ComfyUI workflow in API format: `{node_id: {class_type, inputs}}`."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from gateway.comfyui.graph import is_link


class WorkflowError(ValueError):
    """A workflow or its overrides cannot be used; the message says why, in plain words."""


def workflow_problems(workflow: Mapping[str, Any]) -> list[str]:
    """Why a workflow is not in ComfyUI's API format; empty when it is.

    This checks the shape of each node; `graph_problems` checks the links between them.
    """
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


def graph_problems(workflow: Mapping[str, Any]) -> list[str]:
    """Links to nodes the workflow lacks, and a cycle; empty when the graph can run.

    The nodes must already have passed `workflow_problems`. ComfyUI would refuse either only
    once the job reached a server; refusing at submission keeps it from ever being queued.
    """
    problems = []
    needs: dict[str, list[str]] = {}
    for node_id, node in workflow.items():
        upstream = needs[node_id] = []
        for input_name, value in node.get("inputs", {}).items():
            if not is_link(value):
                continue
            if value[0] in workflow:
                upstream.append(value[0])
            else:
                problems.append(
                    f"node {node_id!r}: input {input_name!r} links to node {value[0]!r}, "
                    "which is not in the workflow"
                )
    cycle = _find_cycle(needs)
    if cycle is not None:
        path = " -> ".join(repr(node_id) for node_id in cycle)
        problems.append(f"the links form a cycle ({path}): no node of it could ever run first")
    return problems


def _find_cycle(needs: Mapping[str, list[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None.

    Depth-first without recursion: a workflow of a few thousand chained nodes is legitimate
    and would exceed Python's recursion limit.
    """
    done: set[str] = set()
    for root in needs:
        if root in done:
            continue
        path = [root]
        on_path = {root}
        pending = [iter(needs[root])]
        while pending:
            upstream = next(pending[-1], None)
            if upstream is None:
                node = path.pop()
                on_path.discard(node)
                done.add(node)
                pending.pop()
            elif upstream in on_path:
                return [*path[path.index(upstream) :], upstream]
            elif upstream not in done:
                path.append(upstream)
                on_path.add(upstream)
                pending.append(iter(needs[upstream]))
    return None


def _title(node: Any) -> Any:
    meta = node.get("_meta") if isinstance(node, dict) else None
    return meta.get("title") if isinstance(meta, dict) else None


def find_node(workflow: Mapping[str, Any], ref: str) -> str:
    """The id of the node `ref` names: its id, or its one `_meta.title`."""
    if ref in workflow:
        return ref
    # `_meta` is free-form: a node whose `_meta` is not an object simply has no title.
    titled = [node_id for node_id, node in workflow.items() if _title(node) == ref]
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
        node = result[find_node(result, ref)]
        node.setdefault("inputs", {})[input_name] = value
    return result
