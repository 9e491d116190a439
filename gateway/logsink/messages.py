"""Messages of the log sink's own subjects (`<prefix>.logs.job`, `.jobs`, `.cancel`), which the
bus contract does not define.

They follow the contract's conventions (msgspec Structs, JSON, a `v` field) so they can move into
gateway/bus/contract.py unchanged.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from gateway.bus.contract import SCHEMA_VERSION, Subjects


def job_log_subject(subjects: Subjects) -> str:
    """`<prefix>.logs.job`: request a job's events (JobLogRequest -> JobLogPage or Error)."""
    return f"{subjects.prefix}.logs.job"


def job_list_subject(subjects: Subjects) -> str:
    """`<prefix>.logs.jobs`: the recent jobs (JobListRequest -> LogQueryResult or Error)."""
    return f"{subjects.prefix}.logs.jobs"


def query_cancel_subject(subjects: Subjects) -> str:
    """`<prefix>.logs.cancel`: stop a running query (QueryCancel, no reply)."""
    return f"{subjects.prefix}.logs.cancel"


# The name of the sink's durable consumer of EVENTS: what it has not acked is its lag.
SINK_DURABLE: Final = "logsink"

# A header of a `<prefix>.logs.query` request: the id a QueryCancel names the query by. A query
# without one runs to its end or its time limit.
QUERY_ID_HEADER: Final = "Comfy-Query-Id"


class QueryCancel(msgspec.Struct, kw_only=True):
    """Its asker gave up on the query sent with this id: the sink interrupts it."""

    v: int = SCHEMA_VERSION
    query_id: str


class JobListRequest(msgspec.Struct, kw_only=True):
    """The newest jobs first, from the index, filtered by status, server and caller."""

    v: int = SCHEMA_VERSION
    status: str | None = None
    server_id: str | None = None
    caller: str | None = None
    limit: int = 50


class JobLogRequest(msgspec.Struct, kw_only=True):
    """One page of a job's events, from byte `offset` of its log file (0: the start).

    With `at_least_seq`, the sink answers once the job's log holds that event (in its file and
    its index), or after `wait_s` seconds with what it holds then (`last_seq` tells); a job it
    has no event of yet is waited for the same way. `head_only` leaves the entries out: a
    check that the log has come that far.
    """

    v: int = SCHEMA_VERSION
    job_id: str
    offset: int = 0
    at_least_seq: int = 0
    wait_s: float = 0.0
    head_only: bool = False


class JobLogPage(msgspec.Struct, kw_only=True):
    """Events exactly as stored in the job's JSONL file, in file order (which is seq order).

    A reply holds as many events as fit in one NATS message; `complete` is False when more
    follow, to be asked for with `offset` = this page's `next_offset`.
    """

    v: int = SCHEMA_VERSION
    job_id: str
    log_file_path: str
    entries: list[msgspec.Raw]
    next_offset: int = 0
    complete: bool = True
    last_seq: int = 0
    """The newest event of the job that the log holds."""


class JobLog(msgspec.Struct, kw_only=True):
    """A job's whole log, as the client function `job_log` returns it."""

    job_id: str
    log_file_path: str
    entries: list[dict[str, Any]]
    last_seq: int = 0

    @property
    def entry_count(self) -> int:
        return len(self.entries)
