"""Checks and edits of a ComfyUI workflow in API format: `{node_id: {class_type, inputs}}`."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Final

from gateway.comfyui.graph import MAX_CHAIN, is_link

# How deep a workflow may nest as JSON, its own object counted: a node is at level 2, its inputs
# at 3, an input's value at 4 and below. Every part that copies, validates or encodes a
# workflow recurses per level; no real workflow comes near this.
MAX_DEPTH: Final = 64


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
        elif _nests_deeper(node, MAX_DEPTH - 1):
            problems.append(
                f"node {node_id!r} nests deeper than the {MAX_DEPTH} levels of lists and objects "
                "a workflow may have"
            )
    return problems


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether `value` has lists and objects more than `limit` levels inside each other
    (itself counted), found without recursion."""
    todo = [(value, 1)]
    while todo:
        item, level = todo.pop()
        if level > limit:
            return True
        members = item.values() if isinstance(item, dict) else item
        todo.extend((member, level + 1) for member in members if isinstance(member, dict | list))
    return False


def graph_problems(workflow: Mapping[str, Any]) -> list[str]:
    """Links to nodes the workflow lacks, a cycle, a chain of links longer than MAX_CHAIN
    nodes; empty when the graph can run.

    The nodes must already have passed `workflow_problems`. ComfyUI would refuse each only
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
    length, end = _longest_chain(needs)
    if length > MAX_CHAIN:
        problems.append(
            f"node {end!r} ends a chain of {length} linked nodes; ComfyUI checks at most "
            f"{MAX_CHAIN} nodes linked one after another"
        )
    return problems


def _longest_chain(needs: Mapping[str, list[str]]) -> tuple[int, str | None]:
    """The most nodes on one path of links, and the node that path ends at (downstream).

    The graph has no cycle. Upstream nodes are measured first, from an explicit stack.
    """
    length: dict[str, int] = {}
    for root in needs:
        stack = [root]
        while stack:
            node = stack[-1]
            unmeasured = [up for up in needs[node] if up not in length]
            if unmeasured:
                stack.extend(unmeasured)
                continue
            stack.pop()
            if node not in length:
                length[node] = 1 + max((length[up] for up in needs[node]), default=0)
    if not length:
        return 0, None
    end = max(length, key=length.__getitem__)
    return length[end], end


def _find_cycle(needs: Mapping[str, list[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None.

    Depth-first without recursion: a chain of any length reaches the check of its length.
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
        # An input's value sits at level 4 of the workflow (see MAX_DEPTH).
        if isinstance(value, dict | list) and _nests_deeper(value, MAX_DEPTH - 3):
            raise WorkflowError(
                f"override {target!r}: its value nests deeper than the {MAX_DEPTH} levels of "
                "lists and objects a workflow may have"
            )
        node = result[find_node(result, ref)]
        node.setdefault("inputs", {})[input_name] = value
    return result
