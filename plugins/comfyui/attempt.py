"""The state one attempt of one job shares between running, following and concluding it."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from nats.js.kv import KeyValue

from gateway.bus.contract import (
    CancelledData,
    Event,
    FailedData,
    Job,
    OutputFile,
    RetriedData,
    RunningData,
    SucceededData,
    event_type,
    now,
)
from gateway.bus.events import EventPublisher
from gateway.comfyui.outputs import WEBSOCKET_OUTPUT_CLASSES
from gateway.storage import Storage
from plugins.comfyui.client import ComfyClient
from plugins.comfyui.images import FrameImage
from plugins.comfyui.inputfiles import JobFiles
from plugins.comfyui.options import AdapterOptions
from plugins.comfyui.outputs import OutputSaver
from plugins.comfyui.progress import NUDGE, Follower, Watch
from plugins.comfyui.residency import Residency
from plugins.comfyui.sending import JobEvents

Outcome = SucceededData | FailedData | CancelledData | RetriedData


@dataclass
class RunContext:
    """What every job of one adapter shares."""

    server_id: str
    address: str
    client: ComfyClient
    follower: Follower
    publisher: EventPublisher
    storage: Storage
    jobs_kv: KeyValue
    options: AdapterOptions
    unhealthy: Callable[[], str | None]
    """Why ComfyUI is unhealthy right now, or None when it answers."""
    residency: Residency = field(default_factory=Residency)
    """The models the server holds, as its prompts told (for the heartbeat)."""


@dataclass
class Result:
    """How an attempt ends, with ComfyUI's history of it when there is one."""

    data: Outcome
    history: dict[str, Any] | None = None
    server_fault: bool = False
    """The server failed the job while it answers (an error to the prompt, outputs it could
    not store): see breaker.py."""


@dataclass
class Stop:
    """A cancel or a hand-back asked of a running attempt."""

    kind: Literal["cancel", "hand_back"]
    reason: str
    counts: bool = True  # a hand-back that is no failure (the adapter stopping) does not


@dataclass
class Seen:
    """What the socket has told of the prompt so far."""

    outputs: set[str] = field(default_factory=set)
    current_node: str | None = None


class Attempt:
    """One attempt's state: what was asked of it, what ComfyUI said, its events and outputs."""

    def __init__(
        self, ctx: RunContext, job: Job, *, announced: bool, started_at: float | None = None
    ) -> None:
        """`started_at`: when this attempt's prompt started running (wall clock), if it did
        before this delivery (an adapter that restarted): its time counts from then."""
        self.ctx = ctx
        self.job = job
        self.prompt_id = job.prompt_id
        self.started = False
        self.stop: Stop | None = None
        self.stop_changed = asyncio.Event()
        self.watch: Watch | None = None
        self.workflow: dict[str, Any] = job.request.workflow
        self.node_errors: dict[str, Any] = {}
        self.announced = announced
        self.timed_out = False
        self.history_sent = False
        self.seen = Seen()
        self.events = JobEvents(ctx.publisher, job.job_id, on_ended=self._ended_elsewhere)
        self.outputs = OutputSaver(ctx.client, ctx.storage, job.job_id)
        self.files = JobFiles(ctx.client, job.job_id, job.attempt, ctx.options.comfyui_input_dir)
        self.timeout = job.request.timeout_s or ctx.options.default_timeout_s
        self._loop = asyncio.get_running_loop()
        # The job's time is its run on ComfyUI: it counts from `running`, like the balancer's
        # timing of the server, not while the prompt waits behind another job there. That
        # wait has its own bound (`start_wait_s`).
        self.deadline = math.inf
        self.start_by = self._loop.time() + ctx.options.start_wait_s
        self._started_at = started_at

    def request_stop(self, stop: Stop) -> None:
        """Ask the attempt to stop; a cancel is never overridden by a hand-back."""
        if self.stop is not None and self.stop.kind == "cancel":
            return
        self.stop = stop
        self.stop_changed.set()
        if self.watch is not None:
            self.watch.put(NUDGE)

    def _ended_elsewhere(self, end: Event) -> None:
        # The job's log ended without this attempt (a cancel, say): stop the prompt now
        # rather than run it to the end for nothing.
        self.request_stop(Stop("cancel", f"the job ended meanwhile ({event_type(end)})"))

    def register_watch(self) -> Watch:
        """Follow the prompt's messages from now on."""
        watch = self.ctx.follower.watch(self.prompt_id)
        watch.on_image = self._take_image
        self.watch = watch
        if self.stop is not None:
            watch.put(NUDGE)
        return watch

    async def _take_image(self, image: FrameImage, frame: bytes) -> OutputFile | None:
        """Store an image the prompt sent over the websocket, if it is an output: one sent
        while a SaveImageWebsocket node executes (latent previews are not)."""
        if self.class_of(image.node_id) not in WEBSOCKET_OUTPUT_CLASSES:
            return None
        return await self.outputs.websocket_image(
            image.node_id, image.content_type, frame, image.offset
        )

    def mark_started(self) -> None:
        """The prompt reached execution: its time starts; say `running` (once per attempt)."""
        if not self.started:
            ran = 0.0 if self._started_at is None else max(0.0, now() - self._started_at)
            self.deadline = self._loop.time() + self.timeout - ran
        self.started = True
        # Sent when execution starts, not when the prompt is queued: the balancer counts a
        # run and times the server's speed from this event, and a prompt waiting behind
        # another job on ComfyUI is neither. It carries the 200's node_errors if any.
        if self.announced:
            return
        self.announced = True
        self.events.soon(
            RunningData(
                attempt=self.job.attempt, prompt_id=self.prompt_id, node_errors=self.node_errors
            )
        )

    async def clear_inputs(self) -> None:
        """Delete or empty the attempt's input files on ComfyUI (before its end is told, so
        whoever learns of the end can rely on it); failures are logged."""
        await self.files.clear(self.ctx.unhealthy())

    def class_of(self, node_id: str) -> str | None:
        """The node's class_type in the workflow that runs, if it names one."""
        node = self.workflow.get(node_id)
        if isinstance(node, dict) and isinstance(node.get("class_type"), str):
            return str(node["class_type"])
        return None

    def failed(
        self,
        code: str,
        message: str,
        history: dict[str, Any] | None = None,
        *,
        retryable: bool = False,
        server_fault: bool = False,
    ) -> Result:
        """The attempt ends `failed`."""
        data = FailedData(code=code, message=message, attempt=self.job.attempt, retryable=retryable)
        return Result(data, history, server_fault)

    def retried(
        self,
        reason: str,
        history: dict[str, Any] | None = None,
        *,
        counts: bool = True,
        server_fault: bool = False,
    ) -> Result:
        """The attempt goes back to the balancer (`retried`)."""
        data = RetriedData(
            attempt=self.job.attempt,
            reason=reason,
            started=self.started,
            previous_server_id=self.ctx.server_id,
            counts=counts,
        )
        return Result(data, history, server_fault)

    def server_failed(self, reason: str) -> Result:
        """The server, while answering, failed the attempt (a 5xx to the prompt): `retried`."""
        return self.retried(reason, server_fault=True)

    def cancelled(self, reason: str, history: dict[str, Any] | None = None) -> Result:
        """The attempt ends `cancelled`."""
        return Result(CancelledData(reason=reason, attempt=self.job.attempt), history)
