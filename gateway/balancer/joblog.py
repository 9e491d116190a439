"""Reading a job's events back from the EVENTS stream, for the leader's decisions.

A read that fails (the broker restarting, a time-out) raises `Unreadable`: that is not a
missing event, and must never fail a job.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from gateway.bus.contract import Event, JobRequest, Queued, Subjects, decode_event
from gateway.bus.events import EventPublisher
from gateway.bus.retry import through_election

log = logging.getLogger(__name__)


class Unreadable(Exception):
    """The event log could not be read just now (not: what was looked for is missing)."""


class JobLog:
    """The first and the last event of a job, as the log holds them now."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, publisher: EventPublisher) -> None:
        self._js = js
        self._subjects = subjects
        self._publisher = publisher

    async def last_event(self, job_id: str) -> Event | None:
        """The job's newest event in the log; Unreadable if it cannot be read now."""
        try:
            return await self._publisher.last_event(job_id)
        except Exception as exc:
            log.warning("cannot read the last event of job %s now: %s", job_id, exc)
            raise Unreadable(job_id) from exc

    async def request_of(self, job_id: str) -> JobRequest | None:
        """The job's request from its `queued` event; None if there is none."""
        try:
            raw = await through_election(
                lambda: self._js.get_msg(
                    self._subjects.events_stream,
                    seq=1,
                    subject=self._subjects.events(job_id),
                    next=True,
                ),
                f"reading the queued event of job {job_id}",
            )
        except NotFoundError:
            return None
        except Exception as exc:
            log.warning("cannot read the queued event of job %s now: %s", job_id, exc)
            raise Unreadable(job_id) from exc
        if raw.data is None:
            return None
        event = decode_event(raw.data)
        return event.data.request if isinstance(event, Queued) else None
