"""What the sink reads from an event: its header for the index, and its effect on the job's row.

Events are read leniently on purpose: the sink is the record of what happened, so an event of a
newer schema version, or with a payload this build does not know, is still logged and indexed;
only an event without the header fields (id, job, seq, ts, type) is refused.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Final

import msgspec

from gateway.bus import contract
from gateway.bus.contract import ContractError

log = logging.getLogger(__name__)


class EventHead(msgspec.Struct, kw_only=True):
    event_id: str
    job_id: str
    seq: int
    ts: float
    type: str
    server_id: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"null")


class EventRecord(msgspec.Struct, kw_only=True):
    """One event: its header, and its line for the JSONL file (the wire JSON, one line)."""

    head: EventHead
    line: bytes
    # In a JSONL file being indexed: the byte offset just after this line.
    end_offset: int = 0


_head_decoder: Final = msgspec.json.Decoder(EventHead)
_MAX_BIGINT: Final = 2**63
_MAX_TS: Final = 253_402_300_800.0  # 10000-01-01
_MAX_INT: Final = 2**31 - 1


def parse_event(raw: bytes, end_offset: int = 0) -> EventRecord:
    """Read an event's header; raise ContractError if it is not an event."""
    try:
        head = _head_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise ContractError(f"not an event: {exc}") from exc
    if not head.event_id or not head.job_id:
        raise ContractError("not an event: empty event_id or job_id")
    # Values the index cannot hold would fail every retry of the batch and stall the sink.
    if not 0 <= head.seq < _MAX_BIGINT:
        raise ContractError(f"event seq {head.seq} is out of range")
    if not 0.0 <= head.ts < _MAX_TS:
        raise ContractError(f"event ts {head.ts} is not a time between 1970 and 9999")
    # JSON allows raw newlines only as whitespace between tokens, so spaces keep it identical.
    line = raw.strip()
    if b"\n" in line or b"\r" in line:
        line = line.replace(b"\r", b" ").replace(b"\n", b" ")
    return EventRecord(head=head, line=line, end_offset=end_offset)


# --------------------------------------------------------------------------------------------
# The payload fields the jobs table needs, read without requiring the full contract.


class _Request(msgspec.Struct):
    workflow: dict[str, Any] = msgspec.field(default_factory=dict)
    caller: str | None = None
    batch_id: str | None = None
    server: str | None = None


class _Queued(msgspec.Struct):
    request: _Request | None = None


class _Attempt(msgspec.Struct):
    attempt: int | None = None
    server_id: str | None = None


class _Succeeded(msgspec.Struct):
    attempt: int | None = None
    outputs: list[Any] = msgspec.field(default_factory=list)


class _Failed(msgspec.Struct):
    attempt: int | None = None
    code: str | None = None
    message: str | None = None
    exception_type: str | None = None


_queued: Final = msgspec.json.Decoder(_Queued)
_attempt: Final = msgspec.json.Decoder(_Attempt)
_succeeded: Final = msgspec.json.Decoder(_Succeeded)
_failed: Final = msgspec.json.Decoder(_Failed)
_sorted: Final = msgspec.json.Encoder(order="sorted")

# The status a job is in after an event of this type: the contract's table, by wire tag.
STATUS_AFTER: Final = {
    kind.__struct_config__.tag: status.value for kind, status in contract.STATUS_AFTER.items()
}
TERMINAL: Final = frozenset(status.value for status in contract.TERMINAL_STATUSES)


def workflow_hash(workflow: dict[str, Any]) -> str:
    """sha256 of the workflow with sorted keys: equal workflows hash equal whoever sent them."""
    return hashlib.sha256(_sorted.encode(workflow)).hexdigest()


class JobDelta(msgspec.Struct, kw_only=True):
    """What a batch of new events says about one job; merged into `jobs` by the index.

    Times are epoch seconds. Merging is order-independent where it matters (status follows the
    highest seq, started_at is the earliest, finished_at the latest), so a redelivery or a
    rebuild in another order gives the same row.
    """

    job_id: str
    log_file_path: str
    log_bytes: int = 0
    status: str | None = None
    status_seq: int = 0
    server_id: str | None = None
    attempts: int = 0
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error_type: str | None = None
    error_message: str | None = None
    workflow_hash: str | None = None
    node_count: int | None = None
    output_count: int | None = None
    event_count: int = 0
    last_seq: int = 0
    last_event_at: float | None = None
    caller: str | None = None
    batch_id: str | None = None
    pinned_server: str | None = None

    def fold(self, head: EventHead) -> None:
        """Take one new event into account."""
        self.event_count += 1
        self.last_seq = max(self.last_seq, head.seq)
        self.last_event_at = (
            head.ts if self.last_event_at is None else max(self.last_event_at, head.ts)
        )
        status = STATUS_AFTER.get(head.type)
        if status is not None and head.seq > self.status_seq:
            self.status, self.status_seq = status, head.seq
        try:
            self._fold_data(head)
        except msgspec.DecodeError as exc:
            # The event stays in the log and the index; only the summary misses its details.
            log.warning(
                "event %s (%s) of job %s has a payload the jobs table cannot read: %s",
                head.event_id,
                head.type,
                head.job_id,
                exc,
            )

    def _see_attempt(self, attempt: int | None) -> None:
        if attempt is not None:
            self.attempts = max(self.attempts, min(attempt, _MAX_INT))

    def _fold_data(self, head: EventHead) -> None:
        kind = head.type
        if kind == "queued":
            self.submitted_at = head.ts
            queued = _queued.decode(head.data)
            if queued.request is not None:
                self.workflow_hash = workflow_hash(queued.request.workflow)
                self.node_count = len(queued.request.workflow)
                self.caller = queued.request.caller
                self.batch_id = queued.request.batch_id
                self.pinned_server = queued.request.server
        elif kind in ("dispatched", "running", "retried"):
            data = _attempt.decode(head.data)
            self._see_attempt(data.attempt)
            if kind == "dispatched" and data.server_id is not None:
                self.server_id = data.server_id
            if kind == "running":
                self.started_at = (
                    head.ts if self.started_at is None else min(self.started_at, head.ts)
                )
        elif kind == "succeeded":
            done = _succeeded.decode(head.data)
            self._see_attempt(done.attempt)
            self.output_count = len(done.outputs)
            self._finish(head.ts)
        elif kind == "failed":
            failed = _failed.decode(head.data)
            self._see_attempt(failed.attempt)
            self.error_type = failed.exception_type or failed.code or "error"
            self.error_message = failed.message
            self._finish(head.ts)
        elif kind == "cancelled":
            self._see_attempt(_attempt.decode(head.data).attempt)
            self._finish(head.ts)

    def _finish(self, ts: float) -> None:
        self.finished_at = ts if self.finished_at is None else max(self.finished_at, ts)
