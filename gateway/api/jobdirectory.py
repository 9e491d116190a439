"""Who submitted each job and which labels it asked for: what fleet-wide event streams filter on.

Only a job's `queued` event holds its request; every other event names just the job. The
directory learns a job from its `queued` event as a stream passes it, and otherwise reads that
event back from the EVENTS stream once (the first message on the job's subject). Both never
change, so one directory serves every stream of the gateway, whatever point each is at; it keeps
the most recent jobs only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Final

import msgspec
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from gateway.bus.contract import (
    ContractError,
    JobRecord,
    Queued,
    Subjects,
    decode,
    decode_event,
)

log = logging.getLogger(__name__)

DEFAULT_LIMIT: Final = 10_000


class JobFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What a job was submitted with that never changes."""

    caller: str | None = None  # None: published on the bus directly, or not known
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    pinned: str | None = None  # the server the job asked for, if any


UNKNOWN: Final = JobFacts()


class JobDirectory:
    """The facts of the jobs a gateway's streams meet, at most `limit` of them."""

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        jobs_kv: KeyValue,
        limit: int = DEFAULT_LIMIT,
    ) -> None:
        self._js = js
        self._subjects = subjects
        self._jobs_kv = jobs_kv
        self._limit = limit
        self._facts: OrderedDict[str, JobFacts] = OrderedDict()

    def learn(self, event: Queued) -> JobFacts:
        """The facts a `queued` event holds, kept for the job's later events."""
        request = event.data.request
        facts = JobFacts(caller=request.caller, labels=dict(request.labels), pinned=request.server)
        self._keep(event.job_id, facts)
        return facts

    async def facts(self, job_id: str) -> JobFacts:
        """The job's facts: known already, or read from its `queued` event (else its record).

        A job whose facts cannot be read now has none (no caller: a user key does not see
        it), and is asked about again next time.
        """
        known = self._facts.get(job_id)
        if known is not None:
            self._facts.move_to_end(job_id)
            return known
        try:
            facts = await self._read(job_id)
        except (NatsError, TimeoutError) as exc:
            log.warning("job %s: cannot read who submitted it now: %s", job_id, exc)
            return UNKNOWN
        self._keep(job_id, facts)
        return facts

    async def _read(self, job_id: str) -> JobFacts:
        try:
            raw = await self._js.get_msg(
                self._subjects.events_stream,
                seq=1,
                subject=self._subjects.events(job_id),
                next=True,
            )
        except NotFoundError:
            raw = None
        if raw is not None and raw.data is not None:
            try:
                event = decode_event(raw.data)
            except ContractError as exc:
                log.warning("job %s: its first event is not one: %s", job_id, exc)
            else:
                if isinstance(event, Queued):
                    return self.learn(event)
        # Its `queued` is past the stream's retention: the record still names the caller.
        try:
            entry = await self._jobs_kv.get(job_id)
        except KeyNotFoundError:
            return UNKNOWN
        if entry.value is None:
            return UNKNOWN
        try:
            return JobFacts(caller=decode(entry.value, JobRecord).caller)
        except ContractError as exc:
            log.warning("job %s: its record is not one: %s", job_id, exc)
            return UNKNOWN

    def _keep(self, job_id: str, facts: JobFacts) -> None:
        self._facts[job_id] = facts
        self._facts.move_to_end(job_id)
        while len(self._facts) > self._limit:
            self._facts.popitem(last=False)
