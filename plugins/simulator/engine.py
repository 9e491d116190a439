"""The prompt queue and its single worker: validation on submit, execution, cache, history.

One asyncio task runs prompts one at a time, lowest `number` first. Every message it produces
goes through the Hub synchronously, so per-client order is the order of production.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from gateway.comfyui.graph import ExecutionList, is_link, signatures
from gateway.comfyui.nodedef import NodeDef
from gateway.comfyui.shape import node_models
from gateway.comfyui.validation import Validator

from .config import SimulatorConfig
from .costs import HeldModels, load_seconds, sampling_step_seconds
from .folders import Folders
from .history import History, QueueItem
from .hub import Hub
from .images import format_value
from .nodedefs import NodeRegistry
from .nodes import RUNNERS, Interrupted, NodeError, fingerprint, resolve_annotated
from .progress import NodeContext, ProgressState
from .tracebacks import EXECUTION_FRAMES, node_frame

log = logging.getLogger(__name__)

SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


def now_ms() -> int:
    return int(time.time() * 1000)


class BadRequest(Exception):
    """The request body cannot be processed (the real server answers 500)."""


class Crashed(Exception):
    """Raised inside the worker when an injected crash fires."""


@dataclass
class _CacheEntry:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None


@dataclass
class _Run:
    """State of the prompt being executed."""

    item: QueueItem
    client_id: str | None
    signatures: dict[str, Hashable]
    progress: ProgressState
    messages: list[list[Any]] = field(default_factory=list)
    values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    ui_outputs: dict[str, dict[str, Any]] = field(default_factory=dict)


class Engine:
    """Queue, worker, cache and history of one simulated server."""

    def __init__(
        self,
        config: SimulatorConfig,
        folders: Folders,
        registry: NodeRegistry,
        hub: Hub,
        on_crash: Callable[[], None],
    ) -> None:
        self.config = config
        self.folders = folders
        self.registry = registry
        self.hub = hub
        self.history = History()
        self.hang = config.hang_queue
        # Open unless a test holds them (Simulator.hold_setup, hold_nodes): a started prompt
        # waits at the first before its nodes, as on a real server slow to start executing,
        # and a node of a held type at its own.
        self.setup_gate = asyncio.Event()
        self.setup_gate.set()
        self.node_gates: dict[str, asyncio.Event] = {}
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.running: QueueItem | None = None
        self._on_crash = on_crash
        self._heap: list[tuple[tuple[int | float, str, int], QueueItem]] = []
        self._number = 0
        self._seq = itertools.count()
        self._cache: dict[Hashable, _CacheEntry] = {}
        # Loader outputs kept beyond the last prompt: the models the server holds.
        self.held = HeldModels(config.resident_models, lambda key: self._cache.pop(key, None))
        self._interrupt = False
        self._wake = asyncio.Event()
        self._started = 0
        self.validator = Validator(registry, self.image_exists)

    # --- queue -------------------------------------------------------------------------

    def image_exists(self, name: str) -> bool:
        path = resolve_annotated(name, self.folders.get)
        return path is not None and path.is_file()

    @property
    def next_number(self) -> int:
        """The `number` the next prompt without an explicit one will get."""
        return self._number

    def queue_remaining(self) -> int:
        return len(self._heap) + (1 if self.running is not None else 0)

    def status_data(self) -> dict[str, Any]:
        return {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}

    def queue_updated(self) -> None:
        self.hub.send("status", self.status_data(), None)

    def pending(self) -> list[QueueItem]:
        """Pending items in heap order (not sorted), like the real `queue_pending`."""
        return [item for _, item in self._heap]

    def submit(self, body: Any) -> tuple[int, dict[str, Any]]:
        """POST /prompt: (status, JSON body)."""
        if not isinstance(body, dict):
            raise BadRequest("the body is not a JSON object")
        if "number" in body:
            try:
                number: int | float = float(body["number"])
            except (TypeError, ValueError) as exc:
                raise BadRequest(str(exc)) from exc
        else:
            number = self._number
            if body.get("front"):
                number = -number
            self._number += 1
        if "prompt" not in body:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return 400, {"error": error, "node_errors": {}}
        prompt = body["prompt"]
        if not isinstance(prompt, dict):
            raise BadRequest("prompt is not a JSON object")
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        partial = body.get("partial_execution_targets")
        result = self.validator.validate(prompt, partial if isinstance(partial, list) else None)
        extra_data: dict[str, Any] = body.get("extra_data", {})
        if not isinstance(extra_data, dict):
            raise BadRequest("extra_data is not a JSON object")
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not result.ok:
            return 400, {"error": result.error, "node_errors": result.node_errors}
        sensitive = {k: extra_data.pop(k) for k in SENSITIVE_EXTRA_DATA_KEYS if k in extra_data}
        extra_data["create_time"] = now_ms()
        item = QueueItem(
            number, prompt_id, prompt, extra_data, result.outputs, sensitive, next(self._seq)
        )
        heapq.heappush(self._heap, (item.heap_key(), item))
        self.queue_updated()
        self._wake.set()
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors}

    def delete_pending(self, prompt_ids: list[Any]) -> None:
        for prompt_id in prompt_ids:
            for index, (_, item) in enumerate(self._heap):
                if item.prompt_id != prompt_id:
                    continue
                if len(self._heap) == 1:
                    self.clear_pending()
                else:
                    self._heap.pop(index)
                    heapq.heapify(self._heap)
                self.queue_updated()
                break

    def clear_pending(self) -> None:
        self._heap.clear()
        self.queue_updated()

    @property
    def interrupt_requested(self) -> bool:
        """Whether the running prompt has been told to stop (it stops at its next node)."""
        return self._interrupt

    def interrupt(self, prompt_id: Any) -> None:
        """Targeted when `prompt_id` is given (only the running prompt), else global."""
        if prompt_id:
            if self.running is not None and self.running.prompt_id == prompt_id:
                self._interrupt = True
        else:
            self._interrupt = True

    def free_models(self, *, free_memory: bool) -> None:
        """`POST /free`: the held models leave; with `free_memory`, the whole cache too."""
        self.held.clear()
        if free_memory:
            self._cache.clear()

    def set_hang(self, hang: bool) -> None:
        self.hang = hang
        self._wake.set()

    # --- worker ------------------------------------------------------------------------

    async def run(self) -> None:
        """The worker: run prompts until cancelled or crashed."""
        try:
            while True:
                while not self._heap or self.hang:
                    self._wake.clear()
                    await self._wake.wait()
                limit = self.config.crash_after_prompts
                if limit is not None and self._started >= limit:
                    self._crash()
                _, item = heapq.heappop(self._heap)
                self._started += 1
                self.running = item
                self.queue_updated()
                await self._execute(item)
        except Crashed:
            log.warning("simulated crash: the worker stopped")

    def _crash(self) -> None:
        self._on_crash()
        raise Crashed

    async def _execute(self, item: QueueItem) -> None:
        client = item.extra_data.get("client_id")
        client_id = client if isinstance(client, str) else None
        self.client_id = client_id
        self._interrupt = False
        prompt = item.prompt
        run = _Run(
            item=item,
            client_id=client_id,
            signatures=signatures(prompt, self._fingerprint(prompt), self._include_id(prompt)),
            progress=ProgressState(self.hub, item.prompt_id, client_id),
        )
        self._message(run, "execution_start", {"prompt_id": item.prompt_id}, broadcast=False)
        if self.config.setup_duration() > 0:
            await asyncio.sleep(self.config.setup_duration())
        await self.setup_gate.wait()
        live = set(run.signatures.values()) | self.held.signatures()
        self._cache = {key: entry for key, entry in self._cache.items() if key in live}
        cached = [node_id for node_id in prompt if run.signatures[node_id] in self._cache]
        for node_id in cached:  # a held model served again is the most recently used
            self.held.used(run.signatures[node_id], node_models(prompt[node_id]))
        self._message(
            run, "execution_cached", {"nodes": cached, "prompt_id": item.prompt_id}, False
        )
        todo = ExecutionList(
            prompt,
            is_output=lambda n: self._definition(prompt, n).is_output,
            is_cached=lambda n: run.signatures.get(n) in self._cache,
        )
        for output in item.outputs:
            todo.add_node(output)
        success = True
        while not todo.is_empty():
            node_id = todo.next_node()
            if not await self._run_node(run, node_id):
                success = False
                break
            todo.complete(node_id)
        if success:
            self._message(run, "execution_success", {"prompt_id": item.prompt_id}, False)
        self.last_node_id = None
        result = {
            "outputs": {nid: ui["output"] for nid, ui in run.ui_outputs.items()},
            "meta": {nid: ui["meta"] for nid, ui in run.ui_outputs.items()},
        }
        status = {
            "status_str": "success" if success else "error",
            "completed": success,
            "messages": run.messages,
        }
        self.history.add(item, result, status)
        self.running = None
        self.queue_updated()
        if client_id is not None:
            self.hub.send("executing", {"node": None, "prompt_id": item.prompt_id}, client_id)

    def _message(self, run: _Run, event: str, data: dict[str, Any], broadcast: bool) -> None:
        data = {**data, "timestamp": now_ms()}
        run.messages.append([event, data])
        if run.client_id is not None or broadcast:
            self.hub.send(event, data, run.client_id)

    def _definition(self, prompt: dict[str, Any], node_id: str) -> NodeDef:
        definition = self.registry.get(prompt[node_id]["class_type"])
        assert definition is not None, "validated prompts only name known classes"
        return definition

    def _fingerprint(self, prompt: dict[str, Any]) -> Callable[[str], Any]:
        return lambda n: fingerprint(prompt[n]["class_type"], prompt[n]["inputs"], self.folders.get)

    def _include_id(self, prompt: dict[str, Any]) -> Callable[[str], bool]:
        def include(node_id: str) -> bool:
            definition = self.registry.get(prompt[node_id].get("class_type", ""))
            return definition is not None and (
                definition.has_unique_id or definition.not_idempotent
            )

        return include

    def _gather(self, run: _Run, node_id: str, definition: NodeDef) -> dict[str, Any]:
        node = run.item.prompt[node_id]
        inputs: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            if name not in definition.inputs:
                continue
            if is_link(value):
                source = value[0]
                if source not in run.values:  # cached upstream nodes are not in the run list
                    run.values[source] = self._cache[run.signatures[source]].outputs
                inputs[name] = run.values[source][int(value[1])]
            else:
                inputs[name] = value
        hidden = {
            "PROMPT": run.item.prompt,
            "EXTRA_PNGINFO": run.item.extra_data.get("extra_pnginfo"),
            "UNIQUE_ID": node_id,
        }
        for name, kind in definition.hidden.items():
            inputs[name] = hidden.get(kind)
        return inputs

    def _matches(self, selector: str | None, node_id: str, class_type: str) -> bool:
        return selector is not None and selector in (node_id, class_type)

    async def _run_node(self, run: _Run, node_id: str) -> bool:
        """Run (or replay from cache) one node; False when the prompt must stop."""
        prompt_id = run.item.prompt_id
        class_type = run.item.prompt[node_id]["class_type"]
        definition = self._definition(run.item.prompt, node_id)
        entry = self._cache.get(run.signatures[node_id])
        if entry is not None:
            if run.client_id is not None:
                output = entry.ui["output"] if entry.ui is not None else None
                data = {"node": node_id, "display_node": node_id, "output": output}
                self.hub.send("executed", {**data, "prompt_id": prompt_id}, run.client_id)
                if entry.ui is not None:
                    run.ui_outputs[node_id] = entry.ui
            run.values[node_id] = entry.outputs
            run.progress.finish(node_id)
            return True
        run.progress.start(node_id)
        if run.client_id is not None:
            self.last_node_id = node_id
            data = {"node": node_id, "display_node": node_id, "prompt_id": prompt_id}
            self.hub.send("executing", data, run.client_id)
        sampling = [0.0]  # the sampler's time per step on its latent, once inputs are known
        context = NodeContext(
            run.progress,
            node_id,
            lambda: self._interrupt,
            folder=self.folders.get,
            step_seconds=lambda: self.config.step_duration() + sampling[0],
            sampler_previews=self.config.sampler_previews,
        )
        inputs: dict[str, Any] = {}
        try:
            inputs = self._gather(run, node_id, definition)
            sampling[0] = sampling_step_seconds(self.config, inputs)
            # ComfyUI's worker is a thread: between two nodes its server has answered what
            # came meanwhile, an /interrupt among them, however quick the nodes are.
            await asyncio.sleep(0)
            if self._interrupt:
                raise Interrupted
            if self._matches(self.config.crash_on_node, node_id, class_type):
                self._crash()
            loads = load_seconds(self.config, run.item.prompt[node_id])
            if (gate := self.node_gates.get(class_type)) is not None:
                await gate.wait()
            await asyncio.sleep(max(0.0, self.config.seconds_for(class_type) + loads))
            if any(self._matches(s, node_id, class_type) for s in self.config.fail_nodes):
                raise NodeError(
                    self.config.fail_exception_type,
                    self.config.fail_exception_message + "\n",
                    [*EXECUTION_FRAMES, node_frame(class_type, "execute")],
                )
            try:
                result = await RUNNERS[class_type](inputs, context)
            except (NodeError, Interrupted):
                raise
            except Exception as exc:
                # A bug or an odd input in a fake node: report it like ComfyUI reports a
                # node's exception rather than killing the queue worker.
                log.exception("node %s (%s) raised", node_id, class_type)
                frames = [*EXECUTION_FRAMES, node_frame(class_type, "execute")]
                raise NodeError(type(exc).__name__, f"{exc}\n", frames) from exc
        except Interrupted:
            data = {"prompt_id": prompt_id, "node_id": node_id, "node_type": class_type}
            data["executed"] = list(reversed(run.executed))
            self._message(run, "execution_interrupted", data, broadcast=True)
            return False
        except NodeError as exc:
            data = {
                "prompt_id": prompt_id,
                "node_id": node_id,
                "node_type": class_type,
                "executed": list(reversed(run.executed)),
                "exception_message": exc.message,
                "exception_type": exc.exception_type,
                "traceback": exc.frames,
                "current_inputs": {k: [format_value(v)] for k, v in inputs.items()},
                "current_outputs": list(reversed(list(run.item.prompt))),
            }
            self._message(run, "execution_error", data, broadcast=False)
            return False
        ui: dict[str, Any] | None = None
        if result.ui:
            meta = {"node_id": node_id, "display_node": node_id, "parent_node": None}
            ui = {"output": result.ui, "meta": {**meta, "real_node_id": node_id}}
            run.ui_outputs[node_id] = ui
            if run.client_id is not None:
                data = {"node": node_id, "display_node": node_id, "output": result.ui}
                self.hub.send("executed", {**data, "prompt_id": prompt_id}, run.client_id)
        self._cache[run.signatures[node_id]] = _CacheEntry(result.outputs, ui)
        self.held.used(run.signatures[node_id], node_models(run.item.prompt[node_id]))
        run.values[node_id] = result.outputs
        run.executed.append(node_id)
        run.progress.finish(node_id)
        return True
