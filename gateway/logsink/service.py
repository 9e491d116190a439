"""The query face of the sink: `<prefix>.logs.query` (SQL) and `<prefix>.logs.job` (a job's log).

Requests are answered in tasks of their own (a subscription's callbacks run one at a time), at
most `query_workers` at once, each on a query thread with a DuckDB connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar

import duckdb
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from gateway.bus.contract import ContractError, Error, LogQuery, LogQueryResult, Subjects, decode
from gateway.logsink.config import SinkConfig
from gateway.logsink.joblog import read_job_page
from gateway.logsink.messages import JobLogPage, JobLogRequest, job_log_subject
from gateway.logsink.sandbox import QueryRefused, run_query

log = logging.getLogger(__name__)

T = TypeVar("T")
# Room left in a reply for everything around the rows or entries.
_ENVELOPE: Final = 8 * 1024
# The longest a job-log request may wait for its job's log to come far enough.
_MAX_WAIT_S: Final = 30.0


class LogService:
    """Answers log queries from the index; owns the query threads and their connections."""

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        cursors: list[duckdb.DuckDBPyConnection],
        data_dir: Path,
        config: SinkConfig,
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._cursors = list(cursors)
        self._all_cursors = list(cursors)
        self._data_dir = data_dir
        self._config = config
        self._slots = asyncio.Semaphore(len(cursors))
        self._stored = asyncio.Event()  # set (and replaced) each time a batch is stored
        self._threads = ThreadPoolExecutor(len(cursors), thread_name_prefix="logsink-query")

    async def run(self, stop: asyncio.Event) -> None:
        """Answer requests until `stop` is set, then finish those in progress."""
        async with asyncio.TaskGroup() as tasks:

            async def on_query(msg: Msg) -> None:
                tasks.create_task(self._answer(msg, self._query))

            async def on_job(msg: Msg) -> None:
                tasks.create_task(self._answer(msg, self._job_page))

            subs = [
                await self._nc.subscribe(self._subjects.logs_query, cb=on_query),
                await self._nc.subscribe(job_log_subject(self._subjects), cb=on_job),
            ]
            try:
                await stop.wait()
            finally:
                for sub in subs:
                    await sub.unsubscribe()

    def close(self) -> None:
        """Interrupt what still runs and stop the query threads (blocks until they end)."""
        for cursor in self._all_cursors:
            cursor.interrupt()
        self._threads.shutdown(wait=True)
        for cursor in self._all_cursors:
            cursor.close()

    async def _answer(self, msg: Msg, handler: Callable[[bytes], Awaitable[bytes]]) -> None:
        try:
            reply = await handler(msg.data)
        except QueryRefused as exc:
            reply = _error(exc.code, exc.message)
        except ContractError as exc:
            reply = _error("invalid_request", str(exc))
        except Exception as exc:
            log.exception("answering a log request failed")
            reply = _error("internal", f"the log sink failed to answer: {exc}")
        if msg.reply:
            await msg.respond(reply)

    async def _on_thread(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        async with self._slots:
            cursor = self._cursors.pop()
            try:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._threads, work, cursor)
            finally:
                self._cursors.append(cursor)

    async def _query(self, data: bytes) -> bytes:
        request = decode(data, LogQuery)
        if request.max_rows < 0:
            raise QueryRefused("invalid_request", "max_rows must be 0 or more")
        if not request.timeout_s > 0:
            raise QueryRefused("invalid_request", "timeout_s must be more than 0")
        max_rows = min(request.max_rows, self._config.max_rows_cap)
        timeout_s = min(request.timeout_s, self._config.max_timeout_s)
        result = await self._on_thread(
            lambda cursor: run_query(cursor, request.sql, max_rows=max_rows, timeout_s=timeout_s)
        )
        return _fit(result, self._nc.max_payload)

    def note_stored(self) -> None:
        """A batch of events is in the files and the index: wake the requests waiting on it."""
        self._stored.set()
        self._stored = asyncio.Event()

    async def _job_page(self, data: bytes) -> bytes:
        request = decode(data, JobLogRequest)
        budget = self._nc.max_payload - _ENVELOPE

        async def read() -> JobLogPage:
            page: JobLogPage = await self._on_thread(
                lambda cursor: read_job_page(
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
