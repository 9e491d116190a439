"""What the leading balancer knows of the open jobs, and the one place their records change.

The records are kept in memory as the leader's working copy of KV `comfy_jobs`, with the
indexes a dispatch round reads (the queue, the bound jobs per server) and what the leader
remembers per job meanwhile (its request until bound, its requirements, when it started, the
attempt already handed back). Every change of a record goes through `keep`, so the indexes
never disagree with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import time
from collections.abc import AsyncIterator
from typing import Final

from nats.js.kv import KeyValue

from gateway.balancer.endrate import EndRates
from gateway.balancer.expiry import EndedRecords
from gateway.balancer.loadclock import LoadClock
from gateway.balancer.pins import PinnedJobs
from gateway.balancer.placement import Requirements, requirements
from gateway.balancer.queue import BoundJobs, PendingQueue
from gateway.balancer.shares import Shares, caller_key
from gateway.bus.contract import (
    Backlog,
    CallerBacklog,
    FailedData,
    JobRecord,
    JobRequest,
    JobStatus,
    encode,
    now,
)
from gateway.bus.events import EventPublisher, JobEnded
from gateway.bus.retry import through_election
from gateway.comfyui.shape import JobShape, shape_of

# How long a record may wait for its queued event before the submission is declared lost.
UNCONFIRMED_GRACE_S: Final = 30.0
# A job handed back after a failed try waits this long before its next, doubling per try up
# to the cap, and drawn between half and all of it, so that jobs failed together by one
# server do not all come back at the same instant.
BACKOFF_FIRST_S: Final = 0.5
BACKOFF_CAP_S: Final = 30.0
# Callers a Backlog lists, those with the most jobs waiting first: it is one KV value, read by
# every submission's check, and a caller not listed is taken to have as many as the last listed.
BACKLOG_CALLERS: Final = 1000


def backoff(tries: int) -> float:
    """How long a job waits before its next try, after `tries` tries (jittered)."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** max(0, tries - 1))
    return random.uniform(ceiling / 2, ceiling)


