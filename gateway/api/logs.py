"""`/workflow/logs/{job_id}`, `/logs/query` and `/workflow/jobs`: answered by the log sink."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import msgspec
from litestar import Request, get, post
from litestar.params import FromPath, FromQuery, JSONBody
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from gateway.api.auth import caller_of
from gateway.api.errors import ApiError, error_responses
from gateway.api.limits import RateLimited
from gateway.api.services import LOGGED_WAIT_S, Services, ServicesDep
from gateway.bus.contract import (
    SCHEMA_VERSION,
    ContractError,
    JobStatus,
    LogQueryResult,
    SqlQuery,
    check_token,
)
from gateway.logsink.client import LogQueryError, job_log, query_logs
from gateway.logsink.client import recent_jobs as sink_recent_jobs

T = TypeVar("T")
_log = logging.getLogger(__name__)

# HTTP status for the log sink's refusal codes; anything else is a bad query (400).
_STATUS = {
    "unknown_job": 404,
    "not_found": 404,
    "timeout": 504,
    "no_log_sink": 503,
    "too_large": 413,
    "cancelled": 503,
    "internal": 500,
}
# Seconds a caller told `busy` is asked to wait before trying again.
_BUSY_RETRY_S = 1


class SinkBusy(RateLimited):
    """429 `busy`: the log sink runs as many queries (of this caller) as it takes."""

    def __init__(self, message: str, details: Any = None) -> None:
        ApiError.__init__(self, 429, "busy", message, details)
        self.retry_after = _BUSY_RETRY_S


class JobLogBody(msgspec.Struct, kw_only=True):
    job_id: str
    log_file_path: str
    entry_count: int
    entries: list[dict[str, Any]]
    complete: bool = True
    """False while the log is behind the job's record: read it again for the rest."""


async def ask_sink(call: Any) -> Any:
    """The log sink's answer to `call`, its refusals turned into the API's errors."""
    try:
        return await call
    except LogQueryError as exc:
        if exc.code == "busy":
            raise SinkBusy(exc.message, exc.details) from None
        raise ApiError(_STATUS.get(exc.code, 400), exc.code, exc.message, exc.details) from None
    except NoRespondersError:
        raise ApiError(503, "no_log_sink", "no log sink is running to answer") from None
    except NatsTimeoutError:
        raise ApiError(504, "log_sink_timeout", "the log sink did not answer in time") from None


@get("/workflow/logs/{job_id:str}", tags=["logs"], responses=error_responses(404, 503, 504))
async def job_logs(
    job_id: FromPath[str], services: ServicesDep, request: Request[Any, Any, Any]
) -> JobLogBody:
    """Every event of a job as its JSONL log file holds it, with the file's path.

    For a job the gateway knows, the answer waits briefly for the log to catch up with the
    job's record, and says `complete: false` if it has not yet (never 404).
    """
    caller = caller_of(request)
    try:
        record = await services.record(job_id)
    except ApiError:
        record = None  # not in KV: the log alone can tell (an admin's business alone)
    if not caller.owns(None if record is None else record.caller):
        raise ApiError(404, "unknown_job", f"no job {job_id!r}")
    if record is None:
        log = await ask_sink(job_log(services.nc, services.subjects, job_id))
    else:
        try:
            log = await ask_sink(
                job_log(
                    services.nc,
                    services.subjects,
                    job_id,
                    at_least_seq=record.last_seq,
                    wait_s=LOGGED_WAIT_S,
                )
            )
        except ApiError as exc:
            if exc.code != "not_found":
                raise
            return JobLogBody(
                job_id=job_id,
                log_file_path=services.log_path(record.log_file_path),
                entry_count=0,
                entries=[],
                complete=False,
            )
    return JobLogBody(
        job_id=log.job_id,
        log_file_path=services.log_path(log.log_file_path),
        entry_count=log.entry_count,
        entries=log.entries,
        complete=record is None or log.last_seq >= record.last_seq,
    )


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    """Return once the client has gone (its body is read: the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _while_connected(request: Request[Any, Any, Any], call: Awaitable[T]) -> T:
    """Await `call`, cancelling it if the client goes away first (a query then stops)."""
    work = asyncio.ensure_future(call)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done() and gone.exception() is not None:
            # Not knowing whether the client is there is no reason to stop its query.
            _log.warning("watching for the client to go away failed: %r", gone.exception())
            await asyncio.wait({work})
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            # Let the cancellation land (the sink is told to stop the query) before reading it.
            await asyncio.wait({work})
    if work.cancelled():
        raise ApiError(503, "cancelled", "the client went away; the query was stopped")
    return work.result()


@post("/logs/query", tags=["logs"], status_code=200, responses=error_responses(413, 429, 503, 504))
async def logs_query(
    data: JSONBody[SqlQuery], services: ServicesDep, request: Request[Any, Any, Any]
) -> LogQueryResult:
    """Run one read-only SELECT on the log index (sandboxed: no files, no settings).

    A user key's query sees only the rows of its own jobs; an admin's sees every row.
    """
    if data.v > SCHEMA_VERSION:
        # The contract's rule: refuse a message of a later version rather than misread it.
        raise ApiError(
            400,
            "invalid_request",
            f"the query has schema version {data.v}; this gateway understands up to "
            f"{SCHEMA_VERSION}",
        )
    call = query_logs(
        services.nc,
        services.subjects,
        data.sql,
        max_rows=data.max_rows,
        timeout_s=data.timeout_s,
        caller=scope_of(request),
    )
    result: LogQueryResult = await _while_connected(request, ask_sink(call))
    return result


@get("/workflow/jobs", tags=["workflows"], responses=error_responses(503, 504))
async def recent_jobs(
    services: ServicesDep,
    request: Request[Any, Any, Any],
    status: FromQuery[JobStatus | None] = None,
    server: FromQuery[str | None] = None,
    limit: FromQuery[int] = 50,
) -> list[dict[str, Any]]:
    """Recent jobs, newest first, from the log index; filter by status and server.

    A user key lists only its own jobs.
    """
    return await list_jobs(
        services, status=status, server=server, limit=limit, caller=scope_of(request)
    )


def scope_of(request: Request[Any, Any, Any]) -> str | None:
    """Whose rows the request may see in the index: None for an admin (every row)."""
    caller = caller_of(request)
    return None if caller.admin else caller.id


async def list_jobs(
    services: Services,
    *,
    status: JobStatus | None,
    server: str | None,
    limit: int,
    caller: str | None = None,
) -> list[dict[str, Any]]:
    if server is not None:
        try:
            check_token(server, "server id")
        except ContractError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None
        if "'" in server or "\\" in server:
            raise ApiError(400, "invalid_request", "server ids have no quotes")
    rows: list[dict[str, Any]] = await ask_sink(
        sink_recent_jobs(
            services.nc,
            services.subjects,
            status=None if status is None else JobStatus(status).value,
            server=server,
            caller=caller,
            limit=limit,
        )
    )
    return rows
