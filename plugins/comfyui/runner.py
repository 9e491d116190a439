"""One attempt of one job on ComfyUI, from the JetStream message to its acknowledgement.

    look for the prompt on ComfyUI (a redelivered job may be there already: adopt it)
    → upload inputs, apply overrides → POST /prompt
    → follow it (websocket messages, or polling when the socket is gone)
    → `running` once it executes, node events
    → its history → `history`, then exactly one of succeeded | failed | cancelled | retried
    → ack

The prompt id is derived from the job id and attempt, so whatever happened before this delivery
(an adapter killed mid-job, say), the prompt is found again instead of run twice. Nothing waits
without a deadline: a job has its timeout, a silent socket is cross-checked, an unreachable
ComfyUI makes the job go back to the balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from gateway.bus.contract import (
    CancelledData,
    Event,
    EventData,
    FailedData,
    HistoryData,
    Job,
    JobRecord,
    JobStatus,
    NodeCachedData,
    NodeOutputData,
    NodeProgressData,
    NodeStartedData,
    RetriedData,
    RunningData,
    SucceededData,
    decode,
    now,
)
from gateway.bus.events import EventPublisher, EventPublishError
from gateway.comfyui.workflow import WorkflowError
from gateway.storage import Storage, StorageError
from plugins.comfyui import failures
from plugins.comfyui.client import (
    ComfyClient,
    ComfyError,
    ComfyUnavailable,
    FileMissing,
    PromptRejected,
)
from plugins.comfyui.inputs import InputProblem, prepare_workflow
from plugins.comfyui.messages import (
    Executed,
    Executing,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    HistoryEntry,
    Progress,
    WsMessage,
)
from plugins.comfyui.options import AdapterOptions
from plugins.comfyui.outputs import OutputSaver
from plugins.comfyui.progress import NUDGE, Follower, Item, Lost, Nudge, Watch

log = logging.getLogger(__name__)

T = TypeVar("T")
# A history event must fit in one NATS message (1 MB by default) with room for the envelope.
_MAX_HISTORY_BYTES = 900_000

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


@dataclass
class _Found:
    kind: Literal["done", "running", "pending", "absent"]
    raw: dict[str, Any] | None = None
    entry: HistoryEntry | None = None


@dataclass
class _End:
    kind: Literal["done", "dequeued", "stuck", "unreachable", "vanished"]
    found: _Found | None = None
    reason: str = ""


@dataclass
class _Result:
    data: Outcome
    history: dict[str, Any] | None = None


class _Stopped(Exception):
    """A cancel or hand-back arrived before the prompt was submitted."""


@dataclass
class _Stop:
    kind: Literal["cancel", "hand_back"]
    reason: str


@dataclass
class _Seen:
    outputs: set[str] = field(default_factory=set)
    current_node: str | None = None


class JobRun:
    """One job on this server. `run()` never raises: every end is an event (or a redelivery)."""

    def __init__(self, ctx: RunContext, job: Job, msg: Msg, record: JobRecord) -> None:
        self.ctx = ctx
        self.job = job
        self.msg = msg
        self.record = record
        self.prompt_id = job.prompt_id
        self.submitted = False
        self.started = False
        self.finished = asyncio.Event()
        self.concluded = False  # its end is in the event log
        self._stop: _Stop | None = None
        self._stop_changed = asyncio.Event()
        self._watch: Watch | None = None
        self._workflow: dict[str, Any] = job.request.workflow
        self._node_errors: dict[str, Any] = {}
        self._announced = record.status is JobStatus.RUNNING
        self._timed_out = False
        self._history_sent = False
        self._seen = _Seen()
        # Progress events on their way to the stream (see _emit_soon).
        self._sending: set[asyncio.Task[Event]] = set()
        self._send_failed: BaseException | None = None  # the first progress event lost
        self._outputs = OutputSaver(ctx.client, ctx.storage, job.job_id)
        timeout = job.request.timeout_s or ctx.options.default_timeout_s
        self._timeout = timeout
        self._deadline = asyncio.get_running_loop().time() + timeout

    # -- requests from outside ----------------------------------------------------------------

    def cancel(self, reason: str) -> None:
        """Stop the job: dequeue or interrupt it on ComfyUI; it ends `cancelled`."""
        self._request_stop(_Stop("cancel", reason))

    def hand_back(self, reason: str, *, only_unsubmitted: bool = False) -> bool:
        """Give the job back to the balancer (`retried`); True if the request was taken."""
        if only_unsubmitted and self.submitted:
            return False
        if self._stop is not None:
            return False  # a cancel wins over a hand-back
        self._request_stop(_Stop("hand_back", reason))
        return True

    def _request_stop(self, stop: _Stop) -> None:
        if self._stop is not None and self._stop.kind == "cancel":
            return
        self._stop = stop
        self._stop_changed.set()
        if self._watch is not None:
            self._watch.put(NUDGE)

    # -- the life of the job ------------------------------------------------------------------

    async def run(self) -> None:
        """Run the attempt, publish its end, ack. Never raises (except cancellation)."""
        keepalive = asyncio.create_task(self._keepalive(), name=f"keepalive-{self.job.job_id}")
        # Learn where the job's event subject ends while ComfyUI takes the prompt, so the
        # `running` event goes out in one round trip instead of two.
        priming = asyncio.create_task(self._prime(), name=f"prime-{self.job.job_id}")
        try:
            result = await self._attempt()
            await self._conclude(result)
        except (EventPublishError, nats.errors.Error) as exc:
            # The end could not be published: leave the job to JetStream, which redelivers
            # it; the next delivery finds the prompt on ComfyUI and finishes it.
            log.error("job %s: NATS trouble (%s); it will be redelivered", self.job.job_id, exc)
            with contextlib.suppress(nats.errors.Error):
                await self.msg.nak(delay=2)
        except Exception as exc:
            log.exception("job %s: the adapter failed", self.job.job_id)
            await self._fail_safely(exc)
        finally:
            keepalive.cancel()
            priming.cancel()
            for sending in list(self._sending):
                sending.cancel()
            self._outputs.cancel()
            self.ctx.follower.unwatch(self.prompt_id)
            self.finished.set()

    async def _prime(self) -> None:
        try:
            await self.ctx.publisher.prime(self.job.job_id)
        except (EventPublishError, nats.errors.Error) as exc:
            # Only a shortcut: the first emit reads the subject itself.
            log.debug("job %s: could not read its event subject yet: %s", self.job.job_id, exc)

    async def _fail_safely(self, exc: Exception) -> None:
        data = FailedData(
            code=failures.ADAPTER_ERROR,
            message=f"the adapter failed while running the job: {type(exc).__name__}: {exc}",
            attempt=self.job.attempt,
            retryable=True,
        )
        try:
            await self._drop_outputs()
            await self._emit(data)
            self.concluded = True
            await self.msg.ack()
        except (EventPublishError, nats.errors.Error):
            log.exception(
                "job %s: could not report the failure; leaving it for redelivery", self.job.job_id
            )

    async def _keepalive(self) -> None:
        # Tell JetStream the job is being worked on, so a long job is not redelivered; an
        # adapter that dies stops sending this and the job comes back after ack_wait.
        interval = max(0.2, self.ctx.options.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.msg.in_progress()
            except nats.errors.Error as exc:
                log.warning("job %s: in_progress failed: %s", self.job.job_id, exc)

    def _first_delivery(self) -> bool:
        """Whether no adapter ever received this job before (so none can have submitted it)."""
        try:
            delivered = self.msg.metadata.num_delivered
        except (ValueError, IndexError, nats.errors.Error):
            return False
        return bool(delivered == 1 and self.record.status is JobStatus.DISPATCHED)

    async def _attempt(self) -> _Result:
        if self._first_delivery():
            # Nothing to adopt: spare ComfyUI two requests per job.
            return await self._submit_and_follow()
        try:
            found = await self._lookup()
        except ComfyError as exc:
            return self._retried(f"ComfyUI at {self.ctx.address} is not answering: {exc}")
        if found.kind != "absent":
            return await self._adopt(found)
        if self.record.status is JobStatus.RUNNING:
            # This attempt was submitted before (its `running` event is in the record), yet
            # ComfyUI knows nothing of it: ComfyUI restarted and lost its queue.
            self.started = True
            return self._retried("ComfyUI lost the prompt (it restarted?)")
        return await self._submit_and_follow()

    async def _adopt(self, found: _Found) -> _Result:
        log.info(
            "job %s: prompt %s is already on ComfyUI (%s); adopting it",
            self.job.job_id,
            self.prompt_id,
            found.kind,
        )
        self.submitted = True
        if found.entry is not None and found.entry.workflow:
            self._workflow = found.entry.workflow
        if found.kind in ("done", "running"):
            self._mark_started()
        if found.kind == "done":
            assert found.raw is not None and found.entry is not None
            return await self._from_history(found.raw, found.entry)
        # Its messages go to the client id of whoever submitted it: follow it by polling.
        watch = self._register_watch()
        watch.live = False
        return await self._end_of(await self._follow(watch))

    async def _submit_and_follow(self) -> _Result:
        reason = self.ctx.unhealthy()
        if reason is not None:
            return self._retried(f"ComfyUI at {self.ctx.address} is unhealthy: {reason}")
        options = self.ctx.options
        try:
            workflow = await self._unless_stopped(
                prepare_workflow(
                    self.ctx.client,
                    self.ctx.storage,
                    self.job,
                    max_bytes=options.max_input_bytes,
                    url_timeout=options.url_timeout_s,
                    url_allowlist=options.url_allowlist,
                )
            )
        except _Stopped:
            return self._stopped_before_submit()
        except WorkflowError as exc:
            return self._failed(failures.VALIDATION_ERROR, str(exc))
        except InputProblem as exc:
            return self._failed(failures.INPUT_ERROR, str(exc))
        except ComfyUnavailable as exc:
            return self._retried(f"ComfyUI became unreachable while receiving inputs: {exc}")
        except ComfyError as exc:
            return self._failed(failures.INPUT_ERROR, str(exc))
        if self._stop is not None:
            return self._stopped_before_submit()
        self._workflow = workflow
        watch = self._register_watch()
        try:
            accepted = await self.ctx.client.submit(
                workflow, client_id=self.ctx.follower.client_id, prompt_id=self.prompt_id
            )
        except PromptRejected as exc:
            data = failures.validation_failure(exc.rejection, workflow, self.job.attempt)
            log.info("job %s: %s", self.job.job_id, data.message)
            return _Result(data)
        except ComfyUnavailable as exc:
            # The prompt may have been queued before the answer was lost: look before leaving.
            try:
                found = await self._lookup()
            except ComfyError:
                return self._retried(f"ComfyUI became unreachable at submission: {exc}")
            if found.kind == "absent":
                return self._retried(f"ComfyUI did not accept the prompt: {exc}")
            return await self._adopt(found)
        self.submitted = True
        if accepted.node_errors:
            self._node_errors = accepted.node_errors
            lines = failures.describe_node_errors(accepted.node_errors, workflow)
            log.warning(
                "job %s: ComfyUI dropped some outputs and runs the rest: %s",
                self.job.job_id,
                "; ".join(lines),
            )
        return await self._end_of(await self._follow(watch))

    def _register_watch(self) -> Watch:
        watch = self.ctx.follower.watch(self.prompt_id)
        self._watch = watch
        if self._stop is not None:
            watch.put(NUDGE)
        return watch

    async def _unless_stopped(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work`, abandoning it if a cancel or hand-back arrives meanwhile."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self._stop_changed.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise _Stopped

    def _stopped_before_submit(self) -> _Result:
        assert self._stop is not None
        if self._stop.kind == "cancel":
            return _Result(CancelledData(reason=self._stop.reason, attempt=self.job.attempt))
        return self._retried(self._stop.reason)

    def _mark_started(self) -> None:
        """The prompt reached execution: say `running` (once per attempt)."""
        self.started = True
        self._announce_running()

    def _announce_running(self) -> None:
        # Sent when execution starts, not when the prompt is queued: the balancer counts a
        # run and times the server's speed from this event, and a prompt waiting behind
        # another job on ComfyUI is neither. It carries the 200's node_errors if any.
        if self._announced:
            return
        self._announced = True
        self._emit_soon(
            RunningData(
                attempt=self.job.attempt, prompt_id=self.prompt_id, node_errors=self._node_errors
            )
        )

    # -- following the prompt -----------------------------------------------------------------

    async def _lookup(self) -> _Found:
        """Where the prompt is on ComfyUI: finished (with its history), running, pending, absent."""
        found = await self.ctx.client.history(self.prompt_id)
        if found is not None:
            return _Found("done", found[0], found[1])
        position = (await self.ctx.client.queue()).position(self.prompt_id)
        if position is None:
            return _Found("absent")
        if position == 0:
            return _Found("running")
        log.debug("job %s: pending on ComfyUI at position %d", self.job.job_id, position)
        return _Found("pending")

    async def _stop_on_comfy(self) -> Literal["dequeued", "interrupting", "gone", "unknown"]:
        """Dequeue the prompt if pending, interrupt it if (and only if) it is the running one."""
        client = self.ctx.client
        try:
            queue = await client.queue()
            if self.prompt_id in queue.pending_ids():
                await client.delete_pending([self.prompt_id])
                queue = await client.queue()
                if self.prompt_id not in queue.running_ids() + queue.pending_ids():
                    if await client.history(self.prompt_id) is None:
                        log.info("job %s: removed from ComfyUI's queue", self.job.job_id)
                        return "dequeued"
                    return "gone"
            if self.prompt_id in queue.running_ids():
                # ComfyUI checks the id: this never interrupts another job's prompt.
                await client.interrupt(self.prompt_id)
                log.info("job %s: interrupt sent to ComfyUI", self.job.job_id)
                return "interrupting"
        except ComfyError as exc:
            log.warning("job %s: could not stop the prompt on ComfyUI: %s", self.job.job_id, exc)
            return "unknown"
        return "gone"

    async def _follow(self, watch: Watch) -> _End:
        """Follow the prompt until it leaves ComfyUI (or must be given up)."""
        loop = asyncio.get_running_loop()
        options = self.ctx.options
        stop_seen = False
        ending = False
        absent = 0
        unreachable_since: float | None = None
        give_up_at = math.inf
        while True:
            now = loop.time()
            if self._stop is not None and not stop_seen:
                stop_seen = True
                if await self._stop_on_comfy() == "dequeued":
                    return _End("dequeued")
                give_up_at = min(give_up_at, now + options.stop_wait_s)
            if not self._timed_out and now >= self._deadline:
                self._timed_out = True
                log.warning("job %s: timed out after %g s", self.job.job_id, self._timeout)
                if await self._stop_on_comfy() == "dequeued":
                    return _End("dequeued")
                give_up_at = min(give_up_at, now + options.stop_wait_s)
            if now >= give_up_at:
                return _End("stuck")
            if ending:
                wait = 0.1
            elif watch.live:
                wait = options.silence_s
            else:
                wait = options.poll_s
            limit = give_up_at if self._timed_out else min(give_up_at, self._deadline)
            item = await _next(watch, max(0.0, min(wait, limit - now)))
            if isinstance(item, Lost | Nudge):
                continue
            if item is not None:
                said = await self._on_message(item)
                if said is None:
                    continue
                if said == "ending" and not ending:
                    # execution_success/error/interrupted: /history can still be empty now;
                    # `executing` null follows within milliseconds and is the real end.
                    ending = True
                    continue
                ending = True
            # Silence, a polling tick, or the prompt just ended: ask ComfyUI.
            try:
                found = await self._lookup()
            except ComfyError as exc:
                now = loop.time()
                unreachable_since = now if unreachable_since is None else unreachable_since
                if now - unreachable_since >= options.unreachable_grace_s:
                    return _End("unreachable", reason=str(exc))
                continue
            unreachable_since = None
            if found.kind == "done":
                if watch.live and not ending:
                    # Open, yet it missed the end of our prompt: that socket is deaf.
                    self.ctx.follower.reconnect(f"it missed the end of prompt {self.prompt_id}")
                return _End("done", found)
            if found.kind == "running":
                self._mark_started()
            absent = absent + 1 if found.kind == "absent" else 0
            if absent >= 2:
                return _End("vanished")

    async def _on_message(self, message: WsMessage) -> Literal["ending", "ended"] | None:
        """Publish what a message means; say whether the prompt is ending or has ended."""
        match message:
            case ExecutionStart():
                self._mark_started()
            case ExecutionCached(data=data):
                if data.nodes:
                    self._emit_soon(NodeCachedData(node_ids=list(data.nodes)))
            case Executing(data=data):
                if data.node is None:
                    return "ended"  # `executing` with node null: the prompt is done
                self._mark_started()
                self._seen.current_node = data.node
                self._emit_soon(
                    NodeStartedData(node_id=data.node, class_type=self._class(data.node))
                )
            case Progress(data=data):
                node = data.node or self._seen.current_node
                if node is not None:
                    self._emit_soon(
                        NodeProgressData(node_id=node, value=int(data.value), max=int(data.max))
                    )
            case Executed(data=data):
                self._seen.outputs.add(data.node)
                self._outputs.early(data.node, data.output or {})
                self._emit_soon(NodeOutputData(node_id=data.node, output=data.output or {}))
            case ExecutionSuccess() | ExecutionError() | ExecutionInterrupted():
                return "ending"
        return None

    def _class(self, node_id: str) -> str | None:
        node = self._workflow.get(node_id)
        if isinstance(node, dict) and isinstance(node.get("class_type"), str):
            return str(node["class_type"])
        return None

    # -- how it ended -------------------------------------------------------------------------

    async def _end_of(self, end: _End) -> _Result:
        stop = self._stop
        match end.kind:
            case "done":
                assert end.found is not None and end.found.raw is not None
                assert end.found.entry is not None
                return await self._from_history(end.found.raw, end.found.entry)
            case "unreachable":
                return self._retried(
                    f"ComfyUI at {self.ctx.address} stopped answering during the job: {end.reason}"
                )
            case "vanished":
                return self._retried("ComfyUI lost the prompt (it restarted?)")
        # dequeued, or stopped and ComfyUI did not confirm within stop_wait_s.
        suffix = "" if end.kind == "dequeued" else " (ComfyUI did not confirm the interrupt)"
        if stop is not None and stop.kind == "cancel":
            return _Result(CancelledData(reason=stop.reason + suffix, attempt=self.job.attempt))
        if self._timed_out:
            return self._timeout_result(None, suffix)
        assert stop is not None
        return self._retried(stop.reason + suffix)

    def _timeout_result(self, history: dict[str, Any] | None, suffix: str = "") -> _Result:
        return _Result(
            FailedData(
                code=failures.TIMEOUT,
                message=f"the job did not finish within {self._timeout:g} s; "
                f"ComfyUI was told to stop it{suffix}",
                attempt=self.job.attempt,
                retryable=False,
            ),
            history,
        )

    async def _from_history(self, raw: dict[str, Any], entry: HistoryEntry) -> _Result:
        if entry.status is not None and entry.status.message("execution_start") is not None:
            self._mark_started()  # polled runs can start and end between two looks
        for node_id, output in entry.outputs.items():
            # Adopted, polled or cached runs: their outputs were not (all) seen on the socket.
            if node_id not in self._seen.outputs:
                self._seen.outputs.add(node_id)
                self._emit_soon(NodeOutputData(node_id=node_id, output=output))
        status = entry.status
        error = status.message("execution_error") if status is not None else None
        interrupted = status.message("execution_interrupted") if status is not None else None
        attempt = self.job.attempt
        if status is not None and status.status_str == "success" and error is None:
            return await self._succeeded(raw, entry)
        if error is not None:
            if failures.is_out_of_memory(error):
                return await self._out_of_memory(raw, error)
            data = failures.execution_failure(error, self._workflow, attempt)
            return _Result(data, raw)
        if interrupted is not None:
            stop = self._stop
            if stop is not None and stop.kind == "cancel":
                return _Result(CancelledData(reason=stop.reason, attempt=attempt), raw)
            if self._timed_out:
                return self._timeout_result(raw)
            if stop is not None:
                return self._retried(stop.reason, raw)
            node = interrupted.get("node_id")
            return self._failed(
                failures.INTERRUPTED,
                f"the prompt was interrupted on ComfyUI (at node {node}) by someone else",
                raw,
                retryable=True,
            )
        status_str = status.status_str if status is not None else "none"
        return self._failed(
            failures.COMFYUI_ERROR,
            f"ComfyUI ended the prompt with status {status_str!r} and gave no error",
            raw,
        )

    async def _succeeded(self, raw: dict[str, Any], entry: HistoryEntry) -> _Result:
        # The history event goes out while the outputs are stored; the terminal event still
        # waits for both.
        history = asyncio.create_task(self._emit_history(raw), name=f"history-{self.job.job_id}")
        try:
            outputs = await self._outputs.finish(entry.outputs)
        except FileMissing as exc:
            await history
            return self._failed(failures.OUTPUT_ERROR, str(exc), raw)
        except ComfyUnavailable as exc:
            await history
            return self._retried(f"ComfyUI stopped answering before its outputs were saved: {exc}")
        except StorageError as exc:
            await history
            return self._failed(
                failures.OUTPUT_ERROR, f"an output could not be stored: {exc}", raw, retryable=True
            )
        except BaseException:
            history.cancel()
            raise
        await history
        data = SucceededData(
            attempt=self.job.attempt,
            outputs=outputs,
            node_errors=self._node_errors,
            duration_s=_duration(entry),
        )
        return _Result(data, raw)

    async def _emit_history(self, raw: dict[str, Any]) -> None:
        self._history_sent = True
        await self._emit(HistoryData(prompt_id=self.prompt_id, history=_fit(raw)))

    async def _out_of_memory(self, raw: dict[str, Any], error: dict[str, Any]) -> _Result:
        node = error.get("node_id")
        try:
            await self.ctx.client.free()
        except ComfyError as exc:
            log.warning("job %s: POST /free failed: %s", self.job.job_id, exc)
        return self._retried(
            f"ComfyUI ran out of memory in node {node} ({error.get('exception_type')}); "
            "models were unloaded",
            raw,
        )

    def _failed(
        self,
        code: str,
        message: str,
        history: dict[str, Any] | None = None,
        *,
        retryable: bool = False,
    ) -> _Result:
        data = FailedData(code=code, message=message, attempt=self.job.attempt, retryable=retryable)
        return _Result(data, history)

    def _retried(self, reason: str, history: dict[str, Any] | None = None) -> _Result:
        data = RetriedData(
            attempt=self.job.attempt,
            reason=reason,
            started=self.started,
            previous_server_id=self.ctx.server_id,
        )
        return _Result(data, history)

    async def _conclude(self, result: _Result) -> None:
        if not isinstance(result.data, SucceededData):
            await self._drop_outputs()
        if result.history is not None and not self._history_sent:
            await self._emit_history(result.history)
        data = result.data
        if isinstance(data, CancelledData) and await self._record_status() is JobStatus.CANCELLED:
            log.info("job %s: already cancelled in its record; not repeating it", self.job.job_id)
            await self._sent()
        else:
            await self._emit(data)
        self.concluded = True
        await self.msg.ack()
        log.info("job %s attempt %d: %s", self.job.job_id, self.job.attempt, _summary(data))

    async def _record_status(self) -> JobStatus | None:
        record = await self._current_record()
        return None if record is None else record.status

    async def _current_record(self) -> JobRecord | None:
        try:
            entry = await self.ctx.jobs_kv.get(self.job.job_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return decode(entry.value, JobRecord)

    async def _drop_outputs(self) -> None:
        """Delete what this attempt stored on the way, unless a later attempt has taken over.

        Every attempt stores under the same keys: an attempt handed back while its prompt
        ran on must not delete what the next attempt, elsewhere, stored there.
        """
        try:
            record = await self._current_record()
        except nats.errors.Error as exc:
            log.warning("job %s: no record to read (%s); keeping its files", self.job.job_id, exc)
            record = None
        if record is not None and record.attempt == self.job.attempt:
            await self._outputs.discard()
        else:
            await self._outputs.abandon()

    def _emit_soon(self, data: EventData) -> None:
        """Publish a progress event without waiting for the broker's ack.

        Following the prompt and fetching its outputs go on meanwhile instead of waiting a
        round trip per event. Order is kept: the publisher stores one job's emits in the
        order they were called. The next `_emit` waits for these first and raises what
        failed, so a job never ends in the log before its progress. The event is stamped
        now, when it happened, not when its turn to be stored comes: node timings in the
        log and the balancer's speed estimates read these stamps.
        """
        if self._send_failed is not None:
            return  # the run is failing: nothing goes out after a lost event
        task = asyncio.create_task(
            self.ctx.publisher.emit(self.job.job_id, data, ts=now()),
            name=f"event-{self.job.job_id}",
        )
        self._sending.add(task)
        task.add_done_callback(self._on_sent)

    def _on_sent(self, task: asyncio.Task[Event]) -> None:
        self._sending.discard(task)
        if task.cancelled() or self._send_failed is not None:
            return
        failed = task.exception()
        if failed is not None:
            self._send_failed = failed
            # Events after a lost one must not be stored: the log would skip a step.
            for later in self._sending:
                later.cancel()

    async def _sent(self) -> None:
        """Wait until the progress events emitted so far are stored; raise what failed."""
        if self._sending:
            # Each task's own callback (_on_sent) runs before `wait` returns.
            await asyncio.wait(set(self._sending))
        if self._send_failed is not None:
            raise self._send_failed

    async def _emit(self, data: EventData) -> None:
        await self._sent()
        await self.ctx.publisher.emit(self.job.job_id, data)


async def _next(watch: Watch, wait: float) -> Item | None:
    try:
        async with asyncio.timeout(wait):
            return await watch.get()
    except TimeoutError:
        return None


def _duration(entry: HistoryEntry) -> float | None:
    if entry.status is None:
        return None
    start = entry.status.message("execution_start")
    end = entry.status.message("execution_success")
    if start is None or end is None:
        return None
    begin, finish = start.get("timestamp"), end.get("timestamp")
    if isinstance(begin, int | float) and isinstance(finish, int | float):
        return max(0.0, (finish - begin) / 1000)
    return None


def _fit(history: dict[str, Any]) -> dict[str, Any]:
    """The history, small enough for one message: the workflow copy goes first if too big."""
    if len(msgspec.json.encode(history)) <= _MAX_HISTORY_BYTES:
        return history
    trimmed = dict(history)
    prompt = trimmed.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 2:
        trimmed["prompt"] = [*prompt[:2], {"omitted": "too large for an event"}, *prompt[3:]]
    if len(msgspec.json.encode(trimmed)) <= _MAX_HISTORY_BYTES:
        return trimmed
    return {
        "omitted": "the history is too large for an event",
        "outputs": trimmed.get("outputs", {}),
        "status": {"status_str": (trimmed.get("status") or {}).get("status_str")},
    }


def _summary(data: Outcome) -> str:
    match data:
        case SucceededData():
            return f"succeeded with {len(data.outputs)} output(s)"
        case FailedData():
            return f"failed ({data.code}): {data.message}"
        case CancelledData():
            return f"cancelled: {data.reason}"
        case RetriedData():
            return f"handed back (started={data.started}): {data.reason}"
