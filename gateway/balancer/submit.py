"""Accepting a job: check it, record it, log it, answer. The one path for REST and NATS.

A job is accepted once its record exists in KV `comfy_jobs` and its `queued` event (with the
whole request) is stored in the EVENTS stream; from then on it always reaches an end. Anything
wrong with the request is refused before either is written, so a refusal changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from typing import Final

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from gateway.balancer.placement import missing, requirements
from gateway.balancer.servers import ServerTable
from gateway.bus.contract import (
    MAX_TIMEOUT_S,
    PRIORITY_MAX,
    PRIORITY_MIN,
    ContractError,
    Error,
    JobAccepted,
    JobInput,
    JobRecord,
    JobRequest,
    JobStatus,
    QueuedData,
    Subjects,
    decode,
    encode,
    new_id,
    now,
)
from gateway.bus.events import EventPublisher
from gateway.bus.retry import TRANSIENT, through_election, transient
from gateway.comfyui.jobfiles import job_file_problems
from gateway.comfyui.workflow import (
    WorkflowError,
    apply_overrides,
    graph_problems,
    workflow_problems,
)
from gateway.logsink.paths import log_file_relpath
from gateway.storage import MAX_SEGMENT_BYTES, InvalidKey, validate_key

log = logging.getLogger(__name__)

QUEUE_GROUP: Final = "balancer"
MAX_ATTEMPTS_LIMIT: Final = 20
# A submission this old with a record and no event stopped half-way (see _finish_half_done).
HALF_DONE_AFTER_S: Final = 2.0
# The `queued` event and each Job handed to an adapter carry the whole request, and the streams
# take messages of at most 1 MiB (gateway/bus/connection.py); what surrounds the request is far
# below 16 KiB.
MAX_REQUEST_BYTES: Final = 1024 * 1024 - 16 * 1024
# A job id is a KV key, a subject token, part of a file name and a REST path segment.
_JOB_ID: Final = re.compile(r"[A-Za-z0-9_=-]{1,128}")


def check_job_id(job_id: str) -> str:
    """Return `job_id` if a job could have it, else raise ContractError."""
    if _JOB_ID.fullmatch(job_id) is None:
        raise ContractError(
            f"job id {job_id!r} is not usable: 1-128 letters, digits, '-', '_' or '='"
        )
    return job_id


def input_problems(inputs: list[JobInput]) -> list[str]:
    """Why input files could not be fetched or named safely; empty when they can."""
    problems = []
    for item in inputs:
        name = item.name
        parts = name.replace("\\", "/").split("/")
        if not name.strip():
            problems.append("an input has an empty name")
        elif any(unicodedata.category(ch) == "Cc" for ch in name):
            problems.append(f"input {name!r}: the name has a control character")
        elif name.startswith(("/", "\\")) or ".." in parts:
            problems.append(f"input {name!r}: the name must be a relative path without '..'")
        elif any(len(part.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES for part in parts):
            # ComfyUI's upload would fail on it, try after try, as if the server were at fault.
            problems.append(
                f"input {name[:40]!r}...: a file name is at most {MAX_SEGMENT_BYTES} bytes in UTF-8"
            )
        if item.source == "key":
            try:
                validate_key(item.value)
            except InvalidKey as exc:
                problems.append(f"input {name!r}: {exc}")
    return problems


# How long a submission waits for the jobs bucket to have a leader before answering
# `unavailable`.
_CREATE_WAIT_S = 8.0


class Refused(Exception):
    """A request that cannot be accepted; carries the Error to answer with."""

    def __init__(self, code: str, message: str, details: object = None) -> None:
        super().__init__(message)
        self.error = Error(code=code, message=message, details=details)


class Submitter:
    """Checks and accepts job requests."""

    def __init__(
        self,
        jobs_kv: KeyValue,
        subjects: Subjects,
        servers: ServerTable,
        publisher: EventPublisher,
        *,
        max_concurrent: int = 256,
    ) -> None:
        self._kv = jobs_kv
        self._subjects = subjects
        self._servers = servers
        self._publisher = publisher
        self._slots = asyncio.Semaphore(max_concurrent)
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, request: JobRequest) -> JobAccepted:
        """Accept `request` or raise Refused saying why."""
        self._check(request)
        job_id = request.job_id or new_id()
        submitted_at = now()
        path = log_file_relpath(job_id, submitted_at)
        record = JobRecord(
            job_id=job_id,
            status=JobStatus.QUEUED,
            submitted_at=submitted_at,
            updated_at=submitted_at,
            log_file_path=path,
            priority=request.priority,
            max_attempts=request.max_attempts,
            last_seq=1,
            caller=request.caller,
        )
        try:
            await self._create(job_id, encode(record))
        except KeyWrongLastSequenceError:
            accepted = await self._finish_half_done(job_id, request)
            if accepted is None:
                raise Refused("duplicate_job", f"job id {job_id!r} is already in use") from None
            return accepted
        self._publisher.expect_new(job_id)
        await self._publisher.emit(
            job_id, QueuedData(request=request, log_file_path=path), ts=submitted_at
        )
        return JobAccepted(job_id=job_id, submitted_at=submitted_at, log_file_path=path)

    async def _create(self, job_id: str, value: bytes) -> None:
        """Create the job's record, through an election; a try of ours stored though its answer
        was lost is taken for the creation it is, not for another's record."""
        retried = False

        async def create() -> None:
            nonlocal retried
            try:
                try:
                    await self._kv.create(job_id, value)
                except KeyWrongLastSequenceError:
                    if retried and (await self._kv.get(job_id)).value == value:
                        return
                    raise
            except KeyNotFoundError as exc:
                if not retried:
                    raise
                # The bucket counts a try of ours still pending (a leader without its quorum)
                # that no copy has stored: not known yet either way, so like a time-out.
                raise NatsTimeoutError from exc
            except TRANSIENT:
                retried = True
                raise

        # Shorter than an election may take: the gateway waits 10 s for the answer, and an
        # "unavailable" (503, Retry-After) before then tells the client more than a time-out.
        await through_election(create, f"creating job {job_id}", within=_CREATE_WAIT_S)

    async def _finish_half_done(self, job_id: str, request: JobRequest) -> JobAccepted | None:
        """Finish a submission that stopped between its record and its `queued` event.

        A gateway or broker that went down in between leaves a record and no event; the client,
        never answered, submits again under the same id. Completing the first attempt keeps the
        job; refusing it as a duplicate would leave it to be failed as lost. A record younger
        than HALF_DONE_AFTER_S may still be completed by its own submitter, and is left alone.
        """
        try:
            entry = await self._kv.get(job_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        record = decode(entry.value, JobRecord)
        stale = now() - record.submitted_at > HALF_DONE_AFTER_S
        if record.status is not JobStatus.QUEUED or record.last_seq != 1 or not stale:
            return None
        data = QueuedData(request=request, log_file_path=record.log_file_path)
        if not await self._publisher.emit_first(job_id, data, ts=record.submitted_at):
            return None  # it has its events: a plain duplicate
        log.warning("job %s: completed a submission that had stopped half-way", job_id)
        return JobAccepted(
            job_id=job_id, submitted_at=record.submitted_at, log_file_path=record.log_file_path
        )

    def _check(self, request: JobRequest) -> None:
        size = len(encode(request))
        if size > MAX_REQUEST_BYTES:
            raise Refused(
                "too_large",
                f"the request is {size} bytes; a job carries at most {MAX_REQUEST_BYTES}: "
                "pass large files as inputs (source 'key' or 'url')",
                {"size": size, "max_request_bytes": MAX_REQUEST_BYTES},
            )
        problems = workflow_problems(request.workflow)
        if problems:
            raise Refused("invalid_workflow", "; ".join(problems), {"problems": problems})
        try:
            workflow = apply_overrides(request.workflow, request.overrides)
        except WorkflowError as exc:
            raise Refused("invalid_overrides", str(exc)) from None
        problems = graph_problems(workflow) or job_file_problems(workflow)
        if problems:
            raise Refused("invalid_workflow", "; ".join(problems), {"problems": problems})
        problems = input_problems(request.inputs)
        if problems:
            raise Refused("invalid_request", "; ".join(problems), {"problems": problems})
        if request.job_id is not None:
            try:
                check_job_id(request.job_id)
            except ContractError as exc:
                raise Refused("invalid_request", str(exc)) from None
        if not 1 <= request.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise Refused(
                "invalid_request", f"max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}"
            )
        if request.timeout_s is not None and not 0 < request.timeout_s <= MAX_TIMEOUT_S:
            raise Refused(
                "invalid_request", f"timeout_s must be over 0 and at most {MAX_TIMEOUT_S:g} s"
            )
        if not PRIORITY_MIN <= request.priority <= PRIORITY_MAX:
            raise Refused(
                "invalid_request", f"priority must be between {PRIORITY_MIN} and {PRIORITY_MAX}"
            )
        self._check_runnable(request)

    def _check_runnable(self, request: JobRequest) -> None:
        """Refuse a job that no known server could ever run; wait if none is known yet."""
        need = requirements(request)
        if need.server is not None:
            state = self._servers.get(need.server)
            if state is None:
                raise Refused("unknown_server", f"no server {need.server!r} is registered")
            states = [state]
        else:
            states = list(self._servers)
        judged = [(s, missing(need, s.capabilities, s.labels)) for s in states if s.capabilities]
        if not judged or any(not lack for _, lack in judged):
            return
        closest, lack = min(judged, key=lambda pair: len(pair[1].describe()))
        raise Refused(
            "unschedulable",
            f"no server can run this workflow; the closest, {closest.server_id}, lacks "
            + lack.describe(),
            {state.server_id: lack.describe() for state, lack in judged},
        )

    # -- the NATS face of the same path ------------------------------------------------------

    async def serve(self, nc: Client) -> Subscription:
        """Answer JobRequests on `comfy.submit` (queue group `balancer`)."""
        return await nc.subscribe(self._subjects.submit, queue=QUEUE_GROUP, cb=self._on_request)

    async def _on_request(self, msg: Msg) -> None:
        # Callbacks of one subscription run one at a time: answer each request in its own task.
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        async with self._slots:
            reply: JobAccepted | Error
            try:
                reply = await self.submit(decode(msg.data, JobRequest))
            except ContractError as exc:
                reply = Error(code="invalid_request", message=str(exc))
            except Refused as exc:
                reply = exc.error
            except Exception as exc:
                if transient(exc) or transient(exc.__cause__ or exc):
                    # NATS stayed leaderless longer than an election: the client may try again.
                    log.warning("a job could not be accepted now: %s", exc)
                    reply = Error(code="unavailable", message=f"try again shortly: {exc}")
                else:
                    log.exception("submitting a job failed")
                    reply = Error(code="internal", message=f"the job was not accepted: {exc}")
            if msg.reply:
                await msg.respond(encode(reply))
