"""What a leader mends: the open jobs it takes over, submissions that never completed, and jobs
on servers that fell silent (handed back to the queue).
"""

from __future__ import annotations

import contextlib
import logging
import time

import nats.errors

from gateway.balancer.binding import Binder
from gateway.balancer.joblog import Unreadable
from gateway.balancer.lead import Lead
from gateway.balancer.recording import Recorder
from gateway.bus.contract import (
    DispatchedData,
    JobRecord,
    JobRequest,
    JobStatus,
    Queued,
    Retried,
    RetriedData,
    decode,
)
from gateway.bus.events import EventPublishError, JobEnded
from gateway.bus.jobstate import BOUND, ends_attempt, ends_job
from gateway.bus.kvsnapshot import kv_snapshot

log = logging.getLogger(__name__)


class Recovery:
    """Takes over open jobs at the start of a leadership and hands back the stranded ones."""

    def __init__(
        self, lead: Lead, binder: Binder, recorder: Recorder, *, stale_grace: float
    ) -> None:
        self._lead = lead
        self._binder = binder
        self._recorder = recorder
        self._stale_grace = stale_grace
        self._reconnects = 0  # of this connection, as last seen
        self._since = time.monotonic()

    # -- taking over ---------------------------------------------------------------------

    async def load_records(self) -> None:
        """Take every open job from KV: pending ones back into the queue."""
        self._since = time.monotonic()
        for value in (await kv_snapshot(self._lead.js, self._lead.subjects.jobs_bucket)).values():
            record = decode(value, JobRecord)
            if not record.status.terminal:
                await self._adopt(record)
        log.info(
            "leading: %d open jobs, %d pending",
            len(self._lead.book.records),
            len(self._lead.book.queue),
        )

    async def _adopt(self, record: JobRecord) -> None:
        try:
            request = await self._lead.joblog.request_of(record.job_id)
        except Unreadable:
            self._lead.book.look_again_soon(record)
            return
        if request is None:
            # Being submitted right now (its queued event is on the way), or a submission that
            # died half-way; the second kind is failed once it has waited long enough.
            self._lead.book.unconfirmed_since(record)
            return
        await self._take(record, request)

    async def _take(self, record: JobRecord, request: JobRequest) -> None:
        self._lead.book.take(record, request)
        # The leader before may have stopped between the record and the job: send it
        # (again). The same message id makes a copy still in the stream a no-op, and an
        # adapter adopts a prompt it already has instead of running it twice.
        if (
            record.status is JobStatus.DISPATCHED
            and record.server_id is not None
            and await self._complete_dispatched(record)
        ):
            await self._binder.send(record, request)

    async def _complete_dispatched(self, record: JobRecord) -> bool:
        """Append the bound attempt's `dispatched` if the leader before stopped short of it.

        False when the job's log has ended (its end is on its way to the record).
        """
        assert record.server_id is not None
        try:
            last = await self._lead.joblog.last_event(record.job_id)
        except Unreadable:
            return True  # the job is sent all the same
        if last is not None and ends_job(last):
            return False
        # The log still ends where the bind started from: the queued job, or the hand-back of
        # the attempt before.
        if (isinstance(last, Queued) and record.attempt == 1) or (
            isinstance(last, Retried) and last.data.attempt == record.attempt - 1
        ):
            log.info("job %s: appending the dispatched event its binding missed", record.job_id)
            try:
                await self._lead.publisher.emit(
                    record.job_id,
                    DispatchedData(server_id=record.server_id, attempt=record.attempt),
                    server_id=record.server_id,
                )
            except JobEnded:
                return False
        return True

    # -- submissions that never completed ------------------------------------------------

    async def fail_unconfirmed(self) -> None:
        """Fail the records whose queued event never came; take those whose event is there."""
        for record in self._lead.book.expired_unconfirmed():
            try:
                request = await self._lead.joblog.request_of(record.job_id)
            except Unreadable:
                self._lead.book.look_again_soon(record)
                continue
            if request is None:
                log.error("job %s has a record but never got its queued event", record.job_id)
                self._lead.book.keep(record)  # so that its failure is recorded
                await self._lead.book.fail(record, "lost", "the job's submission did not complete")
            elif record.job_id not in self._lead.book.records:
                await self._take(record, request)

    # -- servers removed from the registry -------------------------------------------------

    async def fail_pinned_to_removed(self) -> None:
        """Fail the waiting jobs pinned to a server that is removed: none will run them.

        Looked at every round, not once per removal: a job can reach the queue after the
        removal was noticed (its `queued` event applied late, a submission that raced the
        removal, a record adopted later, a hand-back), and one whose failure could not be
        published is tried again. The index makes a round cost the servers jobs are pinned to.
        """
        book = self._lead.book
        for server_id in book.pinned.servers():
            if not self._lead.servers.is_removed(server_id):
                continue
            for job_id in book.pinned.of(server_id):
                record = book.records.get(job_id)
                if record is None or record.status is not JobStatus.QUEUED:
                    continue  # bound before the removal: its adapter finishes or hands it back
                if self._lead.publisher.ended(job_id) is not None:
                    continue  # its end is out, on its way to the record
                book.queue.discard(job_id)
                try:
                    await book.fail(record, "server_removed", f"server {server_id} was removed")
                except (EventPublishError, nats.errors.Error) as exc:
                    log.warning("job %s: could not fail it yet (%s); next round", job_id, exc)

    # -- servers that fell silent ----------------------------------------------------------

    async def hand_back_from_dead_servers(self) -> None:
        """Hand back the attempts bound to servers whose heartbeats stopped."""
        warming_up = time.monotonic() - self._since < self._stale_grace
        reconnects = int(self._lead.nc.stats["reconnects"])
        if reconnects != self._reconnects:
            # Back from a broker outage: its servers' silence meanwhile proves nothing.
            self._reconnects = reconnects
            self._lead.servers.on_reconnected()
        book = self._lead.book
        for server_id, job_id in book.bound.pairs():
            record = book.records.get(job_id)
            if record is None or record.status not in BOUND or record.server_id != server_id:
                continue  # it ended or moved on while an earlier one was looked at
            if book.handed_back.get(record.job_id) == record.attempt:
                continue
            if self._recorder.holds(record.job_id):
                continue  # its record may be behind its events: an end may be on the way
            servers = self._lead.servers
            state = servers.get(server_id)
            if state is None and servers.finishing(server_id):
                continue  # removed, and its adapter still finishes the job: leave it to it
            silent = state is None or state.heartbeat is None
            if (state is not None and servers.is_stale(state)) or (silent and not warming_up):
                book.handed_back[record.job_id] = record.attempt
                try:
                    last = await self._lead.joblog.last_event(record.job_id)
                except Unreadable:
                    del book.handed_back[record.job_id]  # look again next round
                    continue
                if last is not None and ends_attempt(last, record.attempt):
                    continue  # the end is in the log, on its way to this record
                if servers.is_removed(server_id):
                    reason = f"server {record.server_id} was removed"
                else:
                    reason = f"server {record.server_id} stopped sending heartbeats"
                log.warning("job %s: %s; handing it back", record.job_id, reason)
                with contextlib.suppress(JobEnded):  # it ended: nothing to hand back
                    await self._lead.publisher.emit(
                        record.job_id,
                        RetriedData(
                            attempt=record.attempt,
                            reason=reason,
                            started=record.status is JobStatus.RUNNING,
                            previous_server_id=record.server_id,
                        ),
                    )
