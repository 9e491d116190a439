"""Prompt validation with ComfyUI's rules and error bodies (validation_errors.jsonl).

The walk mirrors the real one on purpose, quirks included: only the first failing chain of an
output is reported, a broken link is filed under the node holding it but named after the input
of the node downstream, and dependent_outputs accumulate across outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.comfyui.graph import MAX_CHAIN
from gateway.comfyui.nodedef import NodeDef, types_match

_INNER_FRAME = (
    '  File "/srv/ComfyUI/execution.py", line 852, in validate_inputs\n'
    "    r = await validate_inputs(prompt_id, prompt, o_id, validated)\n"
    "        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
)
_OUTER_FRAME = (
    '  File "/srv/ComfyUI/execution.py", line 1069, in validate_prompt\n'
    "    m = await validate_inputs(prompt_id, prompt, o, validated)\n"
    "        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
)
_SITE_FRAMES = {
    "node": (
        '  File "/srv/ComfyUI/execution.py", line 832, in validate_inputs\n'
        "    o_class_type = prompt[o_id]['class_type']\n"
        "                   ~~~~~~^^^^^^\n"
    ),
    "slot": (
        '  File "/srv/ComfyUI/execution.py", line 834, in validate_inputs\n'
        "    received_type = r[val[1]]\n"
        "                    ~^^^^^^^^\n"
    ),
    "inputs": (
        '  File "/srv/ComfyUI/execution.py", line 777, in validate_inputs\n'
        "    inputs = prompt[unique_id]['inputs']\n"
        "             ~~~~~~~~~~~~~~~~~^^^^^^^^^^\n"
    ),
    # ComfyUI's walk calls itself once per linked node until Python's frames run out.
    "recursion": _INNER_FRAME,
}
_RECURSION = "maximum recursion depth exceeded"

Error = dict[str, Any]
Result = tuple[bool, list[Error], str]
# One node's check: it yields the id of each node it links to and is sent that node's Result.
_Walk = Generator[str, Result | None, Result]


class _WalkError(Exception):
    """A Python error raised while following a link, with the source line it stands for."""

    def __init__(self, cause: Exception, site: str) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.site = site

    def type_name(self) -> str:
        return type(self.cause).__name__

    def traceback(self, outer: bool) -> list[str]:
        return [_OUTER_FRAME if outer else _INNER_FRAME, _SITE_FRAMES[self.site]]


class _Cycle(Exception):
    """A link back to a node whose check is under way: the walk would never end.

    Reported as the node holding that link's own error (ComfyUI's RecursionError, with the
    cycle named): filed under the node linked to, as other inner errors are, it would be lost
    when that node's own check ends and records its result.
    """

    def __init__(self, path: list[str]) -> None:
        loop = " -> ".join(repr(node_id) for node_id in path)
        self.cause = RecursionError(f"{_RECURSION}: the links form a cycle ({loop})")
        super().__init__(str(self.cause))


@dataclass
class Validation:
    """The outcome: on failure `error` is the top-level error object of the 400 body."""

    ok: bool
    error: Error | None = None
    outputs: list[str] = field(default_factory=list)
    node_errors: dict[str, Any] = field(default_factory=dict)


def _fail(kind: str, message: str, details: str = "", extra: Error | None = None) -> Validation:
    error = {"type": kind, "message": message, "details": details, "extra_info": extra or {}}
    return Validation(ok=False, error=error)


class Registry(Protocol):
    """Where validation looks node classes up: one server's registry, or a fleet's."""

    def get(self, class_type: object) -> NodeDef | None: ...


class Validator:
    """Validates one prompt against the server's node registry."""

    def __init__(self, registry: Registry, image_exists: Callable[[str], bool]) -> None:
        self._registry = registry
        self._image_exists = image_exists

    def validate(self, prompt: dict[str, Any], partial: list[Any] | None) -> Validation:
        """Check `prompt` (coercing scalar inputs in place, as the real server does)."""
        outputs: list[str] = []
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                title = _title(node)
                return _fail(
                    "missing_node_type",
                    f"Node '{title or f'ID #{node_id}'}' has no class_type. "
                    "The workflow may be corrupted or a custom node is missing.",
                    f"Node ID '#{node_id}'",
                    {"node_id": node_id, "class_type": None, "node_title": title},
                )
            class_type = node["class_type"]
            definition = self._registry.get(class_type)
            if definition is None:
                title = _title(node) or class_type
                return _fail(
                    "missing_node_type",
                    f"Node '{title}' not found. The custom node may not be installed.",
                    f"Node ID '#{node_id}'",
                    {"node_id": node_id, "class_type": class_type, "node_title": title},
                )
            if definition.is_output and (partial is None or node_id in partial):
                outputs.append(node_id)
        if not outputs:
            return _fail("prompt_no_outputs", "Prompt has no outputs")

        validated: dict[str, Result] = {}
        good: list[str] = []
        failed: list[tuple[str, list[Error]]] = []
        node_errors: dict[str, Any] = {}
        for output in outputs:
            try:
                valid, reasons, _ = self._inputs(prompt, output, validated)
            except _WalkError as exc:
                valid = False
                reasons = [
                    {
                        "type": "exception_during_validation",
                        "message": "Exception when validating node",
                        "details": str(exc),
                        "extra_info": {
                            "exception_type": exc.type_name(),
                            "traceback": exc.traceback(outer=True),
                        },
                    }
                ]
                validated[output] = (False, reasons, output)
            if valid:
                good.append(output)
                continue
            failed.append((output, reasons))
            for node_id, (node_valid, node_reasons, _) in validated.items():
                if node_valid or not node_reasons:
                    continue
                if node_id not in node_errors:
                    node_errors[node_id] = {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    }
                node_errors[node_id]["dependent_outputs"].append(output)

        if not good:
            details = "\n".join(
                f"{error['message']}: {error['details']}"
                for _, errors in failed
                for error in errors
            )
            result = _fail(
                "prompt_outputs_failed_validation", "Prompt outputs failed validation", details
            )
            result.node_errors = node_errors
            return result
        return Validation(ok=True, outputs=good, node_errors=node_errors)

    def _inputs(self, prompt: dict[str, Any], node_id: str, validated: dict[str, Result]) -> Result:
        """Check `node_id` and every node it links to, as ComfyUI's walk does.

        ComfyUI recurses once per linked node; this keeps the walk's frames on a stack of its own
        (each node's check is a generator), so a long chain cannot exhaust Python's. Where
        ComfyUI's walk would end in a RecursionError it ends here too, with the same error: a
        chain longer than MAX_CHAIN nodes, or a link back to a node under way (a cycle, which
        ComfyUI follows round until its frames run out).
        """
        if node_id in validated:
            return validated[node_id]
        path = [node_id]
        walks = [self._walk(prompt, node_id, validated)]
        reply: Result | None = None
        raised: Exception | None = None
        while True:
            try:
                wanted = walks[-1].throw(raised) if raised is not None else walks[-1].send(reply)
            except StopIteration as finished:
                result: Result = finished.value
                reply, raised = result, None
            except _WalkError as exc:
                reply, raised = None, exc
            else:
                reply, raised = None, None
                if wanted in validated:
                    reply = validated[wanted]
                elif wanted in path:
                    raised = _Cycle([*path[path.index(wanted) :], wanted])
                elif len(path) >= MAX_CHAIN:
                    message = f"{_RECURSION} (more than {MAX_CHAIN} nodes linked one after another)"
                    raised = _WalkError(RecursionError(message), "recursion")
                else:
                    path.append(wanted)
                    walks.append(self._walk(prompt, wanted, validated))
                continue
            # The node's check ended: hand its result (or its error) to the one that asked.
            path.pop()
            walks.pop()
            if not walks:
                if raised is not None:
                    raise raised
                assert reply is not None
                return reply

    def _walk(self, prompt: dict[str, Any], node_id: str, validated: dict[str, Result]) -> _Walk:
        try:
            inputs: dict[str, Any] = prompt[node_id]["inputs"]
        except KeyError as exc:
            raise _WalkError(exc, "inputs") from exc
        definition = self._registry.get(prompt[node_id]["class_type"])
        assert definition is not None, "class types were checked before the walk"
        errors: list[Error] = []
        valid = True
        for name, spec in definition.inputs.items():
            info = [spec.type, spec.extra]
            if name not in inputs:
                if spec.category == "required":
                    errors.append(
                        {
                            "type": "required_input_missing",
                            "message": "Required input is missing",
                            "details": name,
                            "extra_info": {"input_name": name},
                        }
                    )
                continue
            value = inputs[name]
            if isinstance(value, list):
                link_error = self._link(prompt, name, value, info, spec.type, validated)
                if link_error is not None:
                    errors.append(link_error)
                    continue
                try:
                    upstream = yield from self._upstream_ok(name, value, info, validated)
                except _Cycle as cycle:
                    errors.append(_inner_error(cycle.cause, "recursion", name, info, value))
                    continue
                if not upstream[0]:
                    valid = False
                continue
            error = self._scalar(inputs, name, value, info, definition.validate_args)
            if error is not None:
                errors.append(error)
        for name in definition.validate_args:
            if name in inputs and not isinstance(inputs[name], list):
                message = self._custom_check(definition.class_type, inputs[name])
                if message is not None:
                    errors.append(
                        {
                            "type": "custom_validation_failed",
                            "message": "Custom validation failed for node",
                            "details": f"{name} - {message}",
                            "extra_info": {"input_name": name},
                        }
                    )
        result: Result = (not errors and valid, errors, node_id)
        validated[node_id] = result
        return result

    def _link(
        self,
        prompt: dict[str, Any],
        name: str,
        value: list[Any],
        info: list[Any],
        expected: str | list[Any],
        validated: dict[str, Result],
    ) -> Error | None:
        if len(value) != 2:
            return {
                "type": "bad_linked_input",
                "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                "details": name,
                "extra_info": {"input_name": name, "input_config": info, "received_value": value},
            }
        try:
            source_class = prompt[value[0]]["class_type"]
        except (KeyError, TypeError) as exc:
            raise _WalkError(exc, "node") from exc
        source = self._registry.get(source_class)
        assert source is not None, "class types were checked before the walk"
        try:
            received = tuple(source.outputs)[value[1]]
        except (IndexError, TypeError) as exc:
            raise _WalkError(exc, "slot") from exc
        if not types_match(received, expected):
            return {
                "type": "return_type_mismatch",
                "message": "Return type mismatch between linked nodes",
                "details": f"{name}, received_type({received}) mismatch input_type({expected})",
                "extra_info": {
                    "input_name": name,
                    "input_config": info,
                    "received_type": received,
                    "linked_node": value,
                },
            }
        return None

    def _upstream_ok(
        self, name: str, value: list[Any], info: list[Any], validated: dict[str, Result]
    ) -> _Walk:
        """The linked node's result (a generator: it asks the walk for that node); an error
        raised while checking it is filed under that node, as ComfyUI files it."""
        source_id = value[0]
        try:
            upstream = yield source_id
        except _WalkError as exc:
            reasons = [_inner_error(exc.cause, exc.site, name, info, value)]
            validated[source_id] = (False, reasons, source_id)
            return (False, reasons, source_id)
        assert upstream is not None
        return upstream

    def _scalar(
        self,
        inputs: dict[str, Any],
        name: str,
        value: Any,
        info: list[Any],
        validate_args: tuple[str, ...],
    ) -> Error | None:
        kind, extra = info
        if isinstance(value, dict) and "__value__" in value:
            value = value["__value__"]
            inputs[name] = value
        converters: dict[str, Callable[[Any], Any]] = {
            "INT": int,
            "FLOAT": float,
            "STRING": str,
            "BOOLEAN": bool,
        }
        if isinstance(kind, str) and kind in converters:
            try:
                value = converters[kind](value)
            except (TypeError, ValueError, OverflowError) as exc:
                return {
                    "type": "invalid_input_type",
                    "message": f"Failed to convert an input value to a {kind} value",
                    "details": f"{name}, {value}, {exc}",
                    "extra_info": {
                        "input_name": name,
                        "input_config": info,
                        "received_value": value,
                        "exception_message": str(exc),
                    },
                }
            inputs[name] = value
        if name in validate_args:
            return None
        if "min" in extra and value < extra["min"]:
            return _range_error("value_smaller_than_min", "smaller than min", name, value, info)
        if "max" in extra and value > extra["max"]:
            return _range_error("value_bigger_than_max", "bigger than max", name, value, info)
        if isinstance(kind, list) and value not in kind:
            config: list[Any] | None = info
            listing = str(kind)
            if len(kind) > 20:
                listing = f"(list of length {len(kind)})"
                config = None
            return {
                "type": "value_not_in_list",
                "message": "Value not in list",
                "details": f"{name}: '{value}' not in {listing}",
                "extra_info": {"input_name": name, "input_config": config, "received_value": value},
            }
        return None

    def _custom_check(self, class_type: str, value: Any) -> str | None:
        if class_type == "LoadImage" and not self._image_exists(str(value)):
            return f"Invalid image file: {value}"
        return None


def _inner_error(
    cause: Exception, site: str, name: str, info: list[Any], value: list[Any]
) -> Error:
    """ComfyUI's error for an exception raised while checking a linked node."""
    return {
        "type": "exception_during_inner_validation",
        "message": "Exception when validating inner node",
        "details": str(cause),
        "extra_info": {
            "input_name": name,
            "input_config": info,
            "exception_message": str(cause),
            "exception_type": type(cause).__name__,
            "traceback": [_INNER_FRAME, _SITE_FRAMES[site]],
            "linked_node": value,
        },
    }


def _range_error(kind: str, words: str, name: str, value: Any, info: list[Any]) -> Error:
    limit = info[1]["min" if kind == "value_smaller_than_min" else "max"]
    return {
        "type": kind,
        "message": f"Value {value} {words} of {limit}",
        "details": name,
        "extra_info": {"input_name": name, "input_config": info, "received_value": value},
    }


def _title(node: object) -> str | None:
    if not isinstance(node, dict):
        return None
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, dict) else None
    return title if isinstance(title, str) else None
