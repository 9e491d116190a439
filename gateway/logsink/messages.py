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
    """One page of a job's events, from byte `offset` of its log file (0: the start)."""

    v: int = SCHEMA_VERSION
    job_id: str
    offset: int = 0


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


class JobLog(msgspec.Struct, kw_only=True):
    """A job's whole log, as the client function `job_log` returns it."""

    job_id: str
    log_file_path: str
    entries: list[dict[str, Any]]

    @property
    def entry_count(self) -> int:
        return len(self.entries)