class JobBook:
    """The leader's records of open jobs, their indexes and what it remembers of each."""

    def __init__(
        self,
        jobs_kv: KeyValue,
        publisher: EventPublisher,
        *,
        ended: EndedRecords | None = None,
        shares: Shares | None = None,
    ) -> None:
        self._kv = jobs_kv
        self._publisher = publisher
        self._ended = ended
        self.records: dict[str, JobRecord] = {}
        self.bound = BoundJobs()  # kept by keep and forget
        self.queue = PendingQueue(shares)
        self.ends = EndRates()  # how fast jobs end, for the backlog's Retry-After
        self.needs: dict[str, Requirements] = {}
        self.pinned = PinnedJobs()  # kept by take and forget
        self.shapes: dict[str, JobShape] = {}  # what sizes each job, for its cost estimates
        self.clock = LoadClock()  # running jobs' loader times
        self.requests: dict[str, JobRequest] = {}  # of queued jobs seen arriving
        self.started_at: dict[str, float] = {}
        self.handed_back: dict[str, int] = {}  # job id -> attempt already handed back
        # Records seen without their queued event, and since when (monotonic).
        self.unconfirmed: dict[str, tuple[JobRecord, float]] = {}
        # Jobs waiting out their backoff before they are queued again: (ready at, job id).
        self._deferred: list[tuple[float, str]] = []
        # Job id -> the server that last handed it back: another is preferred for its next try.
        self.avoid: dict[str, str] = {}
        # Job id -> (lock, users): one change of a job's record at a time (see `changing`).
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def changing(self, job_id: str) -> AsyncIterator[None]:
        """Hold the job's record still: the binder and the event applier both read it, await,
        and write it; without this, a cancel applied during a binding's await would be
        overwritten by the binding (and the job wait for ever)."""
        lock, users = self._locks.setdefault(job_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[job_id]

    def open_statuses(self) -> list[str]:
        """The status of every job not yet finished."""
        return [record.status.value for record in self.records.values()]

    def take(self, record: JobRecord, request: JobRequest) -> None:
        """Hold an open job: its record, its requirements, and a queued job in the queue."""
        self.keep(record)
        need = self.needs[record.job_id] = requirements(request)
        if need.server is not None:
            self.pinned.add(need.server, record.job_id)
        self.shapes[record.job_id] = shape_of(request.workflow)
        if record.status is JobStatus.QUEUED:
            self.queue.push(record)

    def keep(self, record: JobRecord) -> None:
        """Remember `record` as its job's latest; every change of `records` goes here."""
        self.bound.change(self.records.get(record.job_id), record)
        self.records[record.job_id] = record

    def forget(self, job_id: str) -> None:
        """Drop a job that ended: its record, its indexes, what was remembered of it."""
        record = self.records.pop(job_id, None)
        self.bound.change(record, None)
        if record is not None:
            self.ends.ended(caller_key(record.caller))
        self._publisher.forget(job_id)
        self.requests.pop(job_id, None)
        self.needs.pop(job_id, None)
        self.pinned.forget(job_id)
        self.shapes.pop(job_id, None)
        self.clock.forget(job_id)
        self.queue.discard(job_id)
        self.handed_back.pop(job_id, None)
        self.avoid.pop(job_id, None)

    def requeue(
        self, record: JobRecord, *, after_failure: bool, failed_on: str | None = None
    ) -> None:
        """Queue a handed-back job again: after its backoff if its try failed, and on
        another server than `failed_on` if there is one that can take it."""
        if failed_on is not None:
            self.avoid[record.job_id] = failed_on
        if not after_failure:
            self.queue.push(record)
            return
        ready_at = time.monotonic() + backoff(record.attempt)
        heapq.heappush(self._deferred, (ready_at, record.job_id))

    def room(self, caller: str) -> int | None:
        """How many more of the caller's jobs may be bound now; None: no cap."""
        cap = self.queue.shares.cap(caller)
        return None if cap is None else cap - self.bound.of_caller(caller)

    def backlog(self, applied_seq: int) -> Backlog:
        """The queue by caller now, for the submit path's bounds and the API."""
        pending = self.queue.pending()
        # Waiting out a backoff is waiting too.
        for job_id in {job_id for _, job_id in self._deferred}:
            record = self.records.get(job_id)
            if record and record.status is JobStatus.QUEUED and job_id not in self.queue:
                caller = caller_key(record.caller)
                pending[caller] = pending.get(caller, 0) + 1
        bound = self.bound.callers()
        callers = sorted(pending.keys() | bound.keys(), key=lambda c: -pending.get(c, 0))
        listed = callers[:BACKLOG_CALLERS]
        unlisted = callers[BACKLOG_CALLERS:]
        return Backlog(
            at=now(),
            applied_seq=applied_seq,
            pending=sum(pending.values()),
            bound=sum(bound.values()),
            ended_per_s=self.ends.overall(),
            callers=[
                CallerBacklog(
                    caller=caller,
                    pending=pending.get(caller, 0),
                    bound=bound.get(caller, 0),
                    ended_per_s=self.ends.of(caller),
                )
                for caller in listed
            ],
            unlisted_pending=pending.get(unlisted[0], 0) if unlisted else 0,
        )

    def release_ready(self) -> None:
        """Queue the deferred jobs whose backoff is over (and that are still waiting)."""
        now = time.monotonic()
        while self._deferred and self._deferred[0][0] <= now:
            _, job_id = heapq.heappop(self._deferred)
            record = self.records.get(job_id)
            if record is not None and record.status is JobStatus.QUEUED:
                self.queue.push(record)

    async def store(self, record: JobRecord) -> None:
        """Write `record` to KV, then keep it."""
        # KV first: a write that fails leaves memory as it was, so that the event, delivered
        # again, is applied again (and not taken for one already seen).
        if record.status.terminal and self._ended is not None:
            # Only an ended record expires: the book never loses an open job's.
            ended = self._ended
            await through_election(
                lambda: ended.put(record.job_id, encode(record)), f"writing job {record.job_id}"
            )
        else:
            await through_election(
                lambda: self._kv.put(record.job_id, encode(record)),
                f"writing job {record.job_id}",
            )
        self.keep(record)

    async def fail(self, record: JobRecord, code: str, message: str) -> None:
        """Publish the job's failure; its record follows when the event comes back.

        A job whose log has ended meanwhile (cancelled, say) keeps that end.
        """
        data = FailedData(code=code, message=message, attempt=record.attempt)
        with contextlib.suppress(JobEnded):
            await self._publisher.emit(record.job_id, data)

    def unconfirmed_since(self, record: JobRecord, since: float | None = None) -> None:
        """Wait for the job's queued event; `since` (monotonic) defaults to now."""
        self.unconfirmed[record.job_id] = (record, time.monotonic() if since is None else since)

    def look_again_soon(self, record: JobRecord) -> None:
        """Look at an unconfirmed job again in about a second (its log could not be read)."""
        self.unconfirmed_since(record, time.monotonic() - UNCONFIRMED_GRACE_S + 1.0)

    def expired_unconfirmed(self) -> list[JobRecord]:
        """Unconfirmed jobs that have waited past the grace, no longer waited for."""
        expired = [
            record
            for record, since in self.unconfirmed.values()
            if time.monotonic() - since > UNCONFIRMED_GRACE_S
        ]
        for record in expired:
            del self.unconfirmed[record.job_id]
        return expired
