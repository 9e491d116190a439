"""Our job events told the way ComfyUI tells them: websocket messages and history entries.

A prompt's events come from whichever server runs it; `PromptRelay` turns them into the message
types a single ComfyUI sends, in its order (see the protocol notes): `execution_start`,
`execution_cached`, then per node `progress_state` (running), `executing`, `executed`,
`progress_state` (finished), then `execution_success` / `execution_error` /
`execution_interrupted`. `status` and the closing `executing` with node null are the socket
hub's, because they depend on the caller's queue and on the job's record.

Output files are named as the gateway serves them from storage: `subfolder` is the job id and
`filename` the stored name, so names are unique across the fleet and `/view` finds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.api.native.prompts import Entry
from gateway.bus.contract import (
    Cancelled,
    Event,
    Failed,
    FailedData,
    NodeCached,
    NodeImage,
    NodeOutput,
    NodeProgress,
    NodeStarted,
    OutputFile,
    Retried,
    Running,
    Succeeded,
)
from gateway.comfyui.outputs import stored_name

# Message types ComfyUI still sends, to every socket, for a prompt without a client id.
BROADCAST_TYPES = frozenset({"progress_state", "progress", "execution_interrupted"})


def ms(seconds: float | None) -> int:
    return int((seconds or 0.0) * 1000)


def native_file(job_id: str, filename: str, folder: str) -> dict[str, str]:
    """How a stored output is named to ComfyUI clients (`/view` reverses it)."""
    return {"filename": filename, "subfolder": job_id, "type": folder}


def stored_file(job_id: str, output: OutputFile) -> dict[str, str]:
    return native_file(job_id, output.key.rsplit("/", 1)[-1], output.type)


def rename_output(job_id: str, output: dict[str, Any]) -> dict[str, Any]:
    """A node's UI output with every file renamed to where the gateway will serve it."""
    renamed: dict[str, Any] = {}
    for kind, items in output.items():
        if isinstance(items, list) and all(_is_file(item) for item in items):
            renamed[kind] = [_renamed(job_id, item) for item in items]
        else:
            renamed[kind] = items
    return renamed


def _renamed(job_id: str, item: dict[str, Any]) -> dict[str, str]:
    folder = str(item.get("type") or "output")
    name = stored_name(item["filename"], str(item.get("subfolder") or ""), folder)
    return native_file(job_id, name, folder)


def _is_file(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("filename"), str) and "type" in item


@dataclass(frozen=True)
class Outgoing:
    """One text message for the prompt's client (or, if `broadcast`, for all its sockets)."""

    type: str
    data: dict[str, Any]

    @property
    def broadcast(self) -> bool:
        return self.type in BROADCAST_TYPES


@dataclass(frozen=True)
class OutgoingImage:
    """An image a node sent over the websocket, for the prompt's sockets that negotiated
    preview metadata (`flagged`, binary type 4) or for those that did not (type 1)."""

    output: OutputFile
    flagged: bool


Said = Outgoing | OutgoingImage


