"""Strict shapes of ComfyUI's messages and bodies, as the protocol README records them.

Each check raises ShapeError naming where the body strays; keys are compared exactly, so an
extra field is as wrong as a missing one, and in the recorded order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ShapeError(AssertionError):
    """A message or body does not have the recorded shape."""


def keys(value: Any, expected: Iterable[str], where: str) -> dict[str, Any]:
    """`value` as a dict whose keys are exactly `expected`."""
    if not isinstance(value, dict):
        raise ShapeError(f"{where}: expected an object, got {value!r}")
    want = set(expected)
    if set(value) != want:
        raise ShapeError(f"{where}: keys {sorted(value)}, expected {sorted(want)}")
    return value


def ordered(value: Any, expected: Iterable[str], where: str) -> dict[str, Any]:
    """`value` as a dict with exactly `expected` keys in that order (as the recordings have
    them: clients that print or hash the JSON see the order)."""
    want = list(expected)
    keys(value, want, where)
    if list(value) != want:
        raise ShapeError(f"{where}: keys in the order {list(value)}, expected {want}")
    return value


def kind(value: Any, types: type | tuple[type, ...], where: str) -> Any:
    allowed = types if isinstance(types, tuple) else (types,)
    # bool is an int in Python, but JSON true is never a number in these bodies.
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ShapeError(f"{where}: expected {types}, got {value!r}")
    return value


def number(value: Any, where: str) -> Any:
    return kind(value, (int, float), where)


def string_list(value: Any, where: str) -> Any:
    kind(value, list, where)
    for index, item in enumerate(value):
        kind(item, str, f"{where}[{index}]")
    return value


# --- files ------------------------------------------------------------------------------------


def file_ref(value: Any, where: str) -> dict[str, str]:
    """{"filename", "subfolder", "type"}, all strings."""
    ref = ordered(value, ("filename", "subfolder", "type"), where)
    for name in ref:
        kind(ref[name], str, f"{where}.{name}")
    if ref["type"] not in {"output", "input", "temp"}:
        raise ShapeError(f"{where}.type: {ref['type']!r}")
    return ref


def ui_output(value: Any, where: str) -> dict[str, Any]:
    """A node's UI output as SaveImage and LoadImage workflows give it: {"images": [ref…]}."""
    output = keys(value, ("images",), where)
    kind(output["images"], list, f"{where}.images")
    for index, ref in enumerate(output["images"]):
        file_ref(ref, f"{where}.images[{index}]")
    return output


# --- websocket messages -----------------------------------------------------------------------

_PROGRESS_NODE = (
    "value",
    "max",
    "state",
    "node_id",
    "prompt_id",
    "display_node_id",
    "parent_node_id",
    "real_node_id",
)


def _status(data: dict[str, Any], where: str, first: bool) -> None:
    ordered(data, ("status", "sid") if first else ("status",), where)
    status = keys(data["status"], ("exec_info",), f"{where}.status")
    info = keys(status["exec_info"], ("queue_remaining",), f"{where}.status.exec_info")
    remaining = kind(info["queue_remaining"], int, f"{where}.queue_remaining")
    if remaining < 0:
        raise ShapeError(f"{where}: queue_remaining {remaining}")
    if first:
        kind(data["sid"], str, f"{where}.sid")


def _stamped(data: dict[str, Any], where: str, order: tuple[str, ...]) -> None:
    """A message with `prompt_id` and `timestamp` among `order`."""
    ordered(data, order, where)
    kind(data["prompt_id"], str, f"{where}.prompt_id")
    kind(data["timestamp"], int, f"{where}.timestamp")


def _executing(data: dict[str, Any], where: str) -> None:
    if data.get("node") is None:
        ordered(data, ("node", "prompt_id"), where)
    elif "prompt_id" in data:
        ordered(data, ("node", "display_node", "prompt_id"), where)
        kind(data["display_node"], str, f"{where}.display_node")
    else:  # a socket that joins a running prompt under its clientId
        ordered(data, ("node",), where)
    if data["node"] is not None:
        kind(data["node"], str, f"{where}.node")


