"""The fleet's job state changes, read from the EVENTS stream for one client, filtered and told
whole: each event names its job, status, server, attempt, caller and labels, and an end its
error or outputs, so a dashboard needs nothing else to show it.

Each event's `id` is its sequence in the stream: a client that resumes after an id gets the
events after it, each once. Events the stream no longer keeps (its retention) are not skipped
silently: a `missed` notice says which ids are gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Final

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from gateway.api.jobdirectory import JobDirectory, JobFacts
from gateway.api.jobtrail import Step, Trails
from gateway.bus.contract import (
    STATUS_AFTER,
    Cancelled,
    ContractError,
    Event,
    Failed,
    JobStatus,
    NodeCached,
    NodeProgress,
    NodeStarted,
    Queued,
    Retried,
    Subjects,
    Succeeded,
    decode_event,
    event_type,
)

log = logging.getLogger(__name__)

# The state changes a fleet stream tells (its `status` filter picks among them).
STATE_CHANGES: Final = frozenset(
    {"queued", "dispatched", "running", "retried", "succeeded", "failed", "cancelled"}
)
# Node events, told only to a stream that asks for progress: which node runs, how far it is,
# which were served from ComfyUI's cache.
PROGRESS: Final = frozenset({"node_started", "node_progress", "node_cached"})
# Jobs a stream remembers the server and attempt of; one forgotten is told by its next event.
TRAILS_PER_STREAM: Final = 1_000


class FleetError(msgspec.Struct, kw_only=True):
    code: str
    message: str
    node_id: str | None = None
    node_type: str | None = None
    exception_type: str | None = None


class FleetOutput(msgspec.Struct, kw_only=True):
    node_id: str
    filename: str
    key: str
    url: str
    content_type: str
    size: int


class FleetProgress(msgspec.Struct, kw_only=True):
    node_id: str
    value: int = 0
    max: int = 0
    class_type: str | None = None  # on node_started


class FleetEvent(msgspec.Struct, kw_only=True):
    """One state change (or, when asked for, progress) of one job, whole."""

    id: int  # the event's sequence in the EVENTS stream: the SSE id, where a resume starts
    type: str  # a state change, or (when asked for) node_started, node_progress, node_cached
    job_id: str
    seq: int  # the job's own event number
    status: JobStatus  # the job's status after the event
    ts: float
    server_id: str | None
    attempt: int | None
    caller: str | None
    labels: dict[str, str]
    pinned: str | None = None  # the server the job asked for, if it named one
    reason: str | None = None  # why it was retried or cancelled
    error: FleetError | None = None
    outputs: list[FleetOutput] | None = None
    progress: FleetProgress | None = None
    cached: list[str] | None = None  # on node_cached: the nodes ComfyUI served from its cache


class Missed(msgspec.Struct, kw_only=True):
    """Events the stream no longer keeps, between the client's place and what follows."""

    id: int  # the last id missed: resuming after it goes on with what follows
    from_id: int
    to_id: int
    message: str
    type: str = "missed"


class FleetFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Which events a client sees. Empty sets let everything through; `caller` set: only that
    caller's jobs (for a user key, always its own)."""

    types: frozenset[str] = frozenset()
    servers: frozenset[str] = frozenset()
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    caller: str | None = None
    progress: bool = False

    def wants_kind(self, event: Event) -> bool:
        kind = event_type(event)
        if kind in PROGRESS:
            return self.progress
        return kind in STATE_CHANGES and (not self.types or kind in self.types)

    def wants_server(self, server_id: str | None) -> bool:
        return not self.servers or server_id in self.servers

    def wants_job(self, facts: JobFacts) -> bool:
        if self.caller is not None and facts.caller != self.caller:
            return False
        return all(facts.labels.get(k) == v for k, v in self.labels.items())


class Start(msgspec.Struct, frozen=True, kw_only=True):
    """Where a stream starts: at a stream sequence, or at the first event at or after a time."""

    seq: int | None = None
    time: datetime | None = None


OutputUrl = Callable[[str], str]
# Called once per event: what signs that event's output URLs (one expiry for all of them).
OutputUrls = Callable[[], OutputUrl]


