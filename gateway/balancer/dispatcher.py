"""The leading balancer's work: keep job records from events, bind pending jobs to servers.

Only the lease holder runs this (gateway/bus/lease.py), so it is the single writer of existing
records in KV `comfy_jobs` and the only one deciding where a job goes. It reads every event
through a durable consumer, so a new leader continues exactly where the last one stopped;
pending jobs are rebuilt from KV on start, which is what makes them survive a restart.

The work is in four parts, each in its own module: `book` (the records and their indexes),
`recording` (events applied to records), `binding` (dispatch rounds) and `recovery` (jobs taken
over, lost submissions, hand-backs from silent servers). This module runs them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Final

from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from gateway.balancer.backlog import BacklogWriter
from gateway.balancer.binding import Binder
from gateway.balancer.book import JobBook
from gateway.balancer.expiry import EndedRecords
from gateway.balancer.history import HistoryLesson
from gateway.balancer.joblog import JobLog
from gateway.balancer.lead import Lead
from gateway.balancer.recording import Recorder
from gateway.balancer.recovery import Recovery
from gateway.balancer.servers import ServerTable
from gateway.balancer.shares import Shares
from gateway.bus.contract import Subjects
from gateway.bus.events import EventPublisher
from gateway.bus.retry import through_election
from gateway.lifecycle import stop_tasks, wait_event

CONSUMER: Final = "balancer"


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
        records_retention_s: float = 0.0,
        shares: Shares | None = None,
    ) -> None:
        self._nc = nc
        self._js = js
        self._subjects = subjects
        self._servers = servers
        self._tick = tick
        self._wake = asyncio.Event()
        ended = (
            EndedRecords(js, subjects.jobs_bucket, records_retention_s)
            if records_retention_s > 0
            else None
        )
        self._book = JobBook(jobs_kv, publisher, ended=ended, shares=shares)
        lead = Lead(
            nc=nc,
            js=js,
            jobs_kv=jobs_kv,
            subjects=subjects,
            book=self._book,
            servers=servers,
            publisher=publisher,
            joblog=JobLog(js, subjects, publisher),
        )
        self._binder = Binder(lead)
        self._recorder = Recorder(lead, on_applied=self._wake.set, tick=tick)
        self._recovery = Recovery(lead, self._binder, self._recorder, stale_grace=stale_grace)
        self._backlog = BacklogWriter(lead, CONSUMER)

    def wake(self) -> None:
        """Ask for a dispatch round soon (a server reported room, say)."""
        self._wake.set()

    def open_statuses(self) -> list[str]:
        """The status of every job not yet finished."""
        return self._book.open_statuses()

    def bound_counts(self) -> dict[str, int]:
        """How many jobs are bound to each server that holds any (its slots in use)."""
        return dict(Counter(server_id for server_id, _ in self._book.bound.pairs()))

    async def run(self) -> None:
        """Lead until cancelled."""
        self._recorder.forget_held()
        # Before the first round: a new leader places jobs by what the fleet ran already.
        history = HistoryLesson(self._nc, self._subjects, self._servers)
        await asyncio.gather(self._recovery.load_records(), history.first())
        self._recorder.replayed_upto = await self._replay_horizon()
        sub = await through_election(
            lambda: self._js.pull_subscribe(
                self._subjects.all_events,
                durable=CONSUMER,
                stream=self._subjects.events_stream,
                config=api.ConsumerConfig(
                    ack_policy=api.AckPolicy.EXPLICIT,
                    deliver_policy=api.DeliverPolicy.ALL,
                    max_ack_pending=20_000,
                    # What a stopped leader had fetched but not applied reaches the next one
                    # after this long: a job that ended just then shows its end no later.
                    ack_wait=5,
                ),
            ),
            "subscribing to the events",
        )
        loops = {
            asyncio.create_task(self._recorder.consume(sub), name="dispatcher-events"),
            asyncio.create_task(self._dispatch_loop(), name="dispatcher-binding"),
            asyncio.create_task(self._backlog.run(), name="dispatcher-backlog"),
        }
        try:
            history.keep_asking()
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a loop only ends by failing: raise what it raised
        finally:
            # Not a TaskGroup: its single cancellation of each child can be lost inside nats-py,
            # and then leadership could never be given up.
            try:
                await stop_tasks(*loops, *history.tasks)
            finally:
                await sub.unsubscribe()

    async def _replay_horizon(self) -> int:
        """0 if the durable consumer exists; else the stream's last sequence now.

        A consumer created afresh delivers every stored event again, each for the "first"
        time: up to this sequence, a queued event proves nothing and the record is read.
        """
        stream = self._subjects.events_stream
        try:
            await through_election(
                lambda: self._js.consumer_info(stream, CONSUMER), "reading the consumer"
            )
        except NotFoundError:
            info = await through_election(
                lambda: self._js.stream_info(stream), "reading the events stream"
            )
            return int(info.state.last_seq)
        return 0

    async def _dispatch_loop(self) -> None:
        while True:
            await wait_event(self._wake, self._tick)
            self._wake.clear()
            await self._recovery.fail_unconfirmed()
            await self._recovery.fail_pinned_to_removed()
            await self._recovery.hand_back_from_dead_servers()
            self._book.release_ready()
            await self._binder.round()
