"""The leading balancer's work: keep job records from events, bind pending jobs to servers.

Only the lease holder runs this (see leader.py), so it is the single writer of existing records
in KV `comfy_jobs` and the only one deciding where a job goes. It reads every event through a
durable consumer, so a new leader continues exactly where the last one stopped; pending jobs are
rebuilt from KV on start, which is what makes them survive a restart.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Mapping
from typing import Final

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from gateway.balancer.placement import (
    Candidate,
    Pending,
    Requirements,
    left_idle,
    missing,
    plan,
    requirements,
)
from gateway.balancer.servers import ServerTable
from gateway.bus.contract import (
    Cancel,
    Cancelled,
    Capabilities,
    DispatchedData,
    Event,
    FailedData,
    Job,
    JobRecord,
    JobRequest,
    JobStatus,
    Queued,
    Retried,
    RetriedData,
    Running,
    Subjects,
    Succeeded,
    decode,
    decode_event,
    encode,
    now,
)
from gateway.bus.events import EventPublisher
from gateway.bus.jobstate import (
    BOUND,
    apply_event,
    attempts_left,
    ends_attempt,
    record_from_queued,
)
from gateway.bus.kvsnapshot import kv_snapshot
from gateway.lifecycle import stop_tasks, wait_event

log = logging.getLogger(__name__)

CONSUMER: Final = "balancer"
_BATCH: Final = 256
# A server with no speed estimate yet is assumed to be as fast as the fleet's typical measured
# server (per unit of weight); with none measured, to take this long per job, divided by weight.
_DEFAULT_SECONDS_PER_JOB: Final = 1.0
# A server left idle this long (or ten of its estimated jobs, if longer) while jobs it could run
# waited is measured afresh: were its estimate wrong, nothing would ever correct it.
_REMEASURE_PASSED_OVER_S: Final = 30.0
# How long a record may wait for its queued event before the submission is declared lost.
UNCONFIRMED_GRACE_S: Final = 30.0
_FITS_REMEMBERED: Final = 50_000


class _Unreadable(Exception):
    """The event log could not be read just now (not: what was looked for is missing)."""


class _Queue:
    """Pending jobs by priority (higher first), then age (older first).

    Removal is lazy: a heap entry counts only while it is its job's latest push, so a job
    discarded and pushed again (handed back) is never listed twice.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, str]] = []
        self._live: dict[str, int] = {}  # job id -> the token of its current heap entry
        self._pushes = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._live

    def push(self, record: JobRecord) -> None:
        if record.job_id not in self._live:
            token = next(self._pushes)
            self._live[record.job_id] = token
            entry = (-record.priority, record.submitted_at, token, record.job_id)
            heapq.heappush(self._heap, entry)

    def discard(self, job_id: str) -> None:
        self._live.pop(job_id, None)  # its heap entry is skipped lazily

    def _current(self, entry: tuple[int, float, int, str]) -> bool:
        return self._live.get(entry[3]) == entry[2]

    def head(self, n: int) -> list[str]:
        """The first `n` pending job ids in order, without removing them."""
        if len(self._heap) > 4 * len(self._live) + 64:
            self._heap = [entry for entry in self._heap if self._current(entry)]
            heapq.heapify(self._heap)
        # Popped and pushed back: n log N, where nsmallest would look at every waiting job.
        first: list[tuple[int, float, int, str]] = []
        while self._heap and len(first) < n:
            entry = heapq.heappop(self._heap)
            if self._current(entry):
                first.append(entry)
        for entry in first:
            heapq.heappush(self._heap, entry)
        return [entry[3] for entry in first]


class _Bound:
    """Which jobs each server holds (dispatched or running), kept up as records change.

    A dispatch round asks how many jobs each server holds, and which, many times a second;
    counting over every record would make it cost every job waiting in the queue.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, set[str]] = {}

    def change(self, before: JobRecord | None, after: JobRecord | None) -> None:
        """A job's record went from `before` to `after` (None: unknown, forgotten)."""
        if before is not None and before.server_id is not None:
            jobs = self._jobs.get(before.server_id)
            if jobs is not None:
                jobs.discard(before.job_id)
                if not jobs:
                    del self._jobs[before.server_id]
        if after is not None and after.status in BOUND and after.server_id is not None:
            self._jobs.setdefault(after.server_id, set()).add(after.job_id)

    def count(self, server_id: str) -> int:
        return len(self._jobs.get(server_id, ()))

    def pairs(self) -> list[tuple[str, str]]:
        """(server id, job id) of every bound job, as a list: callers change records."""
        return [(server_id, job_id) for server_id, jobs in self._jobs.items() for job_id in jobs]


