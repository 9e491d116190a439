"""The sink's upkeep while it runs: logs past their retention deleted, and a warning before a
limit of its own (DuckDB's memory, the data folder's disk) is reached.

Both run on the sink's writer thread between batches, so they never race a write, and no stop
is needed for either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from gateway.logsink.config import SinkConfig
from gateway.logsink.store import LogStore

log = logging.getLogger(__name__)

_SIZE: Final = re.compile(r"^\s*([0-9.]+)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS: Final = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}


def size_in_bytes(text: str) -> int | None:
    """DuckDB's way of writing a size ("1GB", "512MiB") in bytes; None if it is not one."""
    match = _SIZE.match(text)
    if match is None:
        return None
    unit = match.group(2).upper()
    if unit and not unit.endswith("B"):
        unit += "B"
    factor = _UNITS.get(unit)
    return None if factor is None else int(float(match.group(1)) * factor)


class Upkeep:
    """Pruning and limit watching for one sink's store."""

    def __init__(
        self,
        store: LogStore,
        config: SinkConfig,
        data_dir: Path,
        in_writer: Callable[[Callable[[], int]], Awaitable[int]],
    ) -> None:
        self._store = store
        self._config = config
        self._data_dir = data_dir
        self._in_writer = in_writer
        self._memory_limit = size_in_bytes(config.memory_limit)
        self._warned: set[str] = set()  # limits warned of and not yet back to normal
        self.jobs_pruned = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Prune and watch until `stop` is set."""
        config = self._config
        loop = asyncio.get_running_loop()
        next_prune = next_watch = loop.time()
        while not stop.is_set():
            now = loop.time()
            if config.retention_s > 0 and now >= next_prune:
                # A full pass means more may be waiting: the next one comes at once.
                full = await self.prune() >= config.prune_jobs
                next_prune = loop.time() + (0.0 if full else config.prune_every_s)
            if now >= next_watch:
                await self.watch()
                next_watch = loop.time() + config.watch_every_s
            wake = next_watch if config.retention_s <= 0 else min(next_prune, next_watch)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(wake):
                    await stop.wait()

    async def prune(self) -> int:
        """One pass: the logs of up to `prune_jobs` jobs past the retention; how many."""
        cutoff = time.time() - self._config.retention_s
        limit = self._config.prune_jobs
        pruned = await self._in_writer(lambda: self._store.prune(cutoff, limit))
        if pruned:
            self.jobs_pruned += pruned
            log.info("deleted the logs of %d jobs older than the retention", pruned)
        return pruned

    async def watch(self) -> None:
        """Warn of a limit about to be reached; say when it is clear again."""
        if self._memory_limit:
            used = await self._in_writer(self._store.index.memory_use)
            share = self._config.warn_memory_share
            self._note(
                "memory",
                used >= share * self._memory_limit,
                f"the log index uses {used / 2**20:.0f} MiB of its {self._config.memory_limit} "
                "memory limit; past it writes fail: raise the limit or set logs_retention_s",
            )
        disk = shutil.disk_usage(self._data_dir)
        low = disk.free < max(
            self._config.warn_free_share * disk.total, self._config.min_free_bytes
        )
        self._note(
            "disk",
            low,
            f"{disk.free / 2**30:.1f} GiB free of {disk.total / 2**30:.1f} GiB where the logs "
            f"are ({self._data_dir}); when it is full, events cannot be stored: free space or "
            "set logs_retention_s",
        )

    def _note(self, limit: str, near: bool, message: str) -> None:
        if near and limit not in self._warned:
            self._warned.add(limit)
            log.warning("log sink near its %s limit: %s", limit, message)
        elif not near and limit in self._warned:
            self._warned.discard(limit)
            log.info("log sink: %s is clear of its limit again", limit)
