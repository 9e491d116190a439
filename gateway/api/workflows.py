"""`/workflow/*`: submit, execute and wait, status, result, cancel, live events."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, WebSocket, get, post, websocket
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from gateway.api.auth import Caller, caller_of
from gateway.api.errors import ApiError, error_responses
from gateway.api.jobevents import EventsGone, job_events
from gateway.api.limits import hold, submit_rate_limit, take_stream
from gateway.api.native.fleetinfo import FleetRegistry
from gateway.api.owners import check_inputs_owned
from gateway.api.schemas import JobResult, Submitted, Timings, WorkflowSubmission
from gateway.api.services import Services, ServicesDep
from gateway.api.signing import signer_of
from gateway.balancer.requestchecks import MAX_REQUEST_BYTES, check_job_id
from gateway.bus.contract import (
    ContractError,
    JobRecord,
    JobRequest,
    encode,
    event_type,
)
from gateway.comfyui.overrides import override_problems

log = logging.getLogger(__name__)

DEFAULT_EXECUTE_TIMEOUT = 300.0
IDEMPOTENCY_HEADER = "Idempotency-Key"
# On an answer about a job that the same key or job id had made already.
REPLAYED_HEADER = "Idempotent-Replayed"
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name=IDEMPOTENCY_HEADER,
        description="The same key and request again (within 24 h) answer with the same job",
    ),
]


def base_url(services: Services, request: Request[Any, Any, Any]) -> str:
    """Where clients reach this gateway: the configured public URL, else what they called."""
    return (services.settings.public_url or str(request.base_url)).rstrip("/")


def to_request(body: WorkflowSubmission, services: Services, caller: Caller) -> JobRequest:
    """The bus request for a submission by `caller`; a 413 when the bus could not carry it."""
    if body.timeout is not None and not (math.isfinite(body.timeout) and body.timeout > 0):
        raise ApiError(
            400,
            "invalid_request",
            f"timeout must be a number of seconds over 0, not {body.timeout!r}",
        )
    request = JobRequest(
        workflow=body.workflow,
        overrides=body.overrides,
        inputs=body.inputs,
        server=body.server,
        labels=body.labels,
        priority=body.priority,
        # `or` would turn an explicit 0 into the default instead of refusing it.
        max_attempts=(
            services.settings.default_max_attempts
            if body.max_attempts is None
            else body.max_attempts
        ),
        timeout_s=body.timeout,
        job_id=body.job_id,
        metadata=body.metadata,
        caller=caller.id,
        webhook_url=body.webhook_url,
        webhook_events=body.webhook_events,
    )
    # Checked here as well as by the balancer: a request over NATS's message limit could not
    # even be sent to it.
    size = len(encode(request))
    if size > MAX_REQUEST_BYTES:
        raise ApiError(
            413,
            "too_large",
            f"the job request is {size} bytes; a job carries at most {MAX_REQUEST_BYTES}: "
            "pass large files as inputs (source 'key' or 'url')",
            {"size": size, "max_request_bytes": MAX_REQUEST_BYTES},
        )
    return request


async def check_overrides(
    services: Services, request: JobRequest, registry: FleetRegistry | None = None
) -> None:
    """A 422 for overrides that name an input their node does not have, or a wrong value.

    Judged by the live servers' node definitions (`registry`, when the caller has them at
    hand); with none known, the job waits as usual.
    """
    native = services.native
    if not request.overrides or native is None or not isinstance(request.workflow, dict):
        return
    registry = registry or await native.fleet.registry()
    problems = override_problems(request.workflow, request.overrides, registry.get)
    if problems:
        raise ApiError(422, "invalid_override", "; ".join(problems), {"problems": problems})


def known_job_id(job_id: str) -> str:
    """`job_id` if a job could have it; a 404 at once for one that no job can have."""
    try:
        return check_job_id(job_id)
    except ContractError:
        raise ApiError(404, "unknown_job", f"no job {job_id!r}") from None


async def _checked_request(
    body: WorkflowSubmission,
    services: Services,
    request: Request[Any, Any, Any],
    idempotency_key: str | None,
) -> JobRequest:
    """The bus request for a submission, after every check the gateway can make itself."""
    caller = caller_of(request)
    job = to_request(body, services, caller)
    job.idempotency_key = idempotency_key
    await check_inputs_owned(services, caller, job.inputs)
    await check_overrides(services, job)
    return job


_SUBMIT_ERRORS = error_responses(404, 409, 413, 422, 429, 503, 504)


def to_result(
    record: JobRecord,
    services: Services,
    request: Request[Any, Any, Any],
    *,
    now: float | None = None,
) -> JobResult:
    """The job as an answer gives it; `now` signs its output URLs (one answer, one time)."""
    sign = signer_of(request).answer(base_url(services, request), now=now)
    outputs = [msgspec.structs.replace(o, url=sign(o.key)) for o in record.outputs]
    started, finished = record.started_at, record.finished_at
    return JobResult(
        job_id=record.job_id,
        status=record.status,
        server_id=record.server_id,
        attempts=record.attempt,
        images=[o.url for o in outputs if o.content_type.startswith("image/")],
        outputs=outputs,
        log_file_path=services.log_path(record.log_file_path),
        timings=Timings(
            submitted_at=record.submitted_at,
            started_at=started,
            finished_at=finished,
            queue_wait_s=None if started is None else started - record.submitted_at,
            run_s=None if started is None or finished is None else finished - started,
            total_s=None if finished is None else finished - record.submitted_at,
        ),
        error=record.error,
    )


class WorkflowController(Controller):
    path = "/workflow"
    tags = ("workflows",)

    @post(
        "/submit",
        status_code=202,
        guards=[submit_rate_limit],
        responses={
            200: ResponseSpec(
                data_container=Submitted,
                description="The job that the same Idempotency-Key (or job_id) made before",
                generate_examples=False,
            ),
            **_SUBMIT_ERRORS,
        },
    )
    async def submit(
        self,
        data: JSONBody[WorkflowSubmission],
        services: ServicesDep,
        request: Request[Any, Any, Any],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Submitted]:
        """Queue a workflow and answer at once with the job id (202).

        With an `Idempotency-Key` (or a `job_id`) that made a job already, with the same
        request: 200 with that job as it is now.
        """
        began = time.monotonic()
        job = await _checked_request(data, services, request, idempotency_key)
        accepted = await services.submit(job)
        services.metrics.gateway_added("submit", time.monotonic() - began)
        base = f"{base_url(services, request)}/workflow"
        submitted = Submitted(
            job_id=accepted.job_id,
            status=accepted.status,
            log_file_path=services.log_path(accepted.log_file_path),
            status_url=f"{base}/status/{accepted.job_id}",
            result_url=f"{base}/result/{accepted.job_id}",
            events_url=f"{base}/events/{accepted.job_id}",
        )
        if accepted.replayed:
            return Response(submitted, status_code=200, headers={REPLAYED_HEADER: "true"})
        return Response(submitted, status_code=202)

    @post("/execute", status_code=200, guards=[submit_rate_limit], responses=_SUBMIT_ERRORS)
    async def execute(
        self,
        data: JSONBody[WorkflowSubmission],
        services: ServicesDep,
        request: Request[Any, Any, Any],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[JobResult]:
        """Run a workflow and wait for its end (up to `timeout`, then 202 with the job).

        With an `Idempotency-Key` (or a `job_id`) that made a job already, with the same
        request: 200 at once with that job as it is now, ended or not.
        """
        began = time.monotonic()
        job = await _checked_request(data, services, request, idempotency_key)
        accepted = await services.submit(job)
        if accepted.replayed:
            record = await services.record(accepted.job_id)
            if record.status.terminal:
                await services.wait_logged(record)
            result = to_result(record, services, request)
            return Response(result, status_code=200, headers={REPLAYED_HEADER: "true"})
        timeout = data.timeout if data.timeout is not None else DEFAULT_EXECUTE_TIMEOUT
        record = await services.wait_for_end(accepted.job_id, timeout)
        status = 200 if record.status.terminal else 202
        result = to_result(record, services, request)
        if record.status.terminal:
            # The job's run on ComfyUI is the server's time; the rest is the system's own.
            ran = result.timings.run_s or 0.0
            services.metrics.gateway_added("execute", time.monotonic() - began - ran)
        return Response(result, status_code=status)

    @get("/status/{job_id:str}", responses=error_responses(404))
    async def status(
        self, job_id: FromPath[str], services: ServicesDep, request: Request[Any, Any, Any]
    ) -> JobResult:
        """Where a job is now."""
        record = await services.record(known_job_id(job_id), caller_of(request))
        return to_result(record, services, request)

    @get("/result/{job_id:str}", responses=error_responses(404))
    async def result(
        self,
        job_id: FromPath[str],
        services: ServicesDep,
        request: Request[Any, Any, Any],
        wait: FromQuery[float] = 0.0,
    ) -> JobResult:
        """A job's result; `?wait=SECONDS` waits for it to finish first."""
        await services.record(known_job_id(job_id), caller_of(request))
        if math.isnan(wait):
            # A NaN deadline would sit in the event loop's timer heap and disorder every timer.
            raise ApiError(400, "invalid_request", "wait must be a number of seconds, not NaN")
        record = await services.wait_for_end(job_id, min(wait, DEFAULT_EXECUTE_TIMEOUT))
        return to_result(record, services, request)

    @post("/cancel/{job_id:str}", status_code=200, responses=error_responses(404, 409))
    async def cancel(
        self, job_id: FromPath[str], services: ServicesDep, request: Request[Any, Any, Any]
    ) -> JobResult:
        """Cancel a job: dequeued if waiting, interrupted if running."""
        record = await services.cancel(known_job_id(job_id), caller_of(request))
        return to_result(record, services, request)

    @get(
        "/events/{job_id:str}",
        media_type="text/event-stream",
        responses=error_responses(400, 404, 503),
    )
    async def events(
        self,
        job_id: FromPath[str],
        services: ServicesDep,
        request: Request[Any, Any, Any],
        last_event_id: FromQuery[str | None] = None,
    ) -> ServerSentEvent:
        """Every event of the job, live, as Server-Sent Events; ends with it.

        Each event's `id` is its `seq`. A client that reconnects with `Last-Event-ID` (the
        header, as EventSource sends it, or `?last_event_id=`) gets only the events after it.
        A job whose events the EVENTS stream no longer keeps: from its log, or (without it) one
        `expired` event with how it ended.
        """
        after = seq_after(request.headers.get("last-event-id") or last_event_id)
        # 404 before the stream starts, also for another caller's job.
        record = await services.record(known_job_id(job_id), caller_of(request))
        slot = take_stream(request)  # 503 when too many are open
        return ServerSentEvent(hold(slot, _event_stream(services, record, after)))


