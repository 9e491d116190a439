"""Messages of the job-log subject `<prefix>.logs.job`, which the bus contract does not define.

They follow the contract's conventions (msgspec Structs, JSON, a `v` field) so they can move into
gateway/bus/contract.py unchanged.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.bus.contract import SCHEMA_VERSION, Subjects


def job_log_subject(subjects: Subjects) -> str:
    """`<prefix>.logs.job`: request a job's events (JobLogRequest -> JobLogPage or Error)."""
    return f"{subjects.prefix}.logs.job"


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
