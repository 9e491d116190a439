"""Which nodes run, in what order, and which are served from the cache.

The order follows ComfyUI's ExecutionList: nodes are collected depth-first from each output,
and among the ready ones an output node goes first, then a node that feeds an output, then a
node two steps from one, else the first ready node. Cache keys are input signatures: class,
IS_CHANGED value, the node id for nodes that need it, and the inputs with links replaced by the
signature of the node they come from.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, Final

# The longest chain of linked nodes a workflow may have, counted in nodes. ComfyUI checks a
# prompt's links with a recursive walk, a Python frame per node, under Python's default limit of
# 1000 frames: it refuses a chain much longer than this with a RecursionError. Well below that,
# so that what the fleet takes, every ComfyUI takes; every walk here is iterative.
MAX_CHAIN: Final = 500


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


class _Built:
    """A container of `_freeze`'s work list whose members are frozen: assemble it."""

    __slots__ = ("container",)

    def __init__(self, container: dict[Any, Any] | list[Any] | tuple[Any, ...]) -> None:
        self.container = container


def _freeze(value: Any) -> Hashable:
    """`value` as nested tuples, without recursion: an input may nest as deep as its JSON."""
    frozen: list[Hashable] = []
    todo: list[Any] = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, _Built):
            container = item.container
            parts = frozen[len(frozen) - len(container) :]
            del frozen[len(frozen) - len(container) :]
            if isinstance(container, dict):
                frozen.append(tuple(sorted(zip(map(str, container), parts, strict=True))))
            else:
                frozen.append(tuple(parts))
        elif isinstance(item, dict | list | tuple):
            todo.append(_Built(item))
            # Reversed: members come off the list, and are frozen, in their own order.
            todo.extend(reversed(list(item.values()) if isinstance(item, dict) else item))
        elif isinstance(item, float) and item != item:
            frozen.append(object())  # NaN never equals anything, as in the real cache
        else:
            frozen.append(item)
    return frozen[0]


def signatures(
    prompt: dict[str, Any],
    fingerprint: Callable[[str], Any],
    include_id: Callable[[str], bool],
) -> dict[str, Hashable]:
    """The cache key of every node of `prompt`.

    A node's key holds its ancestors' keys, so they are computed upstream first, from an explicit
    stack: a validated prompt's chains are at most MAX_CHAIN long, but nothing here relies on it.
    A node on a cycle, or linked to a missing node, is never cached (its key equals nothing).
    """
    done: dict[str, Hashable] = {}
    for root in prompt:
        stack = [root]
        on_stack = {root}
        while stack:
            node_id = stack[-1]
            # One source at a time, so the stack is a path: a source on it closes a cycle.
            waiting = next(
                (
                    source
                    for source in _sources(prompt.get(node_id))
                    if source not in done and source not in on_stack and source in prompt
                ),
                None,
            )
            if waiting is not None:
                stack.append(waiting)
                on_stack.add(waiting)
                continue
            stack.pop()
            on_stack.discard(node_id)
            if node_id not in done:
                done[node_id] = _signature(prompt, node_id, done, fingerprint, include_id)
    return done


def _sources(node: Any) -> list[str]:
    inputs = node.get("inputs") if isinstance(node, dict) else None
    if not isinstance(inputs, dict):
        return []
    return [value[0] for value in inputs.values() if is_link(value)]


def _signature(
    prompt: Mapping[str, Any],
    node_id: str,
    done: Mapping[str, Hashable],
    fingerprint: Callable[[str], Any],
    include_id: Callable[[str], bool],
) -> Hashable:
    """One node's key, its sources' keys known (a source missing or on a cycle: never equal)."""
    node = prompt.get(node_id)
    if not isinstance(node, dict):
        return object()
    parts: list[Hashable] = [node.get("class_type"), _freeze(fingerprint(node_id))]
    if include_id(node_id):
        parts.append(node_id)
    inputs = node.get("inputs", {})
    for key in sorted(inputs):
        value = inputs[key]
        if is_link(value):
            upstream = done.get(value[0])
            parts.append((key, "ANCESTOR", object() if upstream is None else upstream, value[1]))
        else:
            parts.append((key, _freeze(value)))
    return tuple(parts)
