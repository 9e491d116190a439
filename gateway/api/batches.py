"""Batches: many jobs under one id, made, read and cancelled together.

A batch is a record in KV `comfy_batches` (its caller, its size, a digest of its jobs' requests,
whether it was cancelled) and jobs whose ids derive from it, `<batch_id>-<index>`. Nothing else
is kept: the state of its jobs is their records, so a batch survives any restart.

- Submitting writes the record first (`create`: one batch per id), then makes each job through
  the submit path. A job id made already with the same request is that job, so a submission cut
  short is completed by sending the same batch again, and no job is made twice. The record then
  notes how many jobs, from the first, are made (`made`): one of them missing later has
  expired (ended longer ago than the records' retention), and a resend skips them.
- Cancelling sets `cancelled` on the record, then cancels every job not ended. A submission
  under way reads the record before each round of jobs and once after the last, and cancels
  what it made once it sees the flag; whichever comes first, no job of a cancelled batch is left
  to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import msgspec
from nats.js.errors import InvalidKeyError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from gateway.api.auth import Caller
from gateway.api.errors import ApiError
from gateway.api.owners import check_inputs_owned
from gateway.api.schemas import BatchStatus, BatchSubmission, JobResult, WorkflowSubmission
from gateway.api.services import SUBMIT_STATUS, Services
from gateway.api.workflows import check_overrides, to_request
from gateway.balancer.idempotency import key_problem, scoped_key
from gateway.balancer.requestchecks import Refused, check_request
from gateway.bus.contract import BatchRecord, JobRecord, JobRequest, decode, encode, new_id, now
from gateway.bus.jobstate import request_hash

log = logging.getLogger(__name__)

# A batch id leaves room in a job id (128 characters) for `-` and the index.
_BATCH_ID: Final = re.compile(r"[A-Za-z0-9_=-]{1,100}")
# Jobs made, read or cancelled at once; the cancel flag is read between rounds of making.
ROUND: Final = 32
UNSUBMITTED: Final = "unsubmitted"
EXPIRED: Final = "expired"
# Ids of batches named by an idempotency key; no caller may choose one (and so take it first).
_KEYED: Final = "key-"

T = TypeVar("T")
R = TypeVar("R")


def job_id_of(batch_id: str, index: int) -> str:
    """The id of the batch's job at `index`."""
    return f"{batch_id}-{index}"


def batch_requests(
    body: BatchSubmission, services: Services, caller: Caller, batch_id: str
) -> list[JobRequest]:
    """The bus request of each job of the batch, in order; a 400 for a batch that is not one."""
    if (body.workflow is None) == (body.workflows is None):
        raise ApiError(
            400, "invalid_request", "give either `workflow` (with `overrides`) or `workflows`"
        )
    if body.workflow is not None:
        if not body.overrides:
            raise ApiError(
                400,
                "invalid_request",
                "a batch of one workflow needs `overrides`, a list of override sets (a job each)",
            )
        pairs = [(body.workflow, chosen) for chosen in body.overrides]
    else:
        workflows = body.workflows or []
        sets = body.overrides or [{} for _ in workflows]
        if len(sets) != len(workflows):
            raise ApiError(
                400,
                "invalid_request",
                f"{len(sets)} override sets for {len(workflows)} workflows: give one per "
                "workflow, or none",
            )
        pairs = list(zip(workflows, sets, strict=True))
    settings = services.settings
    # A batch is admitted whole: one larger than the queue's bound could never be.
    bounds = [settings.max_pending_per_caller, settings.max_pending]
    limit = min([settings.max_batch_jobs, *(bound for bound in bounds if bound)])
    if not pairs or len(pairs) > limit:
        raise ApiError(
            400,
            "batch_size",
            f"a batch holds 1 to {limit} jobs, this one {len(pairs)}: split it into several",
            {"jobs": len(pairs), "max_batch_jobs": limit},
        )
    shared = msgspec.structs.asdict(body)
    for name in ("workflow", "workflows", "overrides", "batch_id"):
        shared.pop(name)
    requests = []
    for index, (workflow, chosen) in enumerate(pairs):
        submission = WorkflowSubmission(
            workflow=workflow,
            overrides=chosen,
            job_id=job_id_of(batch_id, index),
            **shared,
        )
        request = to_request(submission, services, caller)
        request.batch_id = batch_id
        requests.append(request)
    return requests


