"""A dispatch round: which pending jobs go to which live servers, and binding them.

A round looks at the head of the queue (callers in fair order, those at their cap left out),
the servers that can take work, and what each job needs (checked once per kind of job and
server); `placement.plan` decides, and each binding writes the record, appends `dispatched` and
sends the job to the server's subject, in that order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Final

import msgspec

from gateway.balancer.estimates import RoundCosts, bound_work
from gateway.balancer.joblog import Unreadable
from gateway.balancer.lead import Lead
from gateway.balancer.placement import (
    Candidate,
    Pending,
    Requirements,
    left_idle,
    missing,
    schedule,
)
from gateway.bus.contract import (
    Capabilities,
    DispatchedData,
    Job,
    JobRecord,
    JobRequest,
    JobStatus,
    PlacementReason,
    encode,
    now,
)
from gateway.bus.events import JobEnded
from gateway.bus.retry import through_election

log = logging.getLogger(__name__)

# A server with no speed estimate yet is assumed to be as fast as the fleet's typical measured
# server (per unit of weight); with none measured, to take this long per job, divided by weight.
_DEFAULT_SECONDS_PER_JOB: Final = 1.0
# Before any run is measured, a sampler step of a 512 x 512 image is taken to last this long
# (a 20-step SD 1.5 image in 2 s): of the order of a model load, so that loads count at once.
_DEFAULT_SECONDS_PER_UNIT: Final = 0.1
# A server left idle this long (or ten of its estimated jobs, if longer) while jobs it could run
# waited is measured afresh: were its estimate wrong, nothing would ever correct it.
_REMEASURE_PASSED_OVER_S: Final = 30.0
_FITS_REMEMBERED: Final = 50_000


class Binder:
    """Runs dispatch rounds over the book's queue and sends what it binds."""

    def __init__(self, lead: Lead) -> None:
        self._lead = lead
        self._passed_over: dict[str, float] = {}  # server id -> idle with work waiting since
        # (requirements, server id) -> whether that server has what they need; cleared when
        # a server's capabilities or labels change (checked by identity).
        self._fits: dict[tuple[Requirements, str], bool] = {}
        self._fits_of: dict[str, tuple[Capabilities, dict[str, str]]] = {}

    def _candidates(self, costs: RoundCosts) -> list[Candidate]:
        typical = self._lead.servers.typical_seconds_per_job() or _DEFAULT_SECONDS_PER_JOB
        typical_slots = self._lead.servers.typical_model_slots()
        at = now()
        candidates = []
        for s in self._lead.servers.open_for_work():
            if s.capabilities is None:
                continue
            seconds_per_job = s.seconds_per_job or typical / max(s.weight, 0.01)
            slots = s.model_slots or typical_slots
            busy, resident = bound_work(
                self._lead.book, s, costs, seconds_per_job=seconds_per_job, slots=slots, at=at
            )
            candidates.append(
                Candidate(
                    server_id=s.server_id,
                    capacity=s.capacity,
                    bound=self._lead.book.bound.count(s.server_id),
                    seconds_per_job=seconds_per_job,
                    busy_s=busy,
                    resident=tuple(resident),
                    model_slots=slots,
                )
            )
        return candidates

    async def round(self) -> None:
        """Bind what the plan says of the queue's head to the servers with room."""
        costs = RoundCosts(self._lead.servers, _DEFAULT_SECONDS_PER_UNIT)
        candidates = self._candidates(costs)
        queue = self._lead.book.queue
        if not candidates or not len(queue):
            return
        # Callers at their cap are left out of the window: their jobs wait, others' are bound.
        window = queue.head(
            max(64, 4 * sum(c.capacity for c in candidates)), room=self._lead.book.room
        )
        states = {c.server_id: self._lead.servers.get(c.server_id) for c in candidates}
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
            need = self._lead.book.needs[job_id]
            eligible = eligible_for.get(need)
            if eligible is None:
                eligible = eligible_for[need] = frozenset(
                    server_id
                    for server_id, capabilities, labels in usable
                    if (need.server is None or need.server == server_id)
                    and self._fit(need, server_id, capabilities, labels)
                )
            avoid = self._lead.book.avoid.get(job_id)
            if avoid in eligible and len(eligible) > 1:
                eligible = eligible - {avoid}  # it just failed this job: another one, please
            shape = self._lead.book.shapes.get(job_id)
            pending.append(Pending(job_id=job_id, eligible=eligible, shape=shape))
        bindings = schedule(pending, candidates, costs)
        self._note_passed_over(candidates, pending, [(b.job_id, b.server_id) for b in bindings])
        for binding in bindings:
            record = self._lead.book.records.get(binding.job_id)
            # An earlier binding's awaits let events in: this job may have ended or moved on.
            if record is not None and record.status is JobStatus.QUEUED:
                await self._bind(record, binding.server_id, binding.reason)

    def _note_passed_over(
        self,
        candidates: list[Candidate],
        pending: list[Pending],
        bindings: list[tuple[str, str]],
    ) -> None:
        """Measure afresh a server the plans have kept idle for long while work waited."""
        idle = left_idle(pending, candidates, bindings)
        now = self._lead.servers.now()
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
                self._lead.servers.forget_speed(c.server_id)
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

    async def _bind(self, record: JobRecord, server_id: str, reason: PlacementReason) -> None:
        request = self._lead.book.requests.get(record.job_id)
        if request is None:
            try:
                request = await self._lead.joblog.request_of(record.job_id)
            except Unreadable:
                return  # stays queued: the next round tries again
        if request is None:
            # The record stays, so that the failure, when its event comes back, is recorded.
            self._lead.book.queue.discard(record.job_id)
            await self._lead.book.fail(
                record, "lost", "the job's request is missing from the event log"
            )
            return
        # Shielded: a leader stopped half-way would leave a record that says "dispatched" for
        # a job never sent.
        await asyncio.shield(self._bind_to(record, request, server_id, reason))
        self._lead.book.requests.pop(record.job_id, None)

    async def _bind_to(
        self, record: JobRecord, request: JobRequest, server_id: str, reason: PlacementReason
    ) -> None:
        attempt = record.attempt + 1
        book = self._lead.book
        async with book.changing(record.job_id):
            if book.records.get(record.job_id) is not record:
                return  # an event changed it (a cancel, say) while this binding waited
            if self._lead.servers.is_removed(server_id):
                return  # removed since the round planned: the job waits for the next one
            # The moment of binding, in the record and its `dispatched` event alike: a server
            # removed after it had not been when the job was given to it.
            at = now()
            bound = msgspec.structs.replace(
                record,
                status=JobStatus.DISPATCHED,
                server_id=server_id,
                attempt=attempt,
                updated_at=at,
            )
            # The record first: once it says "dispatched", no other leader binds it again.
            await book.store(bound)
        book.queue.bound(record.job_id)
        # `dispatched` before the job: once the adapter has the job it appends `running` and
        # more, and a `dispatched` landing after those would misstate the job's course.
        try:
            await self._lead.publisher.emit(
                record.job_id,
                DispatchedData(server_id=server_id, attempt=attempt, reason=reason),
                server_id=server_id,
                ts=at,
            )
        except JobEnded:
            # Cancelled meanwhile: never sent. The record follows the end when it is applied.
            return
        await self.send(bound, request)

    async def send(self, bound: JobRecord, request: JobRequest) -> None:
        """Publish the bound attempt on its server's subject (again: its message id dedups)."""
        assert bound.server_id is not None
        job = Job(
            job_id=bound.job_id,
            attempt=bound.attempt,
            server_id=bound.server_id,
            request=request,
            submitted_at=bound.submitted_at,
            dispatched_at=bound.updated_at,
        )
        # The message id makes a retry after a lost answer a no-op.
        await through_election(
            lambda: self._lead.js.publish(
                self._lead.subjects.jobs(bound.server_id or ""),
                encode(job),
                headers={"Nats-Msg-Id": f"{bound.job_id}.{bound.attempt}"},
            ),
            f"sending job {bound.job_id}",
        )
