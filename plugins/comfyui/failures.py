"""ComfyUI's errors in plain words: validation refusals and execution errors as FailedData."""

from __future__ import annotations

from typing import Any, Final

from gateway.bus.contract import FailedData
from plugins.comfyui.messages import PromptError, PromptRejection

# Our failure codes (FailedData.code).
VALIDATION_ERROR: Final = "validation_error"
EXECUTION_ERROR: Final = "execution_error"
TIMEOUT: Final = "timeout"
INPUT_ERROR: Final = "input_error"
OUTPUT_ERROR: Final = "output_error"
COMFYUI_ERROR: Final = "comfyui_error"
INTERRUPTED: Final = "interrupted"
ADAPTER_ERROR: Final = "adapter_error"


def _node_label(node_id: str, class_type: Any, workflow: dict[str, Any]) -> str:
    node = workflow.get(node_id)
    title = None
    if isinstance(node, dict):
        class_type = class_type or node.get("class_type")
        meta = node.get("_meta")
        if isinstance(meta, dict) and isinstance(meta.get("title"), str):
            title = meta["title"]
    label = f"node {node_id}"
    if class_type:
        label += f" ({class_type}"
        label += f' "{title}")' if title and title != class_type else ")"
    return label


def _input_error(error: dict[str, Any]) -> str:
    extra = error.get("extra_info") if isinstance(error.get("extra_info"), dict) else {}
    assert isinstance(extra, dict)
    message = str(error.get("message") or error.get("type") or "invalid")
    details = str(error.get("details") or "")
    input_name = extra.get("input_name")
    kind = error.get("type")
    if kind == "required_input_missing" and input_name:
        return f"required input '{input_name}' is missing"
    if kind in ("value_smaller_than_min", "value_bigger_than_max") and input_name:
        return f"input '{input_name}': {message}"
    if kind == "return_type_mismatch" and input_name:
        received = extra.get("received_type")
        return (
            f"input '{input_name}' is linked to an output of type {received}, which it cannot take"
        )
    if kind == "exception_during_inner_validation" and input_name:
        return (
            f"input '{input_name}' links to a node or output slot that does not exist ({details})"
        )
    if kind == "invalid_input_type" and input_name:
        received = extra.get("received_value")
        return f"input '{input_name}': {received!r} is not a valid value ({message})"
    if kind == "value_not_in_list" and input_name:
        return f"input '{input_name}': {details or message}"
    if input_name:
        return f"input '{input_name}': {message}" + (f" ({details})" if details else "")
    return message + (f" ({details})" if details else "")


def describe_node_errors(node_errors: dict[str, Any], workflow: dict[str, Any]) -> list[str]:
    """One sentence per bad input of each node ComfyUI named."""
    lines: list[str] = []
    for node_id, entry in node_errors.items():
        if not isinstance(entry, dict):
            continue
        label = _node_label(node_id, entry.get("class_type"), workflow)
        errors = entry.get("errors") if isinstance(entry.get("errors"), list) else []
        assert isinstance(errors, list)
        lines.extend(f"{label}: {_input_error(e)}" for e in errors if isinstance(e, dict))
        if not errors:
            lines.append(f"{label}: invalid")
    return lines


def validation_failure(
    rejection: PromptRejection, workflow: dict[str, Any], attempt: int
) -> FailedData:
    """A 400 from POST /prompt as a `failed` payload naming each bad node and input."""
    lines = describe_node_errors(rejection.node_errors, workflow)
    error = rejection.error
    node_errors = dict(rejection.node_errors)
    node_id: str | None = next(iter(rejection.node_errors), None)
    if isinstance(error, PromptError):
        extra = error.extra_info
        if error.type == "missing_node_type":
            node_id = str(extra.get("node_id")) if extra.get("node_id") is not None else node_id
            class_type = extra.get("class_type")
            what = (
                f"ComfyUI has no node type '{class_type}' (is the custom node installed?)"
                if class_type
                else "it has no class_type"
            )
            lines.insert(0, f"{_node_label(node_id or '?', None, workflow)}: {what}")
            if node_id is not None and node_id not in node_errors:
                node_errors[node_id] = {
                    "errors": [{"type": error.type, "message": error.message}],
                    "class_type": class_type,
                }
        elif error.type == "prompt_no_outputs":
            lines.insert(0, "the workflow has no output node (such as SaveImage)")
        elif not lines:
            lines.append(error.message or error.type)
    elif isinstance(error, str) and not lines:
        lines.append(error)
    message = "ComfyUI refused the workflow: " + ("; ".join(lines) or "no reason given")
    node_type = None
    if node_id is not None:
        node = workflow.get(node_id)
        if isinstance(node, dict) and isinstance(node.get("class_type"), str):
            node_type = node["class_type"]
    return FailedData(
        code=VALIDATION_ERROR,
        message=message,
        attempt=attempt,
        retryable=False,
        node_id=node_id,
        node_type=node_type,
        node_errors=node_errors,
    )


def is_out_of_memory(error: dict[str, Any]) -> bool:
    """Whether an execution_error is a (GPU) out-of-memory error."""
    kind = str(error.get("exception_type") or "")
    message = str(error.get("exception_message") or "")
    return "OutOfMemory" in kind or "out of memory" in message.lower()


def execution_failure(error: dict[str, Any], workflow: dict[str, Any], attempt: int) -> FailedData:
    """An execution_error (from the history's status messages) as a `failed` payload."""
    node_id = error.get("node_id")
    node_type = error.get("node_type")
    kind = str(error.get("exception_type") or "an exception")
    text = str(error.get("exception_message") or "").strip()
    label = _node_label(str(node_id), node_type, workflow) if node_id is not None else "a node"
    traceback = error.get("traceback")
    return FailedData(
        code=EXECUTION_ERROR,
        message=f"{label} failed with {kind}: {text}" if text else f"{label} failed with {kind}",
        attempt=attempt,
        retryable=False,
        node_id=str(node_id) if node_id is not None else None,
        node_type=str(node_type) if node_type is not None else None,
        exception_type=str(error.get("exception_type") or "") or None,
        traceback=[str(line) for line in traceback] if isinstance(traceback, list) else [],
    )
