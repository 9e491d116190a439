"""ComfyUI's messages as msgspec Structs, decoded once at the edge (HTTP bodies, websocket).

Only the fields the adapter reads are declared; everything else is ignored, so a newer ComfyUI
that adds fields still decodes. Shapes follow shared/comfyui-protocol/README.md.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Websocket text messages: {"type": ..., "data": {...}}


class ExecInfo(msgspec.Struct):
    queue_remaining: int = 0


class StatusInner(msgspec.Struct):
    exec_info: ExecInfo = msgspec.field(default_factory=ExecInfo)


class StatusData(msgspec.Struct):
    status: StatusInner = msgspec.field(default_factory=StatusInner)
    sid: str | None = None


class PromptRef(msgspec.Struct):
    prompt_id: str
    timestamp: int | None = None


class CachedData(msgspec.Struct):
    prompt_id: str
    nodes: list[str] = msgspec.field(default_factory=list)


class ExecutingData(msgspec.Struct):
    # `node` null with a prompt_id is the end of that prompt; on a reconnect during a run the
    # server sends {"node": id} without a prompt_id.
    node: str | None = None
    prompt_id: str | None = None


class ExecutedData(msgspec.Struct):
    node: str
    prompt_id: str
    output: dict[str, Any] | None = None


class ProgressData(msgspec.Struct):
    value: float
    max: float
    prompt_id: str | None = None
    node: str | None = None


class ErrorData(msgspec.Struct):
    prompt_id: str
    node_id: str | None = None
    node_type: str | None = None
    exception_message: str = ""
    exception_type: str = ""
    traceback: list[str] = msgspec.field(default_factory=list)


class InterruptedData(msgspec.Struct):
    prompt_id: str
    node_id: str | None = None
    node_type: str | None = None


class _Ws(msgspec.Struct, tag_field="type"):
    pass


class Status(_Ws, tag="status"):
    data: StatusData


class ExecutionStart(_Ws, tag="execution_start"):
    data: PromptRef


class ExecutionCached(_Ws, tag="execution_cached"):
    data: CachedData


class Executing(_Ws, tag="executing"):
    data: ExecutingData


class Executed(_Ws, tag="executed"):
    data: ExecutedData


class Progress(_Ws, tag="progress"):
    data: ProgressData


class ExecutionSuccess(_Ws, tag="execution_success"):
    data: PromptRef


class ExecutionError(_Ws, tag="execution_error"):
    data: ErrorData


class ExecutionInterrupted(_Ws, tag="execution_interrupted"):
    data: InterruptedData


WsMessage = (
    Status
    | ExecutionStart
    | ExecutionCached
    | Executing
    | Executed
    | Progress
    | ExecutionSuccess
    | ExecutionError
    | ExecutionInterrupted
)
# Sent often, carry nothing the adapter needs (progress_state repeats every node's state).
_IGNORED = frozenset({"progress_state", "feature_flags", "crystools.monitor"})


_KNOWN = frozenset(
    str(kind.__struct_config__.tag)
    for kind in (
        Status,
        ExecutionStart,
        ExecutionCached,
        Executing,
        Executed,
        Progress,
        ExecutionSuccess,
        ExecutionError,
        ExecutionInterrupted,
    )
)


class _Envelope(msgspec.Struct):
    type: str = ""


_ws_decoder = msgspec.json.Decoder(WsMessage)
_envelope_decoder = msgspec.json.Decoder(_Envelope)


def decode_ws(text: str | bytes) -> WsMessage | None:
    """One websocket text frame as a message, or None for a type the adapter does not follow."""
    try:
        message: WsMessage = _ws_decoder.decode(text)
    except msgspec.DecodeError:
        pass
    else:
        return message
    try:
        kind = _envelope_decoder.decode(text).type
    except msgspec.DecodeError:
        log.warning("ComfyUI sent a websocket frame that is not JSON: %r", text[:200])
        return None
    if kind in _KNOWN:
        log.warning("ComfyUI sent a %s message of an unexpected shape: %r", kind, text[:300])
    elif kind not in _IGNORED:
        log.debug("ignoring ComfyUI websocket message %r", kind)
    return None


def prompt_of(message: WsMessage) -> str | None:
    """The prompt a websocket message belongs to, if it names one."""
    if isinstance(message, Status):
        return None
    return message.data.prompt_id


# --------------------------------------------------------------------------------------------
# HTTP bodies


class PromptAccepted(msgspec.Struct):
    """200 from POST /prompt. `node_errors` non-empty: some outputs were dropped silently."""

    prompt_id: str
    number: float = 0
    node_errors: dict[str, Any] = msgspec.field(default_factory=dict)


class PromptError(msgspec.Struct):
    type: str = ""
    message: str = ""
    details: Any = ""
    extra_info: dict[str, Any] = msgspec.field(default_factory=dict)


class PromptRejection(msgspec.Struct):
    """400 from POST /prompt."""

    error: PromptError | str | None = None
    node_errors: dict[str, Any] = msgspec.field(default_factory=dict)


class QueueState(msgspec.Struct):
    """GET /queue. Items are [number, prompt_id, prompt, extra_data, outputs_to_execute, ...]."""

    queue_running: list[list[Any]] = msgspec.field(default_factory=list)
    queue_pending: list[list[Any]] = msgspec.field(default_factory=list)

    def running_ids(self) -> list[str]:
        return [str(item[1]) for item in self.queue_running if len(item) > 1]

    def pending_ids(self) -> list[str]:
        """Pending prompt ids in the order ComfyUI will run them.

        The server lists `queue_pending` in heap order, not run order: sort by `number`
        (lower runs first), ties kept in the listed order.
        """
        items = [item for item in self.queue_pending if len(item) > 1]
        items.sort(key=lambda item: _number(item[0]))
        return [str(item[1]) for item in items]

    def position(self, prompt_id: str) -> int | None:
        """0 when running, 1.. when pending (1 runs next), None when not queued."""
        if prompt_id in self.running_ids():
            return 0
        pending = self.pending_ids()
        return pending.index(prompt_id) + 1 if prompt_id in pending else None


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")


class HistoryStatus(msgspec.Struct):
    status_str: str = ""
    completed: bool = False
    messages: list[list[Any]] = msgspec.field(default_factory=list)

    def message(self, kind: str) -> dict[str, Any] | None:
        """The data of the first status message of `kind` (execution_error, ...), if any."""
        for item in self.messages:
            if len(item) == 2 and item[0] == kind and isinstance(item[1], dict):
                return item[1]
        return None


class HistoryEntry(msgspec.Struct):
    """One prompt of GET /history/{prompt_id}."""

    prompt: list[Any] = msgspec.field(default_factory=list)
    outputs: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    status: HistoryStatus | None = None

    @property
    def workflow(self) -> dict[str, Any]:
        if len(self.prompt) > 2 and isinstance(self.prompt[2], dict):
            return self.prompt[2]
        return {}


class Device(msgspec.Struct):
    name: str = ""
    type: str = ""
    vram_total: int | None = None
    vram_free: int | None = None


class SystemStats(msgspec.Struct):
    system: dict[str, Any] = msgspec.field(default_factory=dict)
    devices: list[Device] = msgspec.field(default_factory=list)


class UploadResult(msgspec.Struct):
    name: str
    subfolder: str = ""
    type: str = "input"

    @property
    def reference(self) -> str:
        """How a LoadImage input names this file."""
        return f"{self.subfolder}/{self.name}" if self.subfolder else self.name