def _progress_state(data: dict[str, Any], where: str) -> None:
    ordered(data, ("prompt_id", "nodes"), where)
    kind(data["nodes"], dict, f"{where}.nodes")
    for node_id, node in data["nodes"].items():
        here = f"{where}.nodes[{node_id}]"
        ordered(node, _PROGRESS_NODE, here)
        if node["node_id"] != node_id or node["prompt_id"] != data["prompt_id"]:
            raise ShapeError(f"{here}: names another node or prompt: {node}")
        if node["state"] not in {"running", "finished"}:
            raise ShapeError(f"{here}.state: {node['state']!r}")
        number(node["value"], f"{here}.value")
        number(node["max"], f"{here}.max")


def _executed(data: dict[str, Any], where: str) -> None:
    ordered(data, ("node", "display_node", "output", "prompt_id"), where)
    kind(data["node"], str, f"{where}.node")
    ui_output(data["output"], f"{where}.output")


def _progress(data: dict[str, Any], where: str) -> None:
    ordered(data, ("value", "max", "prompt_id", "node"), where)
    number(data["value"], f"{where}.value")
    number(data["max"], f"{where}.max")


_ERROR_DATA = (
    "prompt_id",
    "node_id",
    "node_type",
    "executed",
    "exception_message",
    "exception_type",
    "traceback",
    "current_inputs",
    "current_outputs",
    "timestamp",
)


def _error(data: dict[str, Any], where: str) -> None:
    _stamped(data, where, _ERROR_DATA)
    string_list(data["executed"], f"{where}.executed")


def _interrupted(data: dict[str, Any], where: str) -> None:
    _stamped(data, where, ("prompt_id", "node_id", "node_type", "executed", "timestamp"))
    kind(data["node_id"], str, f"{where}.node_id")
    kind(data["node_type"], str, f"{where}.node_type")
    string_list(data["executed"], f"{where}.executed")


def ws_message(message: Any, first: bool) -> dict[str, Any]:
    """One text frame, parsed: {"type", "data"} with the data of the README's table."""
    ordered(message, ("type", "data"), "frame")
    name = message["type"]
    data = message["data"]
    where = f"{name} frame"
    kind(data, dict, where)
    if first and name != "status":
        raise ShapeError(f"the first frame is {name}, not status")
    match name:
        case "status":
            _status(data, where, first)
        case "execution_start" | "execution_success":
            _stamped(data, where, ("prompt_id", "timestamp"))
        case "execution_cached":
            _stamped(data, where, ("nodes", "prompt_id", "timestamp"))
            string_list(data["nodes"], f"{where}.nodes")
        case "executing":
            _executing(data, where)
        case "progress_state":
            _progress_state(data, where)
        case "executed":
            _executed(data, where)
        case "progress":
            _progress(data, where)
        case "execution_error":
            _error(data, where)
        case "execution_interrupted":
            _interrupted(data, where)
        case "feature_flags":
            pass
        case _:
            raise ShapeError(f"unknown message type {name!r}")
    return message


# --- HTTP bodies ------------------------------------------------------------------------------


def queue_item(item: Any, where: str) -> list[Any]:
    """[number, prompt_id, prompt, extra_data, outputs_to_execute], exactly five."""
    kind(item, list, where)
    if len(item) != 5:
        raise ShapeError(f"{where}: {len(item)} elements, expected 5")
    number(item[0], f"{where}[0] number")
    kind(item[1], str, f"{where}[1] prompt_id")
    kind(item[2], dict, f"{where}[2] prompt")
    extra = kind(item[3], dict, f"{where}[3] extra_data")
    kind(extra.get("create_time"), int, f"{where}[3].create_time")
    string_list(item[4], f"{where}[4] outputs_to_execute")
    return item


