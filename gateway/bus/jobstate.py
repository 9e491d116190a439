"""A job's record and how events move it: every transition of the lifecycle, in one place.

    queued → dispatched(server) → running → succeeded | failed | cancelled
                 ↑___________ retried ___________|

A terminal event is the last word on a job for every writer: `ends_job` says which events are,
and the event publisher (events.py) refuses to append anything after one, so that the log of
a cancelled job can never go on to `running` or `succeeded`.

The record lives in KV `comfy_jobs`. Events arrive at least once and, across writers, may be
applied late; `apply_event` is therefore idempotent (seq already applied: no change) and ignores
the progress of an attempt that has been superseded (its `running`, its hand-back), so a server
thought dead that reports back late cannot undo what happened since. Its end, if the log took
it, is the job's end: the log holds one end, whoever wrote it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final

import msgspec

from gateway.bus.contract import (
    Cancelled,
    Dispatched,
    Event,
    Failed,
    JobRecord,
    JobRequest,
    JobStatus,
    Queued,
    Retried,
    Running,
    Succeeded,
    webhook_of,
)

BOUND: Final = frozenset({JobStatus.DISPATCHED, JobStatus.RUNNING})
_canonical: Final = msgspec.json.Encoder(order="sorted")


def ends_job(event: Event) -> bool:
    """Whether `event` ends the job for good: nothing may follow it in the job's log."""
    return isinstance(event, (Succeeded, Failed, Cancelled))


def request_hash(request: JobRequest) -> str:
    """A digest of what defines the job a request asks for, not of the bytes it came in.

    Fields are taken after the gateway filled its defaults (an omitted `max_attempts` and the
    default written out are the same request), with sorted keys. Who sent it and under which
    idempotency key are left out: those choose the scope, not the job.
    """
    defining = msgspec.structs.replace(request, v=0, caller=None, idempotency_key=None)
    return hashlib.sha256(_canonical.encode(defining)).hexdigest()


def record_from_queued(event: Queued) -> JobRecord:
    """The first record of a job, from its `queued` event."""
    request = event.data.request
    return JobRecord(
        job_id=event.job_id,
        status=JobStatus.QUEUED,
        submitted_at=event.ts,
        updated_at=event.ts,
        log_file_path=event.data.log_file_path,
        priority=request.priority,
        max_attempts=request.max_attempts,
        last_seq=event.seq,
        caller=request.caller,
        webhook=webhook_of(request),
        request_hash=request_hash(request),
        batch_id=request.batch_id,
    )


def _ended_by(record: JobRecord, event: Event, attempt: int) -> dict[str, object]:
    """The attempt (and its server) that ended the job, where the record names another."""
    # Attempt 0 means "not tied to an attempt" (a failure before dispatch, say).
    if not attempt or (attempt == record.attempt and record.status in BOUND):
        return {}
    # An attempt handed back ended it, reporting from its server (which was only silent): the
    # record names that run, not the one bound since (or none, if it was waiting).
    ended: dict[str, object] = {"attempt": attempt}
    if event.server_id is not None:
        ended["server_id"] = event.server_id
    return ended


def apply_event(record: JobRecord | None, event: Event) -> JobRecord | None:
    """The record after `event`, or None when the event changes nothing worth storing.

    Node-level events (progress, outputs, history) never change the record: they are the log's
    business, and writing the record for each would cost a KV write per progress step.
    """
    if record is None:
        return record_from_queued(event) if isinstance(event, Queued) else None
    if event.seq <= record.last_seq or record.status.terminal:
        return None
    update = _transition(record, event)
    if update is None:
        return None
    return msgspec.structs.replace(record, last_seq=event.seq, updated_at=event.ts, **update)


def _transition(record: JobRecord, event: Event) -> dict[str, object] | None:
    match event:
        case Dispatched(data=data) if data.attempt >= record.attempt:
            if data.attempt == record.attempt and record.status in BOUND:
                # The dispatcher wrote this already, before publishing the job; and the
                # adapter's `running` can land first (both race to the job's subject), which
                # this event must not undo.
                return None
            return {
                "status": JobStatus.DISPATCHED,
                "server_id": data.server_id,
                "attempt": data.attempt,
            }
        case Running(data=data) if data.attempt == record.attempt and record.status in BOUND:
            if record.status is JobStatus.RUNNING:
                return None
            return {"status": JobStatus.RUNNING, "runs": record.runs + 1, "started_at": event.ts}
        # An end is the job's end whichever attempt wrote it: the log takes one end and nothing
        # after it (events.py), so a late success of an attempt handed back is the result, and
        # the attempt bound since is abandoned by its adapter. The record names the attempt.
        case Succeeded(data=data):
            ended: dict[str, object] = {"status": JobStatus.SUCCEEDED, "outputs": data.outputs}
            return {**ended, "finished_at": event.ts, **_ended_by(record, event, data.attempt)}
        case Failed(data=data):
            ended = {"status": JobStatus.FAILED, "error": data}
            return {**ended, "finished_at": event.ts, **_ended_by(record, event, data.attempt)}
        case Cancelled(data=data):
            return {"status": JobStatus.CANCELLED, "finished_at": event.ts}
        case Retried(data=data) if data.attempt == record.attempt and record.status in BOUND:
            # A started try was counted at `running`; one that failed before starting
            # counts now, so that a server refusing every prompt cannot loop a job forever.
            counted = 1 if data.counts and not data.started else 0
            return {"status": JobStatus.QUEUED, "server_id": None, "runs": record.runs + counted}
        case _:
            return None


def attempts_left(record: JobRecord) -> bool:
    """Whether a job handed back to the queue may be tried again."""
    return record.runs < record.max_attempts


def ends_attempt(event: Event, attempt: int) -> bool:
    """Whether `event` ends that attempt: its terminal event, or its hand-back."""
    return isinstance(event, (Succeeded, Failed, Cancelled, Retried)) and (
        event.data.attempt == attempt
    )


def record_from_log(events: Iterable[Event]) -> JobRecord | None:
    """The record a job's whole log leads to (its events in any order); None without `queued`.

    What the record in KV was, for a job whose record has expired (it ended long ago).
    """
    record: JobRecord | None = None
    for event in sorted(events, key=lambda item: item.seq):
        record = apply_event(record, event) or record
    return record
