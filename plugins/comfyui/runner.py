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

This module runs the attempt; `attempt` holds its state, `follow` follows the prompt on
ComfyUI and `conclusion` turns its end into the job's last events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

import nats.errors
from nats.aio.msg import Msg

from gateway.bus.contract import Event, FailedData, Job, JobRecord, JobStatus, Succeeded, event_type
from gateway.bus.events import EventPublishError, JobEnded
from gateway.comfyui.workflow import WorkflowError
from gateway.storage import StorageError
from plugins.comfyui import failures
from plugins.comfyui.attempt import Attempt, Result, RunContext, Stop
from plugins.comfyui.client import ComfyError, ComfyUnavailable, PromptRejected
from plugins.comfyui.conclusion import conclude, drop_outputs, end_of, from_history, summary
from plugins.comfyui.follow import Found, follow, lookup, stop_on_comfy
from plugins.comfyui.inputs import InputProblem, prepare_workflow, upload_name

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Stopped(Exception):
    """A cancel or hand-back arrived before the prompt was submitted."""


class JobRun:
    """One job on this server. `run()` never raises: every end is an event (or a redelivery)."""

    def __init__(self, ctx: RunContext, job: Job, msg: Msg, record: JobRecord) -> None:
        self.ctx = ctx
        self.job = job
        self.msg = msg
        self.record = record
        self.prompt_id = job.prompt_id
        self.submitted = False
        self.finished = asyncio.Event()
        self.concluded = False  # its end is in the event log
        self.result: Result | None = None  # how it ended, once that is in the log
        running = record.status is JobStatus.RUNNING and record.attempt == job.attempt
        self._attempt = Attempt(
            ctx, job, announced=running, started_at=record.started_at if running else None
        )

    @property
    def started(self) -> bool:
        """Whether the prompt reached execution on ComfyUI in this attempt."""
        return self._attempt.started

    # -- requests from outside ----------------------------------------------------------------

    def cancel(self, reason: str) -> None:
        """Stop the job: dequeue or interrupt it on ComfyUI; it ends `cancelled`."""
        self._attempt.request_stop(Stop("cancel", reason))

    def hand_back(
        self, reason: str, *, only_unsubmitted: bool = False, counts: bool = True
    ) -> bool:
        """Give the job back to the balancer (`retried`); True if the request was taken.

        `counts`: whether this try counts against the job's attempts (False when the
        adapter is only stopping, which is no failure of the job or of its server).
        """
        if only_unsubmitted and self.submitted:
            return False
        if self._attempt.stop is not None:
            return False  # a cancel wins over a hand-back
        self._attempt.request_stop(Stop("hand_back", reason, counts))
        return True

    # -- the life of the job ------------------------------------------------------------------

    async def run(self) -> None:
        """Run the attempt, publish its end, ack. Never raises (except cancellation)."""
        keepalive = asyncio.create_task(self._keepalive(), name=f"keepalive-{self.job.job_id}")
        # Learn where the job's event subject ends while ComfyUI takes the prompt, so the
        # `running` event goes out in one round trip instead of two.
        priming = asyncio.create_task(self._prime(), name=f"prime-{self.job.job_id}")
        try:
            result = await self._run_attempt()
            await conclude(self._attempt, result)
            self.result = result
            self.concluded = True
            await self.msg.ack()
            log.info(
                "job %s attempt %d: %s", self.job.job_id, self.job.attempt, summary(result.data)
            )
        except JobEnded as exc:
            await self._abandon(exc.end)
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
            self._attempt.events.cancel()
            self._attempt.outputs.cancel()
            self.ctx.follower.unwatch(self.prompt_id)
            self.finished.set()

    async def _abandon(self, end: Event) -> None:
        """The job's log ended without this attempt (cancelled, say): leave no trace of it.

        The prompt is dequeued or interrupted on ComfyUI, what it stored is deleted (unless the
        end is another attempt's success, stored under the same keys), and the job is acked.
        """
        log.info(
            "job %s attempt %d: the job ended meanwhile (%s); stopping here",
            self.job.job_id,
            self.job.attempt,
            event_type(end),
        )
        if self.submitted:
            await stop_on_comfy(self._attempt)
        await self._attempt.clear_inputs()
        try:
            if isinstance(end, Succeeded) and end.data.attempt != self.job.attempt:
                await self._attempt.outputs.abandon()
            else:
                await self._attempt.outputs.discard()
        except StorageError as exc:
            log.error("job %s: could not delete this attempt's outputs: %s", self.job.job_id, exc)
        self.concluded = True
        try:
            await self.msg.ack()
        except nats.errors.Error as exc:  # a redelivery finds the record ended and drops it
            log.warning("job %s: could not ack: %s", self.job.job_id, exc)

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
            await self._attempt.clear_inputs()
            await drop_outputs(self._attempt)
            await self._attempt.events.emit(data)
            self.concluded = True
            await self.msg.ack()
        except JobEnded as ended:
            await self._abandon(ended.end)
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

    async def _run_attempt(self) -> Result:
        attempt = self._attempt
        if self._first_delivery():
            # Nothing to adopt: spare ComfyUI two requests per job.
            return await self._submit_and_follow()
        try:
            found = await lookup(attempt)
        except ComfyError as exc:
            return attempt.retried(f"ComfyUI at {self.ctx.address} is not answering: {exc}")
        if found.kind != "absent":
            return await self._adopt(found)
        if self.record.status is JobStatus.RUNNING:
            # This attempt was submitted before (its `running` event is in the record), yet
            # ComfyUI knows nothing of it: ComfyUI restarted and lost its queue.
            attempt.started = True
            return attempt.retried("ComfyUI lost the prompt (it restarted?)")
        return await self._submit_and_follow()

    async def _adopt(self, found: Found) -> Result:
        attempt = self._attempt
        log.info(
            "job %s: prompt %s is already on ComfyUI (%s); adopting it",
            self.job.job_id,
            self.prompt_id,
            found.kind,
        )
        self.submitted = True
        if found.entry is not None and found.entry.workflow:
            attempt.workflow = found.entry.workflow
            attempt.files.adopt(attempt.workflow, ())
        else:
            names = (upload_name(item.name) for item in self.job.request.inputs)
            attempt.files.adopt(None, names)
        if found.kind in ("done", "running"):
            attempt.mark_started()
        if found.kind == "done":
            assert found.raw is not None and found.entry is not None
            return await from_history(attempt, found.raw, found.entry)
        # Its messages go to the client id of whoever submitted it: follow it by polling.
        watch = attempt.register_watch()
        watch.live = False
        return await end_of(attempt, await follow(attempt, watch))

    async def _submit_and_follow(self) -> Result:
        attempt = self._attempt
        reason = self.ctx.unhealthy()
        if reason is not None:
            return attempt.retried(f"ComfyUI at {self.ctx.address} is unhealthy: {reason}")
        options = self.ctx.options
        try:
            workflow = await self._unless_stopped(
                prepare_workflow(
                    self.ctx.client,
                    self.ctx.storage,
                    self.job,
                    files=attempt.files,
                    max_bytes=options.max_input_bytes,
                    url_timeout=options.url_timeout_s,
                    url_allowlist=options.url_allowlist,
                )
            )
        except _Stopped:
            return self._stopped_before_submit()
        except WorkflowError as exc:
            return attempt.failed(failures.VALIDATION_ERROR, str(exc))
        except InputProblem as exc:
            return attempt.failed(failures.INPUT_ERROR, str(exc))
        except ComfyUnavailable as exc:
            return attempt.retried(f"ComfyUI became unreachable while receiving inputs: {exc}")
        except ComfyError as exc:
            return attempt.failed(failures.INPUT_ERROR, str(exc))
        if attempt.stop is not None:
            return self._stopped_before_submit()
        end = self.ctx.publisher.ended(self.job.job_id)
        if end is not None:
            raise JobEnded(self.job.job_id, end)  # cancelled while its inputs were prepared
        attempt.workflow = workflow
        watch = attempt.register_watch()
        try:
            accepted = await self.ctx.client.submit(
                workflow, client_id=self.ctx.follower.client_id, prompt_id=self.prompt_id
            )
        except PromptRejected as exc:
            data = failures.validation_failure(exc.rejection, workflow, self.job.attempt)
            log.info("job %s: %s", self.job.job_id, data.message)
            return Result(data)
        except ComfyUnavailable as exc:
            # The prompt may have been queued before the answer was lost: look before leaving.
            try:
                found = await lookup(attempt)
            except ComfyError:
                return attempt.retried(f"ComfyUI became unreachable at submission: {exc}")
            if found.kind == "absent":
                reason = f"ComfyUI did not accept the prompt: {exc}"
                # Answered with an error, while it answers: a fault of the server's (breaker.py).
                if exc.status is not None:
                    return attempt.server_failed(reason)
                return attempt.retried(reason)
            return await self._adopt(found)
        self.submitted = True
        if accepted.node_errors:
            attempt.node_errors = accepted.node_errors
            lines = failures.describe_node_errors(accepted.node_errors, workflow)
            log.warning(
                "job %s: ComfyUI dropped some outputs and runs the rest: %s",
                self.job.job_id,
                "; ".join(lines),
            )
        return await end_of(attempt, await follow(attempt, watch))

    async def _unless_stopped(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work`, abandoning it if a cancel or hand-back arrives meanwhile."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self._attempt.stop_changed.wait())
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

    def _stopped_before_submit(self) -> Result:
        stop = self._attempt.stop
        assert stop is not None
        if stop.kind == "cancel":
            return self._attempt.cancelled(stop.reason)
        return self._attempt.retried(stop.reason, counts=stop.counts)
