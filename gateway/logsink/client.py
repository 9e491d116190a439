"""Asking the log sink from anywhere on the bus: SQL over the index, or one job's whole log."""

from __future__ import annotations

from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from gateway.bus.contract import Error, LogQuery, LogQueryResult, Subjects, encode
from gateway.logsink.messages import JobLog, JobLogPage, JobLogRequest, job_log_subject

# Time for the request to travel and the reply to be built, beyond the query's own limit.
_MARGIN_S: Final = 5.0


class LogQueryError(RuntimeError):
    """The log sink refused or failed a request; `code` says why (see README.md)."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


class _Probe(msgspec.Struct):
    code: str | None = None
    message: str | None = None


_probe: Final = msgspec.json.Decoder(_Probe)
_error: Final = msgspec.json.Decoder(Error)


def _raise_if_error(data: bytes) -> None:
    probe = _probe.decode(data)
    if probe.code is not None and probe.message is not None:
        error = _error.decode(data)
        raise LogQueryError(error.code, error.message, error.details)


async def _request(nc: Client, subject: str, payload: bytes, within: float) -> bytes:
    try:
        reply = await nc.request(subject, payload, timeout=within)
    except NoRespondersError as exc:
        raise LogQueryError(
            "no_log_sink", f"no log sink answers on {subject}: is `comfyautomate logsink` running?"
        ) from exc
    except NatsTimeoutError as exc:
        raise LogQueryError("timeout", f"the log sink did not answer within {within:g} s") from exc
    _raise_if_error(reply.data)
    return reply.data


async def query_logs(
    nc: Client,
    subjects: Subjects,
    sql: str,
    *,
    max_rows: int = 10_000,
    timeout_s: float = 10.0,
) -> LogQueryResult:
    """Run one SELECT on the log index; raise LogQueryError if the sink refuses it."""
    payload = encode(LogQuery(sql=sql, max_rows=max_rows, timeout_s=timeout_s))
    # The sink refuses a time limit of 0 or less itself: wait long enough to hear it say so.
    data = await _request(nc, subjects.logs_query, payload, max(timeout_s, 0.0) + _MARGIN_S)
    return msgspec.json.decode(data, type=LogQueryResult)


async def job_log(
    nc: Client,
    subjects: Subjects,
    job_id: str,
    *,
    timeout_s: float = 10.0,
    at_least_seq: int = 0,
    wait_s: float = 0.0,
) -> JobLog:
    """A job's events in seq order, as recorded, and the path of its log file.

    With `at_least_seq`, waits up to `wait_s` for the log to hold that event (`JobLog.last_seq`
    says how far it got). Raises LogQueryError with code `not_found` when the sink has no
    event of that job (after the wait, if any).
    """
    entries: list[dict[str, Any]] = []
    offset = 0
    while True:
        request = JobLogRequest(
            job_id=job_id,
            offset=offset,
            at_least_seq=at_least_seq if offset == 0 else 0,
            wait_s=wait_s if offset == 0 else 0.0,
        )
        within = timeout_s + (wait_s if offset == 0 else 0.0)
        data = await _request(nc, job_log_subject(subjects), msgspec.json.encode(request), within)
        page = msgspec.json.decode(data, type=JobLogPage)
        entries.extend(msgspec.json.decode(raw) for raw in page.entries)
        if page.complete or page.next_offset <= offset:
            break
        offset = page.next_offset
    entries.sort(key=lambda entry: int(entry.get("seq", 0)))
    return JobLog(
        job_id=job_id, log_file_path=page.log_file_path, entries=entries, last_seq=page.last_seq
    )


async def logged_upto(
    nc: Client,
    subjects: Subjects,
    job_id: str,
    seq: int,
    *,
    wait_s: float,
    margin_s: float = _MARGIN_S,
) -> int:
    """How far the job's log has come (its newest event's seq), waiting up to `wait_s` for it
    to reach `seq`; 0 when the sink has no event of the job yet."""
    request = JobLogRequest(job_id=job_id, at_least_seq=seq, wait_s=wait_s, head_only=True)
    try:
        data = await _request(
            nc, job_log_subject(subjects), msgspec.json.encode(request), wait_s + margin_s
        )
    except LogQueryError as exc:
        if exc.code == "not_found":
            return 0
        raise
    return msgspec.json.decode(data, type=JobLogPage).last_seq