def queue(body: Any) -> tuple[list[list[Any]], list[list[Any]]]:
    """GET /queue: (running, pending), each item checked."""
    ordered(body, ("queue_running", "queue_pending"), "queue")
    for name in ("queue_running", "queue_pending"):
        kind(body[name], list, name)
        for index, item in enumerate(body[name]):
            queue_item(item, f"{name}[{index}]")
    return body["queue_running"], body["queue_pending"]


def queue_remaining(body: Any) -> int:
    """GET /prompt: {"exec_info": {"queue_remaining": N}}."""
    info = keys(keys(body, ("exec_info",), "prompt")["exec_info"], ("queue_remaining",), "info")
    return kind(info["queue_remaining"], int, "queue_remaining")


def history_entry(entry: Any, prompt_id: str) -> dict[str, Any]:
    """One history entry: exactly prompt, outputs, status and meta."""
    where = f"history[{prompt_id}]"
    ordered(entry, ("prompt", "outputs", "status", "meta"), where)
    item = queue_item(entry["prompt"], f"{where}.prompt")
    if item[1] != prompt_id:
        raise ShapeError(f"{where}.prompt[1] is {item[1]!r}")
    kind(entry["outputs"], dict, f"{where}.outputs")
    for node_id, output in entry["outputs"].items():
        ui_output(output, f"{where}.outputs[{node_id}]")
    status = ordered(entry["status"], ("status_str", "completed", "messages"), f"{where}.status")
    if status["status_str"] not in {"success", "error"}:
        raise ShapeError(f"{where}.status.status_str: {status['status_str']!r}")
    kind(status["completed"], bool, f"{where}.status.completed")
    kind(status["messages"], list, f"{where}.status.messages")
    for index, pair in enumerate(status["messages"]):
        here = f"{where}.status.messages[{index}]"
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ShapeError(f"{here}: {pair!r} is not [event, data]")
        ws_message({"type": pair[0], "data": pair[1]}, first=False)
    kind(entry["meta"], dict, f"{where}.meta")
    for node_id, meta in entry["meta"].items():
        ordered(meta, ("node_id", "display_node", "parent_node", "real_node_id"), f"{where}.meta")
        if meta["node_id"] != node_id:
            raise ShapeError(f"{where}.meta[{node_id}] names {meta['node_id']!r}")
    return entry


def history(body: Any) -> dict[str, dict[str, Any]]:
    """GET /history or /history/{id}: {prompt_id: entry}."""
    kind(body, dict, "history")
    for prompt_id, entry in body.items():
        history_entry(entry, prompt_id)
    return body


_ERROR = ("type", "message", "details", "extra_info")


def validation_error(body: Any) -> dict[str, Any]:
    """A 400 from POST /prompt: {"error": {…}, "node_errors": {id: {errors, …}}}."""
    ordered(body, ("error", "node_errors"), "400 body")
    error = ordered(body["error"], _ERROR, "error")
    for name in ("type", "message", "details"):
        kind(error[name], str, f"error.{name}")
    kind(error["extra_info"], dict, "error.extra_info")
    node_errors(body["node_errors"])
    return body


def node_errors(value: Any) -> dict[str, Any]:
    """`{node_id: {"errors", "dependent_outputs", "class_type"}}`, in a 400 and in a 200."""
    kind(value, dict, "node_errors")
    for node_id, node in value.items():
        here = f"node_errors[{node_id}]"
        ordered(node, ("errors", "dependent_outputs", "class_type"), here)
        kind(node["errors"], list, f"{here}.errors")
        for index, item in enumerate(node["errors"]):
            ordered(item, _ERROR, f"{here}.errors[{index}]")
        string_list(node["dependent_outputs"], f"{here}.dependent_outputs")
        kind(node["class_type"], str, f"{here}.class_type")
    return value


def accepted(body: Any) -> dict[str, Any]:
    """A 200 from POST /prompt: {"prompt_id", "number", "node_errors"}."""
    ordered(body, ("prompt_id", "number", "node_errors"), "POST /prompt reply")
    kind(body["prompt_id"], str, "prompt_id")
    number(body["number"], "number")
    node_errors(body["node_errors"])
    return body
