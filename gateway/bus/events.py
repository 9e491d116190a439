"""Publishing a job's events on `comfy.events.<job_id>` with gap-free sequence numbers.

Several processes write to one job's subject over its life (the balancer, then an adapter, then
perhaps another adapter), so the next `seq` cannot be a local counter alone. Each publish states
the stream sequence it expects to be the subject's last (`Nats-Expected-Last-Subject-Sequence`);
if another writer got there first, the publisher reads the subject's last event and tries again.
The same check makes a retried publish safe: if the first try was stored after all, the last
event is our own and nothing is written twice.

It also makes a job's end final for every writer: an append is refused with `JobEnded` once the
subject's last event ends the job (`jobstate.ends_job`), whoever wrote it. A writer that raced
the end learns of it from the failed sequence check, reads the end, and gets the refusal.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import OrderedDict

from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import BadRequestError, NotFoundError

from gateway.bus.contract import (
    Event,
    EventData,
    Subjects,
    decode_event,
    encode,
    event_type,
    make_event,
    new_id,
)
from gateway.bus.jobstate import ends_job
from gateway.bus.retry import ELECTION_S, TRANSIENT, pauses, through_election

log = logging.getLogger(__name__)

_WRONG_LAST_SEQUENCE = 10071
_MAX_TRIES = 200
_ID_MASK = 2**64 - 1


class EventPublishError(RuntimeError):
    """An event could not be stored in the EVENTS stream."""


class JobEnded(EventPublishError):
    """The job's log already ends with a terminal event: nothing more is appended to it."""

    def __init__(self, job_id: str, end: Event) -> None:
        super().__init__(f"job {job_id} already ended ({event_type(end)})")
        self.job_id = job_id
        self.end = end


class _JobLog:
    """What this process knows of one job's subject: its last event, and a lock for order."""

    __slots__ = ("end", "event_id", "lock", "seq", "stream_seq")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.seq = -1  # unknown until read from the stream or written by us
        self.stream_seq = 0
        self.event_id: str | None = None
        self.end: Event | None = None  # the last event, when it ends the job

    def stored(self, event: Event, stream_seq: int) -> None:
        """`event` is the subject's last, at `stream_seq`."""
        self.seq, self.stream_seq, self.event_id = event.seq, stream_seq, event.event_id
        self.end = event if ends_job(event) else None