def batch_hash(requests: Sequence[JobRequest]) -> str:
    """What defines a batch: its jobs' requests, in order."""
    digest = hashlib.sha256()
    for request in requests:
        digest.update(request_hash(request).encode())
    return digest.hexdigest()


async def each(items: Sequence[T], act: Callable[[T], Awaitable[R]]) -> list[R]:
    """`act` on every item, ROUND at a time; results in order."""
    slots = asyncio.Semaphore(ROUND)

    async def one(item: T) -> R:
        async with slots:
            return await act(item)

    return list(await asyncio.gather(*(one(item) for item in items)))


class Batches:
    """Making, reading and cancelling batches for one request's handler."""

    def __init__(self, services: Services, kv: KeyValue) -> None:
        self._services = services
        self._kv = kv

    async def submit(
        self, body: BatchSubmission, caller: Caller, key: str | None = None
    ) -> tuple[BatchRecord, bool]:
        """Make the batch's jobs; the batch, and whether it was made before (a replay).

        An idempotency `key` names the batch (per caller) when the body does not.
        """
        batch_id = _batch_id(body, caller, key)
        if _BATCH_ID.fullmatch(batch_id) is None or (key is None and batch_id.startswith(_KEYED)):
            raise ApiError(
                400,
                "invalid_request",
                f"batch id {batch_id[:40]!r} is not usable: 1-100 letters, digits, '-', '_' or '='",
            )
        requests = batch_requests(body, self._services, caller, batch_id)
        await self._check(requests, caller)
        record = BatchRecord(
            batch_id=batch_id,
            caller=caller.id,
            size=len(requests),
            request_hash=batch_hash(requests),
            created_at=now(),
        )
        try:
            self._services.check_room(caller.id, len(requests))
        except ApiError:
            # The queue's bounds are for new jobs: the same batch again makes only what it lacks.
            if not await self._sent_before(record):
                raise
        replayed = False
        created: int | None = None  # the record's revision, when this call made it
        try:
            created = await self._kv.create(batch_id, encode(record))
        except KeyWrongLastSequenceError:
            record, replayed = await self._again(record, key), True
        try:
            await self._make(record, requests, created)
        finally:
            with contextlib.suppress(ApiError):  # 404: refused whole, the record taken back
                if (await self._read(batch_id))[0].cancelled:
                    await self.cancel_jobs(record)
        return record, replayed

    async def _check(self, requests: list[JobRequest], caller: Caller) -> None:
        """Every check of the submit path, on every job, before any is made."""
        await check_inputs_owned(self._services, caller, requests[0].inputs)
        servers = self._services.fleet.table
        native = self._services.native
        # Merged once: the fleet's node definitions are large, and the same for every job.
        registry = await native.fleet.registry() if native is not None else None
        for index, request in enumerate(requests):
            try:
                await check_overrides(self._services, request, registry)
                check_request(request, servers)
            except Refused as exc:
                error = exc.error
                status = SUBMIT_STATUS.get(error.code, 400)
                refused = ApiError(status, error.code, error.message, error.details)
                raise _of_job(refused, index) from None
            except ApiError as exc:
                raise _of_job(exc, index) from None

    async def _sent_before(self, record: BatchRecord) -> bool:
        """Whether this very batch (same id, caller and jobs) was submitted before."""
        try:
            found, _ = await self._read(record.batch_id)
        except ApiError:
            return False
        return found.caller == record.caller and found.request_hash == record.request_hash

    async def _again(self, record: BatchRecord, key: str | None) -> BatchRecord:
        """The batch sent again: the same one goes on; another under its id is a 409 (a 422
        under an idempotency key, as for a job)."""
        found, _ = await self._read(record.batch_id)
        if (
            key is not None
            and found.caller == record.caller
            and found.request_hash != record.request_hash
        ):
            raise ApiError(
                422,
                "idempotency_mismatch",
                f"the idempotency key {key!r} was used for another batch ({record.batch_id}): "
                "send that batch again, or use a new key for this one",
                {"batch_id": record.batch_id},
            )
        if found.caller != record.caller or found.request_hash != record.request_hash:
            # Another caller's batch answers the same: it tells only that the id is taken.
            raise ApiError(
                409, "duplicate_batch", f"batch id {record.batch_id!r} is already in use"
            )
        if found.cancelled:
            await self.cancel_jobs(found)
            raise ApiError(
                409,
                "batch_cancelled",
                f"batch {record.batch_id} was cancelled: its jobs are not made any more",
            )
        return found

    async def _make(
        self, record: BatchRecord, requests: list[JobRequest], created: int | None
    ) -> None:
        """Submit the batch's jobs a round at a time; the first refusal stops it.

        A refusal of the first round, none of whose jobs was made, leaves nothing behind: the
        record this call `created` is taken back (the queue filled between the batch's check and
        its jobs), so the batch is refused whole and its id stays free.
        """
        made = record.made
        try:
            for start in range(0, len(requests), ROUND):
                round_ = requests[start : start + ROUND]
                if start + len(round_) <= record.made:
                    # Accepted before: making them again would make anew those whose records
                    # (and logs) have expired since.
                    continue
                found, _ = await self._read(record.batch_id)
                if found.cancelled:
                    return
                outcomes = await asyncio.gather(
                    *(self._services.submit(request) for request in round_),
                    return_exceptions=True,
                )
                for offset, outcome in enumerate(outcomes):
                    if isinstance(outcome, ApiError):
                        nothing = start == 0 and all(
                            isinstance(other, BaseException) for other in outcomes
                        )
                        if nothing and await self._take_back(record.batch_id, created):
                            raise _of_job(outcome, start + offset)
                        raise _of_job(outcome, start + offset, made=True)
                    if isinstance(outcome, BaseException):
                        raise outcome
                made = start + len(round_)
        finally:
            if made > record.made:
                await self._mark_made(record.batch_id, made)

    async def _take_back(self, batch_id: str, created: int | None) -> bool:
        """Delete the record made by this call, unless it changed since (a resend going on)."""
        if created is None:
            return False
        try:
            await self._kv.delete(batch_id, last=created)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def _mark_made(self, batch_id: str, made: int) -> None:
        """Note that the batch's jobs below `made` exist (never lowering it, keeping a cancel).

        Best effort: unmarked, jobs that expire later are told `unsubmitted`, and a resend
        makes them again, as before the mark existed; the submission's own answer stands.
        """
        try:
            while True:
                found, revision = await self._read(batch_id)
                if found.made >= made:
                    return
                marked = msgspec.structs.replace(found, made=made)
                try:
                    await self._kv.update(batch_id, encode(marked), last=revision)
                except KeyWrongLastSequenceError:
                    continue  # changed meanwhile (cancelled, or marked by another): read again
                return
        except Exception:
            log.warning(
                "batch %s: could not note that %d jobs are made", batch_id, made, exc_info=True
            )

    async def find(self, batch_id: str, caller: Caller) -> BatchRecord:
        """The batch, or a 404 (also when it is another caller's)."""
        record, _ = await self._read(batch_id)
        if not caller.owns(record.caller):
            raise _unknown(batch_id)
        return record

    async def cancel(self, batch_id: str, caller: Caller) -> BatchRecord:
        """Mark the batch cancelled, then cancel every job of it not ended."""
        record = await self.find(batch_id, caller)
        while not record.cancelled:
            record, revision = await self._read(batch_id)
            if record.cancelled:
                break
            marked = msgspec.structs.replace(record, cancelled=True)
            try:
                await self._kv.update(batch_id, encode(marked), last=revision)
            except KeyWrongLastSequenceError:
                continue  # changed meanwhile (cancelled by another): read it again
            record = marked
        await self.cancel_jobs(record)
        return record

    async def cancel_jobs(self, record: BatchRecord) -> None:
        """Cancel each job of the batch that exists and has not ended."""

        async def cancel(index: int) -> None:
            job_id = job_id_of(record.batch_id, index)
            try:
                await self._services.cancel(job_id)
            except ApiError as exc:
                if exc.status not in (404, 409):  # not made, or ended already: nothing to do
                    raise

        await each(range(record.size), cancel)

    async def status(
        self, record: BatchRecord, result: Callable[[JobRecord], JobResult]
    ) -> BatchStatus:
        """The batch now: its jobs (through `result`), counts by status, what is missing."""

        async def read(index: int) -> JobRecord | None:
            try:
                return await self._services.record(job_id_of(record.batch_id, index))
            except ApiError as exc:
                if exc.status == 404:
                    return None
                raise

        records = await each(range(record.size), read)
        missing = [index for index, job in enumerate(records) if job is None]
        # A job made once and not found any more ended longer ago than the retention.
        expired = [index for index in missing if index < record.made]
        unsubmitted = [index for index in missing if index >= record.made]
        jobs = [job for job in records if job is not None]
        counts = Counter(job.status.value for job in jobs)
        if unsubmitted:
            counts[UNSUBMITTED] = len(unsubmitted)
        if expired:
            counts[EXPIRED] = len(expired)
        ended = all(job.status.terminal for job in jobs)
        return BatchStatus(
            batch_id=record.batch_id,
            size=record.size,
            counts=dict(counts),
            done=ended and (not unsubmitted or record.cancelled),
            cancelled=record.cancelled,
            jobs=[result(job) for job in jobs],
            unsubmitted=unsubmitted,
            expired=expired,
        )

    async def _read(self, batch_id: str) -> tuple[BatchRecord, int]:
        try:
            entry = await self._kv.get(batch_id)
        except (KeyNotFoundError, InvalidKeyError, ValueError):  # none, or no batch id can be
            raise _unknown(batch_id) from None
        assert entry.value is not None and entry.revision is not None
        return decode(entry.value, BatchRecord), entry.revision