def seq_after(text: str | None) -> int:
    """The `seq` (or fleet event id) a resuming client saw last (0: none), from
    `Last-Event-ID` or `from_seq`; a 400 for what no event id can be."""
    if text is None or not text.strip():
        return 0
    try:
        seq = int(text.strip())
    except ValueError:
        seq = -1
    if seq < 0:
        raise ApiError(
            400, "invalid_request", f"an event id is the event's seq, 0 or more, not {text!r}"
        )
    return seq


async def _event_stream(
    services: Services, record: JobRecord, after: int
) -> AsyncIterator[ServerSentEventMessage]:
    async for event in job_events(services, record, after):
        if event is None:
            yield ServerSentEventMessage(comment="keep-alive")
        else:
            kind = event.type if isinstance(event, EventsGone) else event_type(event)
            yield ServerSentEventMessage(data=encode(event).decode(), event=kind, id=event.seq)


@websocket("/workflow/events/{job_id:str}/ws")
async def job_events_ws(
    socket: WebSocket[Any, Any, Any],
    job_id: FromPath[str],
    services: ServicesDep,
    from_seq: FromQuery[str | None] = None,
) -> None:
    """The same events as /workflow/events/{job_id}, one JSON text frame each;
    `?from_seq=N` starts at the event whose `seq` is N (a client that saw up to 7 asks for 8)."""
    await socket.accept()
    try:
        after = max(0, seq_after(from_seq) - 1)
        record = await services.record(known_job_id(job_id), caller_of(socket))
        slot = take_stream(socket)
    except ApiError as exc:
        # 4000 + the HTTP status: 4404 for an unknown job, 4503 for too many streams.
        await socket.close(code=4000 + exc.status, reason=exc.message[:120])
        return
    with slot:
        async for event in job_events(services, record, after):
            if event is not None:
                await socket.send_text(encode(event).decode())
    await socket.close()