class EventPublisher:
    """Appends events to jobs' subjects. One per process; safe to use from many tasks.

    Correctness rests on the server's sequence check alone; the per-job lock and the memory of
    recent jobs only save round trips, so forgetting a job early costs one read, never an error.
    """

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        *,
        server_id: str | None = None,
        publish_timeout: float = 5.0,
        remember: int = 10_000,
    ) -> None:
        self._js = js
        self._subjects = subjects
        self._server_id = server_id
        self._timeout = publish_timeout
        self._remember = remember
        self._jobs: OrderedDict[str, _JobLog] = OrderedDict()
        # Event ids: a random half per publisher and a counter, 32 hex characters like
        # new_id() but without a system call for randomness per event.
        self._id_prefix = new_id()[:16]
        self._id_counter = itertools.count(random.getrandbits(32))

    def _new_event_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter) & _ID_MASK:016x}"

    def _job(self, job_id: str) -> _JobLog:
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _JobLog()
            while len(self._jobs) > self._remember:
                self._jobs.popitem(last=False)
        else:
            self._jobs.move_to_end(job_id)
        return job

    def forget(self, job_id: str) -> None:
        """Drop what is known of a job this process will not write to again (its end is out).

        Memory, not correctness: a later emit for it reads the subject's end first. A job
        with an emit under way is kept, so that emits waiting behind it keep their order.
        """
        job = self._jobs.get(job_id)
        if job is not None and not job.lock.locked():
            del self._jobs[job_id]

    async def prime(self, job_id: str) -> None:
        """Read where a job's subject ends now, if not known, so the next emit need not.

        For a writer that will emit soon and has a moment to spare now (an adapter while
        ComfyUI takes the prompt): the read leaves the path of the event. Harmless if the
        subject moves on meanwhile: the emit finds out and reads again.
        """
        job = self._job(job_id)
        async with job.lock:
            if job.seq < 0:
                await self._read_last(job_id, job)

    def expect_new(self, job_id: str) -> None:
        """Take the job's subject to be empty, if nothing is known of it, without reading it.

        For the writer of a job that was just created under an unused id (the submit path):
        its first emit then takes one round trip instead of two. A wrong guess costs only a
        read, since the broker checks the expected sequence anyway.
        """
        job = self._job(job_id)
        if job.seq < 0 and not job.lock.locked():
            job.seq, job.stream_seq, job.event_id, job.end = 0, 0, None, None

    def stream_seq(self, job_id: str) -> int:
        """The EVENTS sequence of the job's last event as this process knows it (0: unknown)."""
        job = self._jobs.get(job_id)
        return 0 if job is None else job.stream_seq

    def ended(self, job_id: str) -> Event | None:
        """The job's terminal event if this process knows of one (from memory, no read)."""
        job = self._jobs.get(job_id)
        return None if job is None else job.end

    async def emit(
        self,
        job_id: str,
        data: EventData,
        *,
        server_id: str | None = None,
        ts: float | None = None,
    ) -> Event:
        """Append the event that `data` belongs to; return it as stored.

        `ts` defaults to now; the submit path passes the submission time so that the `queued`
        event and the job's record agree to the microsecond. Concurrent emits for one job are
        stored in the order they were called (the job's lock is first come, first served).
        """
        job = self._job(job_id)
        async with job.lock:
            return await self._append(job_id, job, data, server_id or self._server_id, ts)

    async def _append(
        self,
        job_id: str,
        job: _JobLog,
        data: EventData,
        server_id: str | None,
        ts: float | None,
    ) -> Event:
        subject = self._subjects.events(job_id)
        if job.seq < 0:
            await self._read_last(job_id, job)
        event_id = self._new_event_id()
        backoff = pauses()
        unavailable_since: float | None = None
        for attempt in range(_MAX_TRIES):
            if job.end is not None:
                log.info(
                    "job %s ended (%s): %s ignored",
                    job_id,
                    event_type(job.end),
                    type(data).__name__,
                )
                raise JobEnded(job_id, job.end)
            event = make_event(
                data,
                job_id=job_id,
                seq=job.seq + 1,
                server_id=server_id,
                event_id=event_id,
                ts=ts,
            )
            headers = {
                "Nats-Msg-Id": event_id,
                "Nats-Expected-Last-Subject-Sequence": str(job.stream_seq),
            }
            try:
                ack = await self._js.publish(
                    subject, encode(event), timeout=self._timeout, headers=headers
                )
            except BadRequestError as exc:
                if exc.err_code != _WRONG_LAST_SEQUENCE:
                    raise EventPublishError(f"event for job {job_id} refused: {exc}") from exc
            except TRANSIENT as exc:
                # Timed out, or the stream is electing a leader: the event may be stored.
                log.warning("an event of job %s: %s; checking before retrying", job_id, exc)
                unavailable_since = unavailable_since or time.monotonic()
                if time.monotonic() - unavailable_since > ELECTION_S:
                    raise EventPublishError(f"event for job {job_id} not stored: {exc}") from exc
                await asyncio.sleep(backoff.next())
            else:
                job.stored(event, ack.seq)
                return event
            # Another writer appended, or our timed-out try was stored: read the subject's end.
            await self._read_last(job_id, job)
            if job.event_id == event_id:
                return event
            # A short random pause keeps two busy writers from starving each other.
            await asyncio.sleep(random.uniform(0, min(0.05, 0.0005 * 2**attempt)))
        raise EventPublishError(f"could not append an event to job {job_id}: too much contention")

    async def emit_first(self, job_id: str, data: EventData, *, ts: float | None = None) -> bool:
        """Append `data` as the job's very first event; False if the subject holds one already.

        The broker checks that the subject is empty as it stores the event, so this is safe
        where a look first would not be (a stream recovering after a restart can answer "no
        message" for a moment).
        """
        job = self._job(job_id)
        async with job.lock:
            event_id = self._new_event_id()
            event = make_event(
                data, job_id=job_id, seq=1, server_id=self._server_id, event_id=event_id, ts=ts
            )
            headers = {"Nats-Msg-Id": event_id, "Nats-Expected-Last-Subject-Sequence": "0"}
            try:
                ack = await through_election(
                    lambda: self._js.publish(
                        self._subjects.events(job_id),
                        encode(event),
                        timeout=self._timeout,
                        headers=headers,
                    ),
                    f"the first event of job {job_id}",
                )
            except BadRequestError as exc:
                if exc.err_code != _WRONG_LAST_SEQUENCE:
                    raise EventPublishError(f"event for job {job_id} refused: {exc}") from exc
                # Another's event is first; or ours, stored by a try whose answer was lost.
                await self._read_last(job_id, job)
                return job.event_id == event_id
            job.stored(event, ack.seq)
            return True

    async def has_events(self, job_id: str) -> bool:
        """Whether the job's subject holds any event (read from the stream, not remembered)."""
        try:
            await self._last_msg(job_id)
        except NotFoundError:
            return False
        return True

    async def last_event(self, job_id: str) -> Event | None:
        """The job's newest event, read from the stream (a record may lag it); None if none."""
        try:
            raw = await self._last_msg(job_id)
        except NotFoundError:
            return None
        return None if raw.data is None else decode_event(raw.data)

    async def _last_msg(self, job_id: str) -> RawStreamMsg:
        return await through_election(
            lambda: self._js.get_last_msg(
                self._subjects.events_stream, self._subjects.events(job_id)
            ),
            f"reading the last event of job {job_id}",
        )

    async def _read_last(self, job_id: str, job: _JobLog) -> None:
        try:
            raw = await self._last_msg(job_id)
        except NotFoundError:
            job.seq, job.stream_seq, job.event_id, job.end = 0, 0, None, None
            return
        assert raw.data is not None and raw.seq is not None
        job.stored(decode_event(raw.data), raw.seq)