def _batch_id(body: BatchSubmission, caller: Caller, key: str | None) -> str:
    """The batch's id: the body's, else one named by the caller's idempotency key, else new."""
    if key is None:
        return body.batch_id if body.batch_id is not None else new_id()
    if body.batch_id is not None:
        raise ApiError(
            400,
            "invalid_request",
            "give a batch_id or an Idempotency-Key, not both: either makes sending it again safe",
        )
    problem = key_problem(key)
    if problem is not None:
        raise ApiError(400, "invalid_request", problem)
    # Per caller, as a job's key: another caller's same key names another batch.
    return _KEYED + scoped_key(caller.id, key)[:48]


def _unknown(batch_id: str) -> ApiError:
    return ApiError(404, "unknown_batch", f"no batch {batch_id!r}")


def _of_job(exc: ApiError, index: int, *, made: bool = False) -> ApiError:
    """A job's refusal as the batch's, naming the job; `made`: others may have been made."""
    then = (
        "; other jobs of the batch may have been made: send the same batch again, once this "
        "is fixed, to make the rest"
        if made
        else "; no job of the batch was made"
    )
    details: dict[str, Any] = {"index": index, "job": exc.details}
    return ApiError(
        exc.status,
        exc.code,
        f"job {index} of the batch: {exc.message}{then}",
        details,
        retry_after=exc.retry_after,
    )
