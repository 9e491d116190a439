"""The query face of the sink: `<prefix>.logs.query` (SQL), `<prefix>.logs.job` (a job's log),
`<prefix>.logs.jobs` (the job list) and `<prefix>.logs.cancel` (stop a query).

Requests are answered in tasks of their own (a subscription's callbacks run one at a time) on
two pools (pools.py): SQL on `queries`, bounded and refused when full; the system's own reads
on `reads`, so a job's log never waits behind someone's long query. A query is stopped at its
time limit, or earlier when its asker sends a cancel naming the query's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from gateway.bus.contract import ContractError, Error, LogQuery, LogQueryResult, Subjects, decode
from gateway.logsink.config import SinkConfig
from gateway.logsink.joblist import recent_jobs
from gateway.logsink.joblog import read_job_page
from gateway.logsink.messages import (
    QUERY_ID_HEADER,
    JobListRequest,
    JobLogPage,
    JobLogRequest,
    QueryCancel,
    job_list_subject,
    job_log_subject,
    query_cancel_subject,
)
from gateway.logsink.pools import QueryPool
from gateway.logsink.sandbox import QueryRefused, run_query

log = logging.getLogger(__name__)

# Room left in a reply for everything around the rows or entries.
_ENVELOPE: Final = 8 * 1024
# The longest a job-log request may wait for its job's log to come far enough.
_MAX_WAIT_S: Final = 30.0
_cancel: Final = msgspec.json.Decoder(QueryCancel)


class LogService:
    """Answers log requests from the index; owns the pools and their connections.

    `catalog`: DuckDB's name of the index database (for the per-caller views).
    """

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        *,
        queries: QueryPool,
        reads: QueryPool,
        catalog: str,
        data_dir: Path,
        config: SinkConfig,
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self.queries = queries
        self.reads = reads
        self._catalog = catalog
        self._data_dir = data_dir
        self._config = config
        self._stored = asyncio.Event()  # set (and replaced) each time a batch is stored

    async def run(self, stop: asyncio.Event) -> None:
        """Answer requests until `stop` is set, then finish those in progress."""
        async with asyncio.TaskGroup() as tasks:

            def answering(
                handler: Callable[[Msg], Awaitable[bytes]],
            ) -> Callable[[Msg], Awaitable[None]]:
                async def on_message(msg: Msg) -> None:
                    tasks.create_task(self._answer(msg, handler))

                return on_message

            subs = [
                await self._nc.subscribe(self._subjects.logs_query, cb=answering(self._query)),
                await self._nc.subscribe(
                    job_log_subject(self._subjects), cb=answering(self._job_page)
                ),
                await self._nc.subscribe(
                    job_list_subject(self._subjects), cb=answering(self._job_list)
                ),
                await self._nc.subscribe(query_cancel_subject(self._subjects), cb=self._on_cancel),
            ]
            try:
                await stop.wait()
            finally:
                for sub in subs:
                    await sub.unsubscribe()

    def close(self) -> None:
        """Interrupt what still runs and stop the pools (blocks until their threads end)."""
        self.queries.close()
        self.reads.close()

    async def _answer(self, msg: Msg, handler: Callable[[Msg], Awaitable[bytes]]) -> None:
        try:
            reply = await handler(msg)
        except QueryRefused as exc:
            reply = _error(exc.code, exc.message)
        except ContractError as exc:
            reply = _error("invalid_request", str(exc))
        except Exception as exc:
            log.exception("answering a log request failed")
            reply = _error("internal", f"the log sink failed to answer: {exc}")
        if msg.reply:
            await msg.respond(reply)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            request = _cancel.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.warning("ignoring a query cancel that is not a QueryCancel: %s", exc)
            return
        if self.queries.cancel(request.query_id):
            log.info("query %s cancelled by its asker", request.query_id)

    async def _query(self, msg: Msg) -> bytes:
        request = decode(msg.data, LogQuery)
        if request.max_rows < 0:
            raise QueryRefused("invalid_request", "max_rows must be 0 or more")
        if not request.timeout_s > 0:
            raise QueryRefused("invalid_request", "timeout_s must be more than 0")
        size = len(request.sql.encode())
        if size > self._config.max_sql_bytes:
            raise QueryRefused(
                "too_large",
                f"the SQL is {size} bytes; at most {self._config.max_sql_bytes} are taken",
            )
        max_rows = min(request.max_rows, self._config.max_rows_cap)
        timeout_s = min(request.timeout_s, self._config.max_timeout_s)
        query_id = (msg.headers or {}).get(QUERY_ID_HEADER)
        result = await self.queries.run(
            lambda cursor, stopper: run_query(
                cursor,
                request.sql,
                max_rows=max_rows,
                timeout_s=timeout_s,
                caller=request.caller,
                catalog=self._catalog,
                stopper=stopper,
            ),
            caller=request.caller,
            query_id=query_id,
        )
        return _fit(result, self._nc.max_payload)

    async def _job_list(self, msg: Msg) -> bytes:
        request = decode(msg.data, JobListRequest)
        result = await self.reads.run(
            lambda cursor, stopper: recent_jobs(
                cursor, request, timeout_s=self._config.read_timeout_s, stopper=stopper
            )
        )
        return _fit(result, self._nc.max_payload)

    def note_stored(self) -> None:
        """A batch of events is in the files and the index: wake the requests waiting on it."""
        self._stored.set()
        self._stored = asyncio.Event()

    async def _job_page(self, msg: Msg) -> bytes:
        request = decode(msg.data, JobLogRequest)
        budget = self._nc.max_payload - _ENVELOPE

        async def read() -> JobLogPage:
            page: JobLogPage = await self.reads.run(
                lambda cursor, _: read_job_page(
                    cursor,
                    self._data_dir,
                    request.job_id,
                    offset=request.offset,
                    max_bytes=budget,
                    head_only=request.head_only,
                )
            )
            return page

        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(request.wait_s, 0.0), _MAX_WAIT_S)
        while True:
            stored = self._stored  # taken before the read: a batch stored during it wakes us
            try:
                page = await read()
            except QueryRefused as exc:
                if exc.code != "not_found" or request.at_least_seq <= 0:
                    raise
                if loop.time() >= deadline:
                    raise
            else:
                if page.last_seq >= request.at_least_seq or loop.time() >= deadline:
                    return msgspec.json.encode(page)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await stored.wait()


def _error(code: str, message: str) -> bytes:
    return msgspec.json.encode(Error(code=code, message=message))


def _fit(result: LogQueryResult, limit: int) -> bytes:
    """The result encoded; rows cut off (and `truncated` set) if it would exceed one message."""
    encoded = msgspec.json.encode(result)
    if len(encoded) <= limit:
        return encoded
    rows = result.rows
    low, high = 0, len(rows)
    # Find the most rows that fit; each try costs an encode, about twenty of them at most.
    while low < high:
        middle = (low + high + 1) // 2
        result.rows = rows[:middle]
        if len(msgspec.json.encode(result)) + 64 <= limit:
            low = middle
        else:
            high = middle - 1
    result.rows = rows[:low]
    result.truncated = True
    return msgspec.json.encode(result)
