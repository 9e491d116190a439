"""Accepting a job: check it (requestchecks.py), record it, log it, answer. The one path for
REST and NATS.

A job is accepted once its record exists in KV `comfy_jobs` and its `queued` event (with the
whole request) is stored in the EVENTS stream; from then on it always reaches an end. Anything
wrong with the request is refused before either is written, so a refusal changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from gateway.balancer.admission import Admission, QueueFull, Ticket
from gateway.balancer.idempotency import IdempotencyKeys, Mismatch, key_problem
from gateway.balancer.requestchecks import (
    Refused,
    check_request,
)
from gateway.balancer.servers import ServerTable
from gateway.balancer.shares import caller_key
from gateway.bus.contract import (
    STATUS_AFTER,
    ContractError,
    Error,
    Event,
    JobAccepted,
    JobRecord,
    JobRequest,
    JobStatus,
    Queued,
    QueuedData,
    Subjects,
    decode,
    decode_event,
    encode,
    new_id,
    now,
    webhook_of,
)
from gateway.bus.events import EventPublisher
from gateway.bus.jobstate import request_hash
from gateway.bus.retry import TRANSIENT, through_election, transient
from gateway.logsink.paths import log_file_relpath
from gateway.webhooks.policy import WebhookPolicy, WebhookRefused

log = logging.getLogger(__name__)

QUEUE_GROUP: Final = "balancer"
# A submission this old with a record and no event stopped half-way (see Submitter._existing).
HALF_DONE_AFTER_S: Final = 2.0


def _mismatch(key: str, job_id: str) -> Refused:
    return Refused(
        "idempotency_mismatch",
        f"the idempotency key {key!r} was used for another request (job {job_id}) within its "
        "time to live: send that request again, or use a new key for this one",
        {"job_id": job_id},
    )


def _accepted(record: JobRecord, *, replayed: bool) -> JobAccepted:
    return JobAccepted(
        job_id=record.job_id,
        status=record.status,
        submitted_at=record.submitted_at,
        log_file_path=record.log_file_path,
        replayed=replayed,
    )


# How long a submission waits for the jobs bucket to have a leader before answering
# `unavailable`.
_CREATE_WAIT_S = 8.0


# Whether a job id was used by a job whose record has expired (its log still names it).
UsedBefore = Callable[[str], Awaitable[bool]]


class Submitter:
    """Checks and accepts job requests."""

    def __init__(
        self,
        jobs_kv: KeyValue,
        subjects: Subjects,
        servers: ServerTable,
        publisher: EventPublisher,
        keys: IdempotencyKeys,
        js: JetStreamContext,
        *,
        max_concurrent: int = 256,
        webhooks: WebhookPolicy | None = None,
        used_before: UsedBefore | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._webhooks = webhooks
        self._admission = admission
        self._js = js
        self._kv = jobs_kv
        self._used_before = used_before
        self._subjects = subjects
        self._servers = servers
        self._publisher = publisher
        self._keys = keys
        self._slots = asyncio.Semaphore(max_concurrent)
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, request: JobRequest) -> JobAccepted:
        """Accept `request` or raise Refused saying why.

        A request that names a job that exists already (by its idempotency key, or its job id)
        with the same request and caller is answered with that job (`replayed`); with another
        request, it is refused (`idempotency_mismatch`, `duplicate_job`).
        """
        digest = request_hash(request)
        key = request.idempotency_key
        job_id: str | None = None
        if key is not None:
            problem = key_problem(key)
            if problem is not None:
                raise Refused("invalid_request", problem)
            job_id = await self._follow_key(request, key, digest)
            if job_id is not None:
                replay = await self._replay(job_id, request, digest)
                if replay is not None:
                    return replay
                # The key stands for a job that was never made: its submission was cut short.
        check_request(request, self._servers)
        request = await self._with_webhook(request)
        try:
            ticket = self._reserve(request)
        except QueueFull:
            # The queue's bounds are for new jobs: a job sent again is answered all the same.
            replay = await self._same_job(request, digest)
            if replay is None:
                raise
            return replay
        try:
            accepted = await self._claim_and_create(request, key, job_id, digest)
        except BaseException:
            ticket.release()
            raise
        if accepted.replayed:
            ticket.release()
        else:
            ticket.admitted(self._publisher.stream_seq(accepted.job_id))
        return accepted

    def _reserve(self, request: JobRequest) -> Ticket:
        if self._admission is None:
            return Ticket(None, caller_key(request.caller), 1)
        return self._admission.reserve(caller_key(request.caller))

    async def _same_job(self, request: JobRequest, digest: str) -> JobAccepted | None:
        """The job a request names by its id, if it is this very request's (a retry)."""
        if request.job_id is None:
            return None
        record = await self._record(request.job_id)
        if record is None or record.request_hash != digest or record.caller != request.caller:
            return None
        return _accepted(record, replayed=True)

    async def _claim_and_create(
        self, request: JobRequest, key: str | None, job_id: str | None, digest: str
    ) -> JobAccepted:
        if key is not None and job_id is None:
            try:
                job_id = await self._keys.claim(
                    request.caller, key, digest, request.job_id or new_id()
                )
            except Mismatch as exc:  # another request took the key meanwhile
                raise _mismatch(key, exc.job_id) from None
        try:
            return await self._create(job_id or request.job_id or new_id(), request, digest)
        except Refused:
            if key is not None:
                await self._keys.release(request.caller, key)
            raise

    async def _follow_key(self, request: JobRequest, key: str, digest: str) -> str | None:
        try:
            return await self._keys.find(request.caller, key, digest)
        except Mismatch as exc:
            raise _mismatch(key, exc.job_id) from None

    async def _create(self, job_id: str, request: JobRequest, digest: str) -> JobAccepted:
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
            webhook=webhook_of(request),
            request_hash=digest,
            batch_id=request.batch_id,
        )
        # An ended job's record expires from KV; its id stays taken by its log.
        used_before = self._used_before if request.job_id is not None else None
        if used_before is not None and await used_before(job_id):
            raise Refused("duplicate_job", f"job id {job_id!r} is already in use")
        try:
            await self._create_record(job_id, encode(record))
        except KeyWrongLastSequenceError:
            return await self._existing(job_id, request, digest)
        self._publisher.expect_new(job_id)
        await self._publisher.emit(
            job_id, QueuedData(request=request, log_file_path=path), ts=submitted_at
        )
        return JobAccepted(job_id=job_id, submitted_at=submitted_at, log_file_path=path)

    async def _with_webhook(self, request: JobRequest) -> JobRequest:
        """The request with its webhook resolved (defaults, checks); without one, as it is."""
        if self._webhooks is None:
            return request
        try:
            return await self._webhooks.resolved(request)
        except WebhookRefused as exc:
            raise Refused("invalid_webhook", str(exc)) from None

    async def _create_record(self, job_id: str, value: bytes) -> None:
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

    async def _existing(self, job_id: str, request: JobRequest, digest: str) -> JobAccepted:
        """The answer to a request whose job id is taken: that job if it is the same, else 409.

        A gateway or broker that went down between a record and its `queued` event leaves a
        record and no event; the client, never answered, submits again under the same id.
        Completing the first attempt keeps the job; refusing it as a duplicate would leave it
        to be failed as lost. A record younger than HALF_DONE_AFTER_S may still be completed by
        its own submitter, and is left alone. A record made before requests were hashed is the
        same job as nothing: only its half-done submission is completed.
        """
        duplicate = Refused("duplicate_job", f"job id {job_id!r} is already in use")
        record = await self._record(job_id)
        if record is None:
            raise duplicate
        known = record.request_hash is not None
        same = known and record.request_hash == digest and record.caller == request.caller
        if known and not same:
            raise duplicate
        stale = now() - record.submitted_at > HALF_DONE_AFTER_S
        if record.status is JobStatus.QUEUED and record.last_seq == 1 and stale:
            data = QueuedData(request=request, log_file_path=record.log_file_path)
            if await self._publisher.emit_first(job_id, data, ts=record.submitted_at):
                log.warning("job %s: completed a submission that had stopped half-way", job_id)
                return _accepted(record, replayed=False)
        if not same:
            raise duplicate
        return _accepted(record, replayed=True)

    async def _replay(self, job_id: str, request: JobRequest, digest: str) -> JobAccepted | None:
        """The job an idempotency key stands for, or None when it was never made."""
        record = await self._record(job_id)
        if record is not None:
            if record.caller != request.caller or record.request_hash != digest:
                # Not the key's job: a job id the key's request could not have (it was
                # refused as a duplicate, and the key could not be forgotten then).
                raise Refused("duplicate_job", f"job id {job_id!r} is already in use")
            return _accepted(record, replayed=True)
        first = await self._first_event(job_id)
        if first is None:
            return None
        # Its events outlived its record: the job was made and has ended.
        last = await self._publisher.last_event(job_id) or first
        status = next((s for kind, s in STATUS_AFTER.items() if isinstance(last, kind)), None)
        path = first.data.log_file_path if isinstance(first, Queued) else ""
        return JobAccepted(
            job_id=job_id,
            status=status or JobStatus.QUEUED,
            submitted_at=first.ts,
            log_file_path=path,
            replayed=True,
        )

    async def _first_event(self, job_id: str) -> Event | None:
        try:
            raw = await self._js.get_msg(
                self._subjects.events_stream,
                seq=1,
                subject=self._subjects.events(job_id),
                next=True,
            )
        except NotFoundError:
            return None
        return None if raw.data is None else decode_event(raw.data)

    async def _record(self, job_id: str) -> JobRecord | None:
        try:
            entry = await self._kv.get(job_id)
        except KeyNotFoundError:
            return None
        return None if entry.value is None else decode(entry.value, JobRecord)

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