async def fleet_events(
    js: JetStreamContext,
    subjects: Subjects,
    directory: JobDirectory,
    start: Start,
    wanted: FleetFilter,
    *,
    keepalive_s: float,
    output_urls: OutputUrls,
) -> AsyncIterator[FleetEvent | Missed | None]:
    """The events `wanted` lets through from `start` on, live, never ending by itself.

    None stands for `keepalive_s` without an event given, so a stream can send a keep-alive.
    """
    expected = start.seq
    if expected is not None:
        info = await js.stream_info(subjects.events_stream)
        first = info.state.first_seq
        if expected < first:
            yield _missed(expected, first - 1)
            expected = first
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=expected
        )
    else:
        assert start.time is not None
        lost = await _lost_before(js, subjects, start.time)
        if lost is not None:
            yield lost
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=start.time
        )
    sub = await js.subscribe(
        subjects.all_events, stream=subjects.events_stream, ordered_consumer=True, config=config
    )
    trails = Trails(TRAILS_PER_STREAM)
    loop = asyncio.get_running_loop()
    quiet_until = loop.time() + keepalive_s
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=max(0.001, quiet_until - loop.time()))
            except NatsTimeoutError:
                yield None
                quiet_until = loop.time() + keepalive_s
                continue
            seq = msg.metadata.sequence.stream
            if expected is not None and seq > expected:
                gone = await _dropped(js, subjects, expected, seq)
                if gone is not None:
                    yield gone
                    quiet_until = loop.time() + keepalive_s
            expected = seq + 1
            try:
                event = decode_event(msg.data)
            except ContractError as exc:
                log.warning("fleet events: stream message %d is not an event: %s", seq, exc)
                continue
            told = await _tell(seq, event, trails, directory, wanted, output_urls)
            if told is not None:
                yield told
                quiet_until = loop.time() + keepalive_s
    finally:
        await sub.unsubscribe()


async def _tell(
    seq: int,
    event: Event,
    trails: Trails,
    directory: JobDirectory,
    wanted: FleetFilter,
    output_urls: OutputUrls,
) -> FleetEvent | None:
    """The event as the client sees it, or None when it is not for this client."""
    step = trails.step(event)  # every event, so the jobs' servers and attempts are known
    facts = directory.learn(event) if isinstance(event, Queued) else None
    if step.stale or not wanted.wants_kind(event) or not wanted.wants_server(step.server_id):
        return None
    if facts is None:
        facts = await directory.facts(event.job_id)
    if not wanted.wants_job(facts):
        return None
    return whole(seq, event, step, facts, output_urls)


def whole(
    seq: int, event: Event, step: Step, facts: JobFacts, output_urls: OutputUrls
) -> FleetEvent:
    """A fleet event from a stream event and what is known of its job."""
    told = FleetEvent(
        id=seq,
        type=event_type(event),
        job_id=event.job_id,
        seq=event.seq,
        status=STATUS_AFTER.get(type(event), JobStatus.RUNNING),
        ts=event.ts,
        server_id=step.server_id,
        attempt=step.attempt,
        caller=facts.caller,
        labels=facts.labels,
        pinned=facts.pinned,
    )
    match event:
        case Retried(data=data):
            told.reason = data.reason
        case Cancelled(data=data):
            told.reason = data.reason
            told.outputs = []  # a cancelled job keeps nothing
        case Failed(data=data):
            told.outputs = []  # nor does a failed one
            told.error = FleetError(
                code=data.code,
                message=data.message,
                node_id=data.node_id,
                node_type=data.node_type,
                exception_type=data.exception_type,
            )
        case Succeeded(data=data):
            output_url = output_urls()
            told.outputs = [
                FleetOutput(
                    node_id=o.node_id,
                    filename=o.filename,
                    key=o.key,
                    url=output_url(o.key),
                    content_type=o.content_type,
                    size=o.size,
                )
                for o in data.outputs
            ]
        case NodeProgress(data=data):
            told.progress = FleetProgress(node_id=data.node_id, value=data.value, max=data.max)
        case NodeStarted(data=data):
            told.progress = FleetProgress(node_id=data.node_id, class_type=data.class_type)
        case NodeCached(data=data):
            told.cached = list(data.node_ids)
    return told


async def _dropped(
    js: JetStreamContext, subjects: Subjects, expected: int, seq: int
) -> Missed | None:
    """What a jump from `expected` to `seq` lost: the events retention dropped while we read
    (said, not skipped); None when the stream still begins before them (they were messages
    of no event subject)."""
    first = (await js.stream_info(subjects.events_stream)).state.first_seq
    return _missed(expected, min(seq, first) - 1) if first > expected else None


async def _lost_before(js: JetStreamContext, subjects: Subjects, since: datetime) -> Missed | None:
    """What a start at `since` cannot tell: when the stream's oldest kept event is later than
    `since` and retention dropped events before it, those between `since` and it are gone (which
    of the dropped ones were that late is not known any more, so all are named)."""
    first = (await js.stream_info(subjects.events_stream)).state.first_seq
    if first <= 1:
        return None  # nothing dropped yet
    try:
        oldest = await js.get_msg(
            subjects.events_stream, seq=first, subject=subjects.all_events, next=True
        )
    except NotFoundError:
        oldest = None  # every event is gone: none kept is later than `since`
    kept_from = oldest.time if oldest is not None else None
    if kept_from is not None and since >= kept_from:
        return None
    last = (oldest.seq or first) - 1 if oldest is not None else first - 1
    when = kept_from.isoformat() if kept_from is not None else "now"
    return _missed(
        1,
        last,
        f"events before {when} are no longer kept (the EVENTS stream's retention): any "
        "between `since` and then are gone; the stream goes on after them",
    )


def _missed(first: int, last: int, message: str | None = None) -> Missed:
    return Missed(
        id=last,
        from_id=first,
        to_id=last,
        message=message
        or f"events {first} to {last} are no longer kept (the EVENTS stream's retention); "
        "the stream goes on after them",
    )