@dataclass
class PromptRelay:
    """The translation state of one prompt's run."""

    prompt_id: str
    last_seq: int = 0
    started: bool = False
    cached_sent: bool = False
    current: str | None = None
    last_started: str | None = None
    executed: list[str] = field(default_factory=list)
    """Nodes that finished, in order (what ComfyUI's error and interruption name)."""
    classes: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    held: list[OutgoingImage] = field(default_factory=list)
    """An image, held for the `progress` of its step (see `translate`)."""

    def translate(self, event: Event) -> list[Said]:
        """The ComfyUI messages `event` stands for (none for our own bookkeeping events)."""
        if event.seq <= self.last_seq:
            return []  # seen already (a redelivery)
        self.last_seq = event.seq
        held, self.held = self.held, []
        said = self._translate(event)
        if not held:
            return said
        # ComfyUI sends a step with an image as `progress_state`, then `progress`, with the
        # image between them for a client with preview metadata and after them for one
        # without; whatever else comes next, the image goes first.
        output = held[0].output
        step = output.node_id, output.index
        if isinstance(event, NodeProgress) and (event.data.node_id, event.data.value) == step:
            flagged = [image for image in held if image.flagged]
            plain = [image for image in held if not image.flagged]
            return [*said[:-1], *flagged, said[-1], *plain]
        return [*held, *said]

    def _translate(self, event: Event) -> list[Said]:
        out: list[Said] = []
        match event:
            case Running():
                self._restart()
                self.started = True
                out.append(self._message("execution_start", timestamp=ms(event.ts)))
            case NodeCached(data=data):
                if not self.cached_sent:
                    self.cached_sent = True
                    out.append(self._cached(data.node_ids, event.ts))
            case NodeStarted(data=data):
                out += self._opening(event.ts)
                out += self._finish_current()
                self.current = self.last_started = data.node_id
                if data.class_type is not None:
                    self.classes[data.node_id] = data.class_type
                self.nodes[data.node_id] = self._node_state(data.node_id, "running")
                out.append(self._progress_state())
                out.append(self._message("executing", node=data.node_id, display_node=data.node_id))
            case NodeProgress(data=data):
                out += self._step(data.node_id, data.value, data.max)
                out.append(
                    Outgoing(
                        "progress",
                        {
                            "value": data.value,
                            "max": data.max,
                            "prompt_id": self.prompt_id,
                            "node": data.node_id,
                        },
                    )
                )
            case NodeImage(data=data):
                self.held = [
                    OutgoingImage(data.output, flagged=True),
                    OutgoingImage(data.output, flagged=False),
                ]
            case NodeOutput(data=data):
                out += self._opening(event.ts)
                output = rename_output(self.prompt_id, data.output)
                out.append(
                    self._message(
                        "executed",
                        node=data.node_id,
                        display_node=data.node_id,
                        output=output,
                    )
                )
            case Succeeded():
                out += self._opening(event.ts)
                out += self._finish_current()
                out.append(self._message("execution_success", timestamp=ms(event.ts)))
            case Failed(data=data):
                if self.started:
                    out += self._opening(event.ts)
                error = error_data(self.prompt_id, data, event.ts, executed=self.executed)
                out.append(Outgoing("execution_error", error))
            case Cancelled():
                if self.started:
                    out.append(Outgoing("execution_interrupted", self.interruption(event.ts)))
            case Retried():
                self._restart()  # the next run starts over, as a fresh prompt would
        return out

    def interruption(self, ts: float) -> dict[str, Any]:
        """`execution_interrupted`'s data: the node cut short and those done before it."""
        node = self.current or self.last_started or ""
        return {
            "prompt_id": self.prompt_id,
            "node_id": node,
            "node_type": self.classes.get(node, ""),
            "executed": list(self.executed),
            "timestamp": ms(ts),
        }

    def _restart(self) -> None:
        self.started = False
        self.cached_sent = False
        self.current = self.last_started = None
        self.executed.clear()
        self.classes.clear()
        self.nodes.clear()

    def _opening(self, ts: float) -> list[Outgoing]:
        """`execution_cached` with nothing cached, if the server said nothing about its cache."""
        if self.cached_sent:
            return []
        self.cached_sent = True
        return [self._cached([], ts)]

    def _cached(self, nodes: list[str], ts: float) -> Outgoing:
        return Outgoing(
            "execution_cached",
            {"nodes": list(nodes), "prompt_id": self.prompt_id, "timestamp": ms(ts)},
        )

    def _step(self, node_id: str, value: int, total: int) -> list[Said]:
        """`progress_state` with the node at `value` of `total`, as ComfyUI sends it with
        each step; none when the step's image has sent it already."""
        state = self.nodes.get(node_id)
        if state is None or (state["value"], state["max"]) == (value, total):
            return []
        state["value"], state["max"] = value, total
        return [self._progress_state()]

    def _finish_current(self) -> list[Outgoing]:
        if self.current is None:
            return []
        state = self.nodes[self.current]
        state["state"] = "finished"
        state["value"] = state["max"]
        self.executed.append(self.current)
        self.current = None
        return [self._progress_state()]

    def _node_state(self, node_id: str, state: str) -> dict[str, Any]:
        return {
            "value": 0,
            "max": 1,
            "state": state,
            "node_id": node_id,
            "prompt_id": self.prompt_id,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }

    def _progress_state(self) -> Outgoing:
        nodes = {node_id: dict(state) for node_id, state in self.nodes.items()}
        return Outgoing("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes})

    def _message(self, kind: str, **fields: Any) -> Outgoing:
        # ComfyUI puts prompt_id after the node in node messages, first in the others.
        if "node" in fields:
            return Outgoing(kind, {**fields, "prompt_id": self.prompt_id})
        return Outgoing(kind, {"prompt_id": self.prompt_id, **fields})


def error_data(
    prompt_id: str, data: FailedData, ts: float, *, executed: list[str] | None = None
) -> dict[str, Any]:
    """`execution_error`'s data from a Failed event's data."""
    return {
        "prompt_id": prompt_id,
        "node_id": data.node_id,
        "node_type": data.node_type,
        "executed": list(executed or []),
        "exception_message": data.message,
        "exception_type": data.exception_type or data.code,
        "traceback": list(data.traceback),
        "current_inputs": {},
        "current_outputs": [],
        "timestamp": ms(ts),
    }


# What ComfyUI keeps of a run's messages in its history entry (`status.messages`).
HISTORY_TYPES = frozenset(
    {
        "execution_start",
        "execution_cached",
        "execution_success",
        "execution_error",
        "execution_interrupted",
    }
)


def history_messages(prompt_id: str, events: list[Event]) -> list[list[Any]]:
    """`status.messages` of the job's last run, told from its events as the socket told them."""
    relay = PromptRelay(prompt_id)
    kept: list[list[Any]] = []
    for event in events:
        if isinstance(event, Running | Retried):
            kept.clear()  # one server's history holds only the run it made
        kept += [
            [m.type, m.data]
            for m in relay.translate(event)
            if isinstance(m, Outgoing) and m.type in HISTORY_TYPES
        ]
    return kept


def queue_item(entry: Entry) -> list[Any]:
    """`[number, prompt_id, prompt, extra_data, outputs_to_execute]`, as in /queue and history."""
    prompt = entry.prompt
    extra = dict(prompt.extra_data)
    if prompt.client_id is not None:
        extra["client_id"] = prompt.client_id
    extra["create_time"] = prompt.created_ms
    return [entry.number, prompt.prompt_id, prompt.prompt, extra, list(prompt.outputs_to_execute)]
