"""Which nodes run, in what order, and which are served from the cache.

The order follows ComfyUI's ExecutionList: nodes are collected depth-first from each output,
and among the ready ones an output node goes first, then a node that feeds an output, then a
node two steps from one, else the first ready node. Cache keys are input signatures: class,
IS_CHANGED value, the node id for nodes that need it, and the inputs with links replaced by the
signature of the node they come from.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any


def is_link(value: object) -> bool:
    """Whether an input value is a link, `["<node id>", <output index>]`, as ComfyUI reads it."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int | float)
        and not isinstance(value[1], bool)
    )


class ExecutionList:
    """The nodes still to run for one prompt, with their blocking links."""

    def __init__(
        self,
        prompt: dict[str, Any],
        is_output: Callable[[str], bool],
        is_cached: Callable[[str], bool],
    ) -> None:
        self._prompt = prompt
        self._is_output = is_output
        self._is_cached = is_cached
        self._pending: dict[str, None] = {}
        self._block_count: dict[str, int] = {}
        self._blocking: dict[str, dict[str, None]] = {}

    def add_node(self, node_id: str) -> None:
        """Add `node_id` and every uncached node it needs."""
        stack = [node_id]
        links: list[tuple[str, str]] = []
        while stack:
            current = stack.pop()
            if current in self._pending:
                continue
            self._pending[current] = None
            self._block_count[current] = 0
            self._blocking[current] = {}
            for value in self._prompt[current].get("inputs", {}).values():
                if not is_link(value):
                    continue
                source = value[0]
                if not self._is_cached(source):
                    stack.append(source)
                links.append((source, current))
        for source, target in links:
            if self._is_cached(source) or source not in self._prompt:
                continue
            if source not in self._pending:
                self.add_node(source)
            if target not in self._blocking[source]:
                self._blocking[source][target] = None
                self._block_count[target] += 1

    def is_empty(self) -> bool:
        return not self._pending

    def next_node(self) -> str:
        """The node to run now; the graph validated, so one is always ready."""
        ready = [node for node in self._pending if self._block_count[node] == 0]
        for node in ready:
            if self._is_output(node):
                return node
        for node in ready:
            if any(self._is_output(blocked) for blocked in self._blocking[node]):
                return node
        for node in ready:
            for blocked in self._blocking[node]:
                if any(self._is_output(second) for second in self._blocking[blocked]):
                    return node
        return ready[0]

    def complete(self, node_id: str) -> None:
        del self._pending[node_id]
        for blocked in self._blocking.pop(node_id):
            self._block_count[blocked] -= 1


def _freeze(value: Any) -> Hashable:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, float) and value != value:
        return object()  # NaN never equals anything, as in the real cache
    return value  # type: ignore[no-any-return]


def signatures(
    prompt: dict[str, Any],
    fingerprint: Callable[[str], Any],
    include_id: Callable[[str], bool],
) -> dict[str, Hashable]:
    """The cache key of every node of `prompt`."""
    done: dict[str, Hashable] = {}

    def visit(node_id: str, trail: frozenset[str]) -> Hashable:
        if node_id in done:
            return done[node_id]
        node = prompt.get(node_id)
        if not isinstance(node, dict) or node_id in trail:
            return object()  # missing or cyclic: never cached
        parts: list[Hashable] = [node.get("class_type"), _freeze(fingerprint(node_id))]
        if include_id(node_id):
            parts.append(node_id)
        inputs = node.get("inputs", {})
        for key in sorted(inputs):
            value = inputs[key]
            if is_link(value):
                parts.append((key, "ANCESTOR", visit(value[0], trail | {node_id}), value[1]))
            else:
                parts.append((key, _freeze(value)))
        done[node_id] = tuple(parts)
        return done[node_id]

    for node_id in prompt:
        visit(node_id, frozenset())
    return done
