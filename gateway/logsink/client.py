"""Asking the log sink from anywhere on the bus: SQL over the index, or one job's whole log."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from gateway.bus.contract import Error, LogQuery, LogQueryResult, Subjects, encode, new_id
from gateway.logsink.messages import (
    QUERY_ID_HEADER,
    JobListRequest,
    JobLog,
    JobLogPage,
    JobLogRequest,
    QueryCancel,
    job_list_subject,
    job_log_subject,
    query_cancel_subject,
)

log = logging.getLogger(__name__)

# Time for the request to travel and the reply to be built, beyond the query's own limit.
_MARGIN_S: Final = 5.0
# The longest SQL text a query may have, and the longest it may run: the sink's defaults
# (SinkConfig.max_sql_bytes, max_timeout_s), checked here so that a request the sink would
# refuse is not sent (a text beyond NATS's payload limit could not be).
MAX_SQL_BYTES: Final = 64 * 1024
MAX_TIMEOUT_S: Final = 60.0


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


def check_query(sql: str, timeout_s: float, max_rows: int = 0) -> None:
    """Raise LogQueryError (`too_large`, `invalid_request`) for a query the sink would refuse."""
    size = len(sql.encode())
    if size > MAX_SQL_BYTES:
        raise LogQueryError(
            "too_large",
            f"the SQL is {size} bytes; a query takes at most {MAX_SQL_BYTES}",
            {"max_sql_bytes": MAX_SQL_BYTES},
        )
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise LogQueryError(
            "invalid_request",
            f"timeout_s must be more than 0 and at most {MAX_TIMEOUT_S:g}",
            {"max_timeout_s": MAX_TIMEOUT_S},
        )
    if max_rows < 0:
        raise LogQueryError("invalid_request", "max_rows must be 0 or more")


async def query_logs(
    nc: Client,
    subjects: Subjects,
    sql: str,
    *,
    max_rows: int = 10_000,
    timeout_s: float = 10.0,
    caller: str | None = None,
) -> LogQueryResult:
    """Run one read-only query on the log index; raise LogQueryError if the sink refuses it.

    `caller`: the query sees only that caller's jobs (None: every job). If this call is
    cancelled or times out, the sink is told to stop the query.
    """
    check_query(sql, timeout_s, max_rows)
    payload = encode(LogQuery(sql=sql, max_rows=max_rows, timeout_s=timeout_s, caller=caller))
    query_id = new_id()
    try:
        reply = await nc.request(
            subjects.logs_query,
            payload,
            timeout=timeout_s + _MARGIN_S,
            headers={QUERY_ID_HEADER: query_id},
        )
    except NoRespondersError as exc:
        raise LogQueryError(
            "no_log_sink",
            f"no log sink answers on {subjects.logs_query}: is `comfyautomate logsink` running?",
        ) from exc
    except NatsTimeoutError as exc:
        await _cancel_query(nc, subjects, query_id)
        raise LogQueryError(
            "timeout", f"the log sink did not answer within {timeout_s + _MARGIN_S:g} s"
        ) from exc
    except asyncio.CancelledError:
        await _cancel_query(nc, subjects, query_id)
        raise
    _raise_if_error(reply.data)
    return msgspec.json.decode(reply.data, type=LogQueryResult)


async def _cancel_query(nc: Client, subjects: Subjects, query_id: str) -> None:
    """Tell the sink to stop a query nobody waits for any more."""
    try:
        await nc.publish(
            query_cancel_subject(subjects), msgspec.json.encode(QueryCancel(query_id=query_id))
        )
    except Exception:
        # The query still ends at its time limit; a lost cancel only frees its slot later.
        log.exception("telling the log sink to stop query %s failed", query_id)


async def recent_jobs(
    nc: Client,
    subjects: Subjects,
    *,
    status: str | None = None,
    server: str | None = None,
    caller: str | None = None,
    limit: int = 50,
    timeout_s: float = 10.0,
) -> list[dict[str, Any]]:
    """The newest jobs of the index (at most 1000), filtered by status, server and caller.

    Answered on the sink's own-reads pool: never behind people's SQL.
    """
    request = JobListRequest(
        status=status, server_id=server, caller=caller, limit=max(1, min(limit, 1000))
    )
    data = await _request(
        nc, job_list_subject(subjects), msgspec.json.encode(request), timeout_s + _MARGIN_S
    )
    result = msgspec.json.decode(data, type=LogQueryResult)
    names = [column.name for column in result.columns]
    return [dict(zip(names, row, strict=True)) for row in result.rows]


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
    raw = await job_log_raw(
        nc, subjects, job_id, timeout_s=timeout_s, at_least_seq=at_least_seq, wait_s=wait_s
    )
    entries: list[dict[str, Any]] = [msgspec.json.decode(entry) for entry in raw.entries]
    entries.sort(key=lambda entry: int(entry.get("seq", 0)))
    return JobLog(
        job_id=job_id, log_file_path=raw.log_file_path, entries=entries, last_seq=raw.last_seq
    )


async def job_log_raw(
    nc: Client,
    subjects: Subjects,
    job_id: str,
    *,
    timeout_s: float = 10.0,
    at_least_seq: int = 0,
    wait_s: float = 0.0,
) -> JobLogPage:
    """As `job_log`, but every page in one, with the events as the file holds them (JSON)."""
    entries: list[msgspec.Raw] = []
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
        entries.extend(page.entries)
        if page.complete or page.next_offset <= offset:
            break
        offset = page.next_offset
    return msgspec.structs.replace(page, entries=entries, next_offset=0, complete=True)


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


async def has_log(nc: Client, subjects: Subjects, job_id: str) -> bool:
    """Whether the log sink holds events of the job; LogQueryError when it cannot tell."""
    return await logged_upto(nc, subjects, job_id, 0, wait_s=0.0) > 0
