"""Threads and DuckDB connections for one kind of request, with what is running on them.

The sink keeps two pools, so that one kind never waits for the other: people's SQL, bounded
overall and per caller and refused (`busy`) rather than queued when full, and the reads the
system itself makes (a job's log, the job list), which wait their turn since each is short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import duckdb
import msgspec

from gateway.logsink.refusal import QueryRefused
from gateway.logsink.sandbox import Stopper

log = logging.getLogger(__name__)

T = TypeVar("T")


class PoolStats(msgspec.Struct, kw_only=True):
    """What a pool has done so far; tests and metrics wait on it (`QueryPool.wait_until`)."""

    running: int = 0
    finished: int = 0
    refused_busy: int = 0
    cancelled: int = 0
    """Queries stopped because their asker gave up (a cancel came)."""
    interrupted: int = 0
    """Queries stopped by their watchdog, at their time limit or on a cancel."""


class QueryPool:
    """`len(cursors)` threads, each with a connection of its own.

    `per_caller`: at most this many requests of one caller at once. `queue`: a request that
    finds every connection busy waits for one; otherwise it is refused at once with `busy`.
    """

    def __init__(
        self,
        name: str,
        cursors: Sequence[duckdb.DuckDBPyConnection],
        *,
        per_caller: int | None = None,
        queue: bool = False,
    ) -> None:
        self.name = name
        self.stats = PoolStats()
        self._cursors = list(cursors)
        self._free = list(cursors)
        self._per_caller = per_caller
        self._queue = queue
        self._slots = asyncio.Semaphore(len(cursors))
        self._callers: Counter[str | None] = Counter()
        self._running: dict[str, Stopper] = {}
        self._changed = asyncio.Event()
        self._threads = ThreadPoolExecutor(len(cursors), thread_name_prefix=f"logsink-{name}")

    @property
    def size(self) -> int:
        return len(self._cursors)

    async def run(
        self,
        work: Callable[[duckdb.DuckDBPyConnection, Stopper], T],
        *,
        caller: str | None = None,
        query_id: str | None = None,
    ) -> T:
        """Run `work(cursor, stopper)` on a thread of the pool; `query_id` lets `cancel` stop it.

        Raises QueryRefused(`busy`) when the pool (or the caller's share of it) is full and
        the pool does not queue.
        """
        if not self._queue:
            self._check_room(caller)
        async with self._slots:
            cursor = self._free.pop()
            stopper = Stopper()
            self._callers[caller] += 1
            if query_id is not None:
                self._running[query_id] = stopper
            self.stats.running += 1
            self._notify()
            try:
                return await self._on_thread(work, cursor, stopper)
            finally:
                self._free.append(cursor)
                self._callers[caller] -= 1
                if self._callers[caller] <= 0:
                    del self._callers[caller]
                if query_id is not None and self._running.get(query_id) is stopper:
                    del self._running[query_id]
                self.stats.running -= 1
                self.stats.finished += 1
                self.stats.cancelled += stopper.cancelled
                self.stats.interrupted += stopper.fired
                self._notify()

    def _check_room(self, caller: str | None) -> None:
        if self._per_caller is not None and self._callers[caller] >= self._per_caller:
            self.stats.refused_busy += 1
            self._notify()
            raise QueryRefused(
                "busy",
                f"{self._per_caller} queries of this caller are running already; "
                "try again when one has finished",
            )
        if not self._free:
            self.stats.refused_busy += 1
            self._notify()
            raise QueryRefused(
                "busy",
                f"the log sink runs {len(self._cursors)} queries at once and is full; "
                "try again shortly",
            )

    async def _on_thread(
        self,
        work: Callable[[duckdb.DuckDBPyConnection, Stopper], T],
        cursor: duckdb.DuckDBPyConnection,
        stopper: Stopper,
    ) -> T:
        running = asyncio.get_running_loop().run_in_executor(self._threads, work, cursor, stopper)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            # The connection is not free until the thread is done with it.
            stopper.cancel()
            with contextlib.suppress(Exception):
                await running
            raise

    def cancel(self, query_id: str) -> bool:
        """Stop the query with this id, if it runs here; whether it did."""
        stopper = self._running.get(query_id)
        if stopper is None:
            return False
        stopper.cancel()
        return True

    async def wait_until(self, ready: Callable[[PoolStats], bool]) -> None:
        """Wait until `ready(stats)` holds (woken at each change; bound it with a timeout)."""
        while not ready(self.stats):
            changed = self._changed
            await changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        """Interrupt what still runs, stop the threads (blocks until they end), close."""
        for stopper in list(self._running.values()):
            stopper.cancel()
        for cursor in self._cursors:
            cursor.interrupt()
        self._threads.shutdown(wait=True)
        for cursor in self._cursors:
            cursor.close()
