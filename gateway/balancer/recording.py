"""The leader's records follow the job's events: every event, read once, applied in order.

Events come from a durable consumer of the EVENTS stream, so a new leader continues exactly
where the last one stopped. Jobs are independent: each job's events are applied in order,
different jobs' at the same time. A record is written before its event is acked, and an event
that fails to apply holds back that job's later events until it has been applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from gateway.balancer.lead import Lead
from gateway.bus.contract import (
    Cancel,
    Cancelled,
    Event,
    JobRecord,
    JobStatus,
    NodeStarted,
    Queued,
    Retried,
    Running,
    Succeeded,
    decode,
    decode_event,
    encode,
)
from gateway.bus.jobstate import BOUND, apply_event, attempts_left, record_from_queued
from gateway.bus.retry import TRANSIENT, through_election
from gateway.webhooks.feed import feed, wanted

log = logging.getLogger(__name__)

_BATCH = 256


def _stream_seq(message: Msg) -> int:
    return int(message.metadata.sequence.stream)


class Recorder:
    """Applies events to the book's records and ends, requeues or forwards what they say."""

    def __init__(self, lead: Lead, *, on_applied: Callable[[], None], tick: float) -> None:
        self._lead = lead
        self._on_applied = on_applied
        self._tick = tick
        # Job id -> seq of its event that failed to apply: its later events wait for that one,
        # also across batches, and nothing is decided from its record meanwhile.
        self._held: dict[str, int] = {}
        self.replayed_upto = 2**63  # until the dispatcher knows: no event counts as a first sight

    def holds(self, job_id: str) -> bool:
        """Whether an event of the job failed to apply and is to be delivered again."""
        return job_id in self._held

    def forget_held(self) -> None:
        """A new leadership: what was held is delivered again to its consumer."""
        self._held.clear()

    async def consume(self, sub: JetStreamContext.PullSubscription) -> None:
        """Fetch and apply events until cancelled."""
        while True:
            try:
                messages = await sub.fetch(_BATCH, timeout=self._tick)
            except TimeoutError:  # nats-py raises its own subclass or asyncio's: nothing came
                continue
            except TRANSIENT as exc:
                # The stream or its consumer is electing a leader: ask again after a pause.
                log.warning("fetching events failed (%s); fetching again", exc)
                await asyncio.sleep(self._tick)
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
            self._on_applied()

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
        book = self._lead.book
        async with book.changing(event.job_id):
            record = book.records.get(event.job_id)
            if isinstance(event, Queued) and record is None:
                await self._on_new_job(event, message)
                return
            if record is None:
                return  # a job that ended before this leader started, or unknown
            if message is not None and wanted(record, event) and not record.status.terminal:
                # Before the record moves on: an event replayed after this is queued again
                # (and kept once), never skipped.
                await feed(self._lead.js, self._lead.subjects, record, event, _stream_seq(message))
            if isinstance(event, NodeStarted) and _of_running_attempt(record, event):
                shape = book.shapes.get(event.job_id)
                loaded = book.clock.node_started(event.job_id, shape, event.data.node_id, event.ts)
                self._learn_loads(event.server_id, loaded)  # the adapter's server, whatever try
            updated = apply_event(record, event)
            if updated is None:
                return
            await book.store(updated)
            if isinstance(event, Running):
                book.started_at[event.job_id] = event.ts
            if updated.status.terminal:
                self._finish(record, updated, event)
            elif isinstance(event, Retried):
                await self._requeue(updated, event)

    async def _on_new_job(self, event: Queued, message: Msg | None = None) -> None:
        book = self._lead.book
        book.unconfirmed.pop(event.job_id, None)
        if self._first_sight(event, message):
            record = record_from_queued(event)
        else:
            # KV is the truth: a replayed queued event of a job that has moved on must not
            # revive it.
            try:
                entry = await through_election(
                    lambda: self._lead.jobs_kv.get(event.job_id), f"reading job {event.job_id}"
                )
            except KeyNotFoundError:
                record = record_from_queued(event)
            else:
                assert entry.value is not None
                record = decode(entry.value, JobRecord)
        if record.status.terminal:
            return
        if record.status is JobStatus.QUEUED:
            # Kept until the job is bound: it saves reading the event back from the stream.
            book.requests[record.job_id] = event.data.request
        book.take(record, event.data.request)

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
        return meta.num_delivered == 1 and meta.sequence.stream > self.replayed_upto

    def _finish(self, before: JobRecord, after: JobRecord, event: Event) -> None:
        book = self._lead.book
        shape = book.shapes.get(after.job_id)
        loaded, loads = book.clock.ended(after.job_id, event.ts)
        self._learn_loads(before.server_id, loaded)
        book.forget(after.job_id)
        started = book.started_at.pop(after.job_id, None)
        # Only a success tells how fast a server is: a failure or a cancel may come at once or
        # after a crash and a restart, and one such outlier would starve a good server. And
        # only the success of the attempt running now: a late one of an attempt handed back
        # ran elsewhere, and from another start than the one remembered.
        if (
            started is not None
            and before.server_id is not None
            and isinstance(event, Succeeded)
            and _of_running_attempt(before, event)
        ):
            servers = self._lead.servers
            servers.observe_run(before.server_id, event.ts - started)
            if shape is not None:
                servers.costs.observe_run(before.server_id, shape, event.ts - started, loads)
                servers.note_resident(before.server_id, shape.models)
        if before.status in BOUND and before.server_id and after.attempt != before.attempt:
            # Ended by an attempt handed back earlier (a server thought dead reported back):
            # the attempt bound now is abandoned, and its adapter is told at once rather than
            # at its next event, since its server's slot is given to other work from now on.
            reason = f"the job ended in its attempt {after.attempt} ({after.status.value})"
            asyncio.get_running_loop().create_task(self._forward_cancel(before, reason))
        elif isinstance(event, Cancelled) and before.status in BOUND and before.server_id:
            # Cancelled while bound: make sure the adapter stops it too.
            asyncio.get_running_loop().create_task(self._forward_cancel(before))

    def _learn_loads(self, server_id: str | None, loaded: dict[str, float]) -> None:
        # As soon as a loader is done, not at the job's end: the next round may place a job
        # of that model, and the first load of a big one is the one that misleads most.
        for model, seconds in loaded.items():
            if server_id is not None:
                self._lead.servers.costs.observe_load(server_id, model, seconds)

    async def _forward_cancel(self, record: JobRecord, reason: str | None = None) -> None:
        assert record.server_id is not None
        cancel = Cancel(job_id=record.job_id)
        if reason is not None:
            cancel = Cancel(job_id=record.job_id, reason=reason)
        try:
            await self._lead.nc.request(
                self._lead.subjects.control(record.server_id), encode(cancel), timeout=2.0
            )
        except Exception:  # the adapter may be gone; its own check of the record stops it
            log.warning("could not forward the cancel of %s", record.job_id, exc_info=True)

    async def _requeue(self, record: JobRecord, event: Retried) -> None:
        self._lead.book.started_at.pop(record.job_id, None)
        self._lead.book.clock.forget(record.job_id)
        self._lead.book.handed_back.pop(record.job_id, None)
        need = self._lead.book.needs.get(record.job_id)
        if (
            need is not None
            and need.server is not None
            and self._lead.servers.is_removed(need.server)
        ):
            self._lead.book.keep(record)
            await self._lead.book.fail(
                record, "server_removed", f"server {need.server} was removed"
            )
            return
        if attempts_left(record):
            self._lead.book.requeue(
                record,
                after_failure=event.data.counts,
                failed_on=event.data.previous_server_id if event.data.counts else None,
            )
            return
        self._lead.book.keep(record)
        await self._lead.book.fail(
            record,
            "attempts_exhausted",
            f"gave up after {record.runs} tries (each is in the job's log); "
            f"last: {event.data.reason}",
        )


def _of_running_attempt(record: JobRecord, event: Event) -> bool:
    """Whether `event` comes from the attempt the record says is running (or has just ended).

    Node events name no attempt, but their server: an attempt handed back that goes on
    elsewhere (its server was only silent) reports from there.
    """
    attempt = getattr(event.data, "attempt", record.attempt)
    return (
        record.status is JobStatus.RUNNING
        and attempt == record.attempt
        and event.server_id == record.server_id
    )
