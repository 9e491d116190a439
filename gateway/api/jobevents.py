"""One job's events, for its live streams (`/workflow/events/{job_id}`, SSE and websocket).

They come from the EVENTS stream while it keeps them. A job that ended longer ago than the
stream's retention has none left there, and a stream that waited for them would send
keep-alives for ever: its events are read from its log instead, and when the log has them no
more (its own retention, or no log sink answering), one `expired` message says how the job
ended, from its record, and the stream ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api

from gateway.api.services import Services
from gateway.bus.contract import (
    TERMINAL_EVENTS,
    Event,
    FailedData,
    JobRecord,
    JobStatus,
    decode_event,
)
from gateway.logsink.client import LogQueryError

log = logging.getLogger(__name__)


class EventsGone(msgspec.Struct, kw_only=True):
    """Told instead of a job's events once neither the EVENTS stream nor the job's log keeps
    them: how the job ended, as its record says."""

    job_id: str
    seq: int  # the job's last event: a client that resumes after it has seen everything
    status: JobStatus
    finished_at: float | None
    error: FailedData | None
    message: str
    type: str = "expired"


async def job_events(
    services: Services, record: JobRecord, after: int = 0
) -> AsyncIterator[Event | EventsGone | None]:
    """The events of `record`'s job with a `seq` over `after`, live, ending with its end.

    None stands for `event_keepalive_s` (15 s) without an event, so a stream can send a
    keep-alive. A client that saw the end already gets nothing more: the stream ends at once.
    `record` is the job's record when the client asked: an ended job whose events the stream
    no longer holds is told from its log (see the module's docstring).
    """
    job_id = record.job_id
    ended = record.status.terminal
    if ended and after >= record.last_seq:
        return
    if ended and not await services.publisher.has_events(job_id):
        async for told in _from_log(services, record, after):
            yield told
        return
    sub = await services.js.subscribe(
        services.subjects.events(job_id),
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.ALL,
    )
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=services.settings.event_keepalive_s)
            except NatsTimeoutError:
                # An ended job's events all come at once; none in a while means the
                # retention took them meanwhile.
                if ended and not await services.publisher.has_events(job_id):
                    async for told in _from_log(services, record, after):
                        yield told
                    return
                yield None
                continue
            event = decode_event(msg.data)
            if isinstance(event, TERMINAL_EVENTS):
                # The job's record follows its events by a moment; end the stream only once the
                # record agrees, so a client reading the result next sees the end too.
                await services.wait_for_end(job_id, 10.0)
                if event.seq > after:
                    yield event
                return
            if event.seq > after:
                after = event.seq
                yield event
    finally:
        await sub.unsubscribe()


async def _from_log(
    services: Services, record: JobRecord, after: int
) -> AsyncIterator[Event | EventsGone]:
    """The ended job's events over `after` from its log; its end from the record when the
    log does not hold it."""
    job_id = record.job_id
    try:
        events = await services.logged_events(job_id)
        why = "its log does not hold its end"
    except LogQueryError as exc:
        events = []
        if exc.code == "not_found":
            why = "nor does its log (the log's retention)"
        else:
            log.warning("job %s: its events are gone and its log cannot be read: %s", job_id, exc)
            why = "and its log cannot be read now"
    for event in sorted(events, key=lambda item: item.seq):
        if event.seq > after:
            after = event.seq
            yield event
        if isinstance(event, TERMINAL_EVENTS):
            return
    yield EventsGone(
        job_id=job_id,
        seq=record.last_seq,
        status=record.status,
        finished_at=record.finished_at,
        error=record.error,
        message=f"the EVENTS stream no longer keeps the events of job {job_id} (its "
        f"retention), {why}; the job ended {record.status.value}",
    )