class Dispatcher:
    """Binds jobs to servers and keeps their records, while this process leads."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        jobs_kv: KeyValue,
        subjects: Subjects,
        servers: ServerTable,
        publisher: EventPublisher,
        *,
        tick: float = 0.5,
        stale_grace: float = 3.0,
    ) -> None:
        self._nc = nc
        self._js = js
        self._kv = jobs_kv
        self._subjects = subjects
        self._servers = servers
        self._publisher = publisher
        self._tick = tick
        self._stale_grace = stale_grace
        self._records: dict[str, JobRecord] = {}
        self._bound = _Bound()  # kept by _keep and _forget
        self._needs: dict[str, Requirements] = {}
        self._requests: dict[str, JobRequest] = {}  # of queued jobs seen arriving
        self._queue = _Queue()
        self._started_at: dict[str, float] = {}
        self._handed_back: dict[str, int] = {}  # job id -> attempt already handed back
        self._passed_over: dict[str, float] = {}  # server id -> idle with work waiting since
        # Job id -> seq of its event that failed to apply: its later events wait for that one,
        # also across batches, and nothing is decided from its record meanwhile.
        self._held: dict[str, int] = {}
        self._reconnects = 0  # of this connection, as last seen
        # Records seen without their queued event, and since when (monotonic).
        self._unconfirmed: dict[str, tuple[JobRecord, float]] = {}
        self._wake = asyncio.Event()
        self._since = time.monotonic()
        self._replayed_upto = 2**63  # until run() knows: no event counts as a first sight
        # (requirements, server id) -> whether that server has what they need; cleared when
        # a server's capabilities or labels change (checked by identity).
        self._fits: dict[tuple[Requirements, str], bool] = {}
        self._fits_of: dict[str, tuple[Capabilities, dict[str, str]]] = {}

    def wake(self) -> None:
        """Ask for a dispatch round soon (a server reported room, say)."""
        self._wake.set()

    def open_statuses(self) -> list[str]:
        """The status of every job not yet finished."""
        return [record.status.value for record in self._records.values()]

    async def run(self) -> None:
        """Lead until cancelled."""
        self._since = time.monotonic()
        self._held.clear()  # what was held is delivered again to this leadership's consumer
        await self._load_records()
        self._replayed_upto = await self._replay_horizon()
        sub = await self._js.pull_subscribe(
            self._subjects.all_events,
            durable=CONSUMER,
            stream=self._subjects.events_stream,
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.ALL,
                max_ack_pending=20_000,
                # What a stopped leader had fetched but not applied reaches the next one after
                # this long: a job that ended just then shows its end no later.
                ack_wait=5,
            ),
        )
        loops = {
            asyncio.create_task(self._consume(sub), name="dispatcher-events"),
            asyncio.create_task(self._dispatch_loop(), name="dispatcher-binding"),
        }
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a loop only ends by failing: raise what it raised
        finally:
            # Not a TaskGroup: its single cancellation of each child can be lost inside nats-py,
            # and then leadership could never be given up.
            try:
                await stop_tasks(*loops)
            finally:
                await sub.unsubscribe()

    async def _replay_horizon(self) -> int:
        """0 if the durable consumer exists; else the stream's last sequence now.

        A consumer created afresh delivers every stored event again, each for the "first"
        time: up to this sequence, a queued event proves nothing and the record is read.
        """
        try:
            await self._js.consumer_info(self._subjects.events_stream, CONSUMER)
        except NotFoundError:
            info = await self._js.stream_info(self._subjects.events_stream)
            return int(info.state.last_seq)
        return 0

    async def _load_records(self) -> None:
        for value in (await kv_snapshot(self._js, self._subjects.jobs_bucket)).values():
            record = decode(value, JobRecord)
            if not record.status.terminal:
                await self._adopt(record)
        log.info("leading: %d open jobs, %d pending", len(self._records), len(self._queue))

    async def _adopt(self, record: JobRecord) -> None:
        try:
            request = await self._request_of(record.job_id)
        except _Unreadable:
            self._retry_unconfirmed(record)
            return
        if request is None:
            # Being submitted right now (its queued event is on the way), or a submission that
            # died half-way; the second kind is failed once it has waited long enough.
            self._unconfirmed[record.job_id] = (record, time.monotonic())
            return
        await self._take(record, request)

    async def _take(self, record: JobRecord, request: JobRequest) -> None:
        self._keep(record)
        self._needs[record.job_id] = requirements(request)
        if record.status is JobStatus.QUEUED:
            self._queue.push(record)
        elif record.status is JobStatus.DISPATCHED and record.server_id is not None:
            # The leader before may have stopped between the record and the job: send it
            # (again). The same message id makes a copy still in the stream a no-op, and an
            # adapter adopts a prompt it already has instead of running it twice.
            await self._complete_dispatched(record)
            await self._send(record, request)

    async def _complete_dispatched(self, record: JobRecord) -> None:
        """Append the bound attempt's `dispatched` if the leader before stopped short of it."""
        assert record.server_id is not None
        try:
            last = await self._last_event(record.job_id)
        except _Unreadable:
            return  # the job is sent all the same
        # The log still ends where the bind started from: the queued job, or the hand-back of
        # the attempt before.
        if (isinstance(last, Queued) and record.attempt == 1) or (
            isinstance(last, Retried) and last.data.attempt == record.attempt - 1
        ):
            log.info("job %s: appending the dispatched event its binding missed", record.job_id)
            await self._publisher.emit(
                record.job_id,
                DispatchedData(server_id=record.server_id, attempt=record.attempt),
                server_id=record.server_id,
            )

    def _retry_unconfirmed(self, record: JobRecord) -> None:
        """Look at the job again in about a second (its log could not be read)."""
        since = time.monotonic() - UNCONFIRMED_GRACE_S + 1.0
        self._unconfirmed[record.job_id] = (record, since)

    # -- events --------------------------------------------------------------------------

    async def _consume(self, sub: JetStreamContext.PullSubscription) -> None:
        while True:
            try:
                messages = await sub.fetch(_BATCH, timeout=self._tick)
            except TimeoutError:  # nats-py raises its own subclass or asyncio's: nothing came
                continue
            # Jobs are independent: each job's events are applied in order, different jobs'
            # at the same time, so a batch costs about one round of KV writes, not one per event.
            per_job: dict[str, list[tuple[Msg, Event]]] = {}
            for message in messages:
                try:
                    event = decode_event(message.data)
                except ValueError:
                    log.exception("dropping an event that does not decode: %r", message.data[:200])
                    await message.term()
                    continue
                per_job.setdefault(event.job_id, []).append((message, event))
            done: list[Msg] = []
            try:
                await asyncio.gather(
                    *(self._apply_in_order(items, done) for items in per_job.values())
                )
            except asyncio.CancelledError:
                await self._give_back(messages, done)
                raise
            # Records are written before the acks: a crash here replays, never skips.
            for message in done:
                await message.ack()
            self._wake.set()

    @staticmethod
    async def _give_back(messages: list[Msg], done: list[Msg]) -> None:
        """Stopped mid-batch (shutdown, lost lease): ack what was applied, nak the rest.

        Unacknowledged, the rest would reach the next leader only after the consumer's ack wait.
        """
        applied = {id(message) for message in done}
        for message in messages:
            try:
                await (message.ack() if id(message) in applied else message.nak())
            except nats.errors.Error as exc:  # then the ack wait brings it back
                log.warning("could not settle an event while stopping: %s", exc)

    async def _apply_in_order(self, items: list[tuple[Msg, Event]], done: list[Msg]) -> None:
        for index, (message, event) in enumerate(items):
            held = self._held.get(event.job_id)
            if held is not None and event.seq > held:
                # An earlier event of this job is to be delivered again: this one waits.
                await self._nak(items[index:])
                return
            try:
                await self._on_event(event, message)
            except Exception:  # one bad event must not stop the fleet; it is retried later
                log.exception("event %s of job %s failed; retrying it", event.seq, event.job_id)
                # The job's later events wait for it: applied out of order they would be
                # judged against the wrong record (a success, say, overtaken by a hand-back).
                self._held[event.job_id] = event.seq  # never above `held`: see the check above
                await self._nak(items[index:])
                return
            if held is not None and event.seq >= held:
                del self._held[event.job_id]
            done.append(message)

    async def _nak(self, items: list[tuple[Msg, Event]]) -> None:
        for message, event in items:
            try:
                await message.nak(delay=1.0)
            except nats.errors.Error as exc:  # redelivered after the ack wait anyway
                log.warning("could not nak event %s of job %s: %s", event.seq, event.job_id, exc)

    async def _on_event(self, event: Event, message: Msg | None = None) -> None:
        record = self._records.get(event.job_id)
        if isinstance(event, Queued) and record is None:
            await self._on_new_job(event, message)
            return
        if record is None:
            return  # a job that ended before this leader started, or unknown
        updated = apply_event(record, event)
        if updated is None:
            return
        await self._store(updated)
        if isinstance(event, Running):
            self._started_at[event.job_id] = event.ts
        if updated.status.terminal:
            self._finish(record, updated, event)
        elif isinstance(event, Retried):
            await self._requeue(updated, event)

    async def _on_new_job(self, event: Queued, message: Msg | None = None) -> None:
        self._unconfirmed.pop(event.job_id, None)
        if self._first_sight(event, message):
            record = record_from_queued(event)
        else:
            # KV is the truth: a replayed queued event of a job that has moved on must not
            # revive it.
            try:
                entry = await self._kv.get(event.job_id)
            except KeyNotFoundError:
                record = record_from_queued(event)
            else:
                assert entry.value is not None
                record = decode(entry.value, JobRecord)
        if record.status.terminal:
            return
        self._keep(record)
        self._needs[record.job_id] = requirements(event.data.request)
        if record.status is JobStatus.QUEUED:
            # Kept until the job is bound: it saves reading the event back from the stream.
            self._requests[record.job_id] = event.data.request
            self._queue.push(record)

    def _first_sight(self, event: Queued, message: Msg | None) -> bool:
        """Whether this queued event is certainly the job's first news to any leader.

        Then its record can only be the one the submitter wrote, and reading it back from KV
        (a round trip per new job) is skipped. That holds for the first event of the job's
        subject (nothing, not even a failure, came before it), delivered for the first time
        by a consumer that did not replay the stream from the start.
        """
        if message is None or event.seq != 1:
            return False
        try:
            meta = message.metadata
        except (ValueError, IndexError, nats.errors.Error):
            return False
        return meta.num_delivered == 1 and meta.sequence.stream > self._replayed_upto

    def _keep(self, record: JobRecord) -> None:
        """Remember `record` as its job's latest; every change of `_records` goes here."""
        self._bound.change(self._records.get(record.job_id), record)
        self._records[record.job_id] = record

    def _forget(self, job_id: str) -> None:
        self._bound.change(self._records.pop(job_id, None), None)
        self._publisher.forget(job_id)
        self._requests.pop(job_id, None)
        self._needs.pop(job_id, None)
        self._queue.discard(job_id)
        self._handed_back.pop(job_id, None)

    def _finish(self, before: JobRecord, after: JobRecord, event: Event) -> None:
        self._forget(after.job_id)
        started = self._started_at.pop(after.job_id, None)
        # Only a success tells how fast a server is: a failure or a cancel may come at once or
        # after a crash and a restart, and one such outlier would starve a good server.
        if started is not None and before.server_id is not None and isinstance(event, Succeeded):
            self._servers.observe_run(before.server_id, event.ts - started)
        if isinstance(event, Cancelled) and before.status in BOUND and before.server_id:
            # Cancelled while bound: make sure the adapter stops it too.
            asyncio.get_running_loop().create_task(self._forward_cancel(before))

    async def _forward_cancel(self, record: JobRecord) -> None:
        assert record.server_id is not None
        try:
            await self._nc.request(
                self._subjects.control(record.server_id),
                encode(Cancel(job_id=record.job_id)),
                timeout=2.0,
            )
        except Exception:  # the adapter may be gone; its own check of the record stops it
            log.warning("could not forward the cancel of %s", record.job_id, exc_info=True)

    async def _requeue(self, record: JobRecord, event: Retried) -> None:
        self._started_at.pop(record.job_id, None)
        self._handed_back.pop(record.job_id, None)
        if attempts_left(record):
            self._queue.push(record)
            return
        self._keep(record)
        await self._fail(
            record,
            "attempts_exhausted",
            f"gave up after {record.runs} attempt(s); last: {event.data.reason}",
        )

    async def _fail(self, record: JobRecord, code: str, message: str) -> None:
        data = FailedData(code=code, message=message, attempt=record.attempt)
        await self._publisher.emit(record.job_id, data)

    async def _store(self, record: JobRecord) -> None:
        # KV first: a write that fails leaves memory as it was, so that the event, delivered
        # again, is applied again (and not taken for one already seen).
        await self._kv.put(record.job_id, encode(record))
        self._keep(record)

    async def _last_event(self, job_id: str) -> Event | None:
        """The job's newest event in the log; _Unreadable if it cannot be read now."""
        try:
            return await self._publisher.last_event(job_id)
        except Exception as exc:
            log.warning("cannot read the last event of job %s now: %s", job_id, exc)
            raise _Unreadable(job_id) from exc

    async def _request_of(self, job_id: str) -> JobRequest | None:
        """The job's request from its `queued` event; None if there is none.

        _Unreadable when the log cannot be read just now (the broker restarting, a time-out):
        that is not a missing request, and must not fail the job.
        """
        try:
            raw = await self._js.get_msg(
                self._subjects.events_stream,
                seq=1,
                subject=self._subjects.events(job_id),
                next=True,
            )
        except NotFoundError:
            return None
        except Exception as exc:
            log.warning("cannot read the queued event of job %s now: %s", job_id, exc)
            raise _Unreadable(job_id) from exc
        if raw.data is None:
            return None
        event = decode_event(raw.data)
        return event.data.request if isinstance(event, Queued) else None

    # -- dispatching -----------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await wait_event(self._wake, self._tick)
            self._wake.clear()
            await self._fail_unconfirmed()
            await self._hand_back_from_dead_servers()
            await self._dispatch_round()

    def _candidates(self) -> list[Candidate]:
        typical = self._servers.typical_seconds_per_job() or _DEFAULT_SECONDS_PER_JOB
        return [
            Candidate(
                server_id=s.server_id,
                capacity=s.capacity,
                bound=self._bound.count(s.server_id),
                seconds_per_job=s.seconds_per_job or typical / max(s.weight, 0.01),
            )
            for s in self._servers.live()
            if s.capabilities is not None
        ]

    async def _dispatch_round(self) -> None:
        candidates = self._candidates()
        if not candidates or not len(self._queue):
            return
        window = self._queue.head(max(64, 4 * sum(c.capacity for c in candidates)))
        states = {c.server_id: self._servers.get(c.server_id) for c in candidates}
        usable = []
        for server_id, state in states.items():
            if state is None or state.capabilities is None:
                continue
            usable.append((server_id, state.capabilities, state.labels))
            before = self._fits_of.get(server_id)
            if before is None or before[0] is not state.capabilities or before[1] != state.labels:
                self._fits_of[server_id] = (state.capabilities, dict(state.labels))
                self._fits = {key: fit for key, fit in self._fits.items() if key[1] != server_id}
        eligible_for: dict[Requirements, frozenset[str]] = {}
        pending = []
        for job_id in window:
            need = self._needs[job_id]
            eligible = eligible_for.get(need)
            if eligible is None:
                eligible = eligible_for[need] = frozenset(
                    server_id
                    for server_id, capabilities, labels in usable
                    if (need.server is None or need.server == server_id)
                    and self._fit(need, server_id, capabilities, labels)
                )
            pending.append(Pending(job_id=job_id, eligible=eligible))
        bindings = plan(pending, candidates)
        self._note_passed_over(candidates, pending, bindings)
        for job_id, server_id in bindings:
            record = self._records.get(job_id)
            # An earlier binding's awaits let events in: this job may have ended or moved on.
            if record is not None and record.status is JobStatus.QUEUED:
                await self._bind(record, server_id)

    def _note_passed_over(
        self,
        candidates: list[Candidate],
        pending: list[Pending],
        bindings: list[tuple[str, str]],
    ) -> None:
        """Measure afresh a server the plans have kept idle for long while work waited."""
        idle = left_idle(pending, candidates, bindings)
        now = self._servers.now()
        for c in candidates:
            if c.server_id not in idle:
                self._passed_over.pop(c.server_id, None)
                continue
            since = self._passed_over.setdefault(c.server_id, now)
            if now - since > max(_REMEASURE_PASSED_OVER_S, 10 * c.seconds_per_job):
                log.info(
                    "server %s idle for %.0f s with work waiting (estimate %.3f s/job): "
                    "measuring it again",
                    c.server_id,
                    now - since,
                    c.seconds_per_job,
                )
                self._servers.forget_speed(c.server_id)
                del self._passed_over[c.server_id]
        for server_id in self._passed_over.keys() - {c.server_id for c in candidates}:
            del self._passed_over[server_id]

    def _fit(
        self,
        need: Requirements,
        server_id: str,
        capabilities: Capabilities,
        labels: Mapping[str, str],
    ) -> bool:
        # Jobs of one kind share their requirements: each (kind, server) is checked once.
        key = (need, server_id)
        fit = self._fits.get(key)
        if fit is None:
            if len(self._fits) > _FITS_REMEMBERED:
                self._fits.clear()
            fit = self._fits[key] = not missing(need, capabilities, labels)
        return fit

    async def _bind(self, record: JobRecord, server_id: str) -> None:
        request = self._requests.get(record.job_id)
        if request is None:
            try:
                request = await self._request_of(record.job_id)
            except _Unreadable:
                return  # stays queued: the next round tries again
        if request is None:
            # The record stays, so that the failure, when its event comes back, is recorded.
            self._queue.discard(record.job_id)
            await self._fail(record, "lost", "the job's request is missing from the event log")
            return
        # Shielded: a leader stopped half-way would leave a record that says "dispatched" for
        # a job never sent.
        await asyncio.shield(self._bind_to(record, request, server_id))
        self._requests.pop(record.job_id, None)

    async def _bind_to(self, record: JobRecord, request: JobRequest, server_id: str) -> None:
        attempt = record.attempt + 1
        at = now()
        bound = msgspec.structs.replace(
            record, status=JobStatus.DISPATCHED, server_id=server_id, attempt=attempt, updated_at=at
        )
        # The record first: once it says "dispatched", no other leader binds the job again.
        await self._store(bound)
        self._queue.discard(record.job_id)
        # `dispatched` before the job: once the adapter has the job it appends `running` and
        # more, and a `dispatched` landing after those would misstate the job's course.
        await self._publisher.emit(
            record.job_id, DispatchedData(server_id=server_id, attempt=attempt), server_id=server_id
        )
        await self._send(bound, request)

    async def _send(self, bound: JobRecord, request: JobRequest) -> None:
        assert bound.server_id is not None
        job = Job(
            job_id=bound.job_id,
            attempt=bound.attempt,
            server_id=bound.server_id,
            request=request,
            submitted_at=bound.submitted_at,
            dispatched_at=bound.updated_at,
        )
        await self._js.publish(
            self._subjects.jobs(bound.server_id),
            encode(job),
            headers={"Nats-Msg-Id": f"{bound.job_id}.{bound.attempt}"},
        )

    async def _fail_unconfirmed(self) -> None:
        expired = [
            record
            for record, since in self._unconfirmed.values()
            if time.monotonic() - since > UNCONFIRMED_GRACE_S
        ]
        for record in expired:
            del self._unconfirmed[record.job_id]
            try:
                request = await self._request_of(record.job_id)
            except _Unreadable:
                self._retry_unconfirmed(record)
                continue
            if request is None:
                log.error("job %s has a record but never got its queued event", record.job_id)
                self._keep(record)  # so that its failure is recorded
                await self._fail(record, "lost", "the job's submission did not complete")
            elif record.job_id not in self._records:
                await self._take(record, request)

    async def _hand_back_from_dead_servers(self) -> None:
        warming_up = time.monotonic() - self._since < self._stale_grace
        reconnects = int(self._nc.stats["reconnects"])
        if reconnects != self._reconnects:
            # Back from a broker outage: its servers' silence meanwhile proves nothing.
            self._reconnects = reconnects
            self._servers.on_reconnected()
        for server_id, job_id in self._bound.pairs():
            record = self._records.get(job_id)
            if record is None or record.status not in BOUND or record.server_id != server_id:
                continue  # it ended or moved on while an earlier one was looked at
            if self._handed_back.get(record.job_id) == record.attempt:
                continue
            if record.job_id in self._held:
                continue  # its record may be behind its events: an end may be on the way
            state = self._servers.get(server_id)
            silent = state is None or state.heartbeat is None
            if (state is not None and self._servers.is_stale(state)) or (silent and not warming_up):
                self._handed_back[record.job_id] = record.attempt
                try:
                    last = await self._last_event(record.job_id)
                except _Unreadable:
                    del self._handed_back[record.job_id]  # look again next round
                    continue
                if last is not None and ends_attempt(last, record.attempt):
                    continue  # the end is in the log, on its way to this record
                reason = f"server {record.server_id} stopped sending heartbeats"
                log.warning("job %s: %s; handing it back", record.job_id, reason)
                await self._publisher.emit(
                    record.job_id,
                    RetriedData(
                        attempt=record.attempt,
                        reason=reason,
                        started=record.status is JobStatus.RUNNING,
                        previous_server_id=record.server_id,
                    ),
                )
