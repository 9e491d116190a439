"""Counting the system's jobs from the EVENTS stream, for a gateway's /metrics.

Jobs are submitted on any gateway or straight on the bus, and end in adapters and balancers:
their outcomes meet only in the EVENTS stream. Each gateway follows it (an ordered consumer,
from the stream's end when the gateway starts) and counts every job of the system; so every
gateway shows the same counts of what happened since it started. Times are the events' `ts`,
stamped by the process that wrote each (the adapter's clock for `running`, the submitting
process's for `queued`): across machines they are as good as the clocks agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Final

from nats.errors import Error as NatsError
from nats.js import JetStreamContext, api

from gateway.api.jobtrail import WORK_EVENTS, Trails
from gateway.api.metrics.instruments import Metrics
from gateway.bus.contract import (
    TERMINAL_EVENTS,
    ContractError,
    Event,
    Failed,
    Queued,
    Retried,
    Running,
    Subjects,
    decode_event,
    event_type,
)

log = logging.getLogger(__name__)

# Error codes are ours (`timeout`, `execution_error`, ...); anything else is one label value,
# so a stray writer cannot grow the label set.
_CODE: Final = re.compile(r"[a-z][a-z0-9_]{0,39}")
# How long a scrape waits for the counts to reach the events stored before it began.
CATCH_UP_S: Final = 1.0


def failure_reason(code: str) -> str:
    """A failure's code as a label value: the code, or `other` for one no writer of ours uses."""
    return code if _CODE.fullmatch(code) else "other"


def retry_reason(event: Retried) -> str:
    """Why a try came back, as a label value of a few kinds (its message names servers)."""
    if not event.data.counts:
        return "stopping"
    return "after_start" if event.data.started else "before_start"


class JobCounter:
    """Follows every event of the system and keeps `metrics`' job counters and histograms."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, metrics: Metrics) -> None:
        self._js = js
        self._subjects = subjects
        self._metrics = metrics
        self._trails = Trails()
        self._position = 0  # the stream sequence of the last event counted
        self._moved = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Count every event stored from now on (those before are not this gateway's)."""
        info = await self._js.stream_info(self._subjects.events_stream)
        self._position = info.state.last_seq
        sub = await self._js.subscribe(
            self._subjects.all_events,
            stream=self._subjects.events_stream,
            ordered_consumer=True,
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self._position + 1,
            ),
        )
        self._task = asyncio.create_task(self._follow(sub), name="job-counter")
        self._task.add_done_callback(_report_end)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def caught_up(self, within: float = CATCH_UP_S) -> bool:
        """Wait until every event stored before this call is counted; whether it was in time.

        So a scrape right after a job's end counts it. A counter far behind (a burst of
        events) gives up after `within` seconds: the scrape then shows it a little behind.
        """
        try:
            info = await self._js.stream_info(self._subjects.events_stream)
        except (NatsError, TimeoutError) as exc:
            log.warning("metrics: the counts are shown as they stand (no stream info: %s)", exc)
            return False
        target = info.state.last_seq
        try:
            async with asyncio.timeout(within), self._moved:
                await self._moved.wait_for(lambda: self._position >= target)
        except TimeoutError:
            log.info("metrics: counts at event %d of %d after %s s", self._position, target, within)
            return False
        return True

    async def _follow(self, sub: JetStreamContext.PushSubscription) -> None:
        try:
            async for msg in sub.messages:
                try:
                    self.count(decode_event(msg.data))
                except ContractError as exc:
                    log.warning("metrics: an event that is not one, not counted: %s", exc)
                async with self._moved:
                    self._position = msg.metadata.sequence.stream
                    self._moved.notify_all()
        finally:
            await sub.unsubscribe()

    def count(self, event: Event) -> None:
        """Count one event of the stream."""
        m = self._metrics
        step = self._trails.step(event)
        if step.stale:
            return
        server = step.server_id or ""
        before = step.before
        if isinstance(event, Queued):
            m.submitted.inc()
        elif isinstance(event, Running):
            if before.waiting_since is not None:
                m.queue_wait.labels(server=server).observe(_since(before.waiting_since, event))
        elif isinstance(event, WORK_EVENTS):
            if not before.worked and before.submitted_at is not None:
                m.first_event.labels(server=server).observe(_since(before.submitted_at, event))
        elif isinstance(event, Retried):
            m.retried.labels(server=server, reason=retry_reason(event)).inc()
        elif isinstance(event, TERMINAL_EVENTS):
            outcome = event_type(event)
            reason = failure_reason(event.data.code) if isinstance(event, Failed) else ""
            m.finished.labels(outcome=outcome, server=server, reason=reason).inc()
            if before.running_since is not None:
                m.run_time.labels(server=server, outcome=outcome).observe(
                    _since(before.running_since, event)
                )


def _since(start: float, event: Event) -> float:
    # Two machines' clocks can put an event a little before the one that led to it.
    return max(0.0, event.ts - start)


def _report_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("counting jobs for /metrics stopped", exc_info=task.exception())
