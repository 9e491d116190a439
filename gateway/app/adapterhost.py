"""The adapter host of a one-machine setup: one adapter per server in KV `comfy_servers`.

`comfyautomate up` runs it, so registering a server through the API (or `--comfyui ADDR`) is
enough to put it to work; removing it stops its adapter, which hands back what it holds. On a
fleet, adapters run on the GPU boxes instead (`comfyautomate adapter`), and this host is not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client
from nats.js.kv import KeyValue

from gateway.bus.contract import ContractError, ServerRecord, Subjects, decode
from gateway.settings import Settings
from gateway.storage import Storage
from plugins.comfyui.adapter import run_adapter
from plugins.comfyui.options import AdapterOptions

log = logging.getLogger(__name__)


class _Running:
    def __init__(self, record: ServerRecord, task: asyncio.Task[None], stop: asyncio.Event):
        self.record = record
        self.task = task
        self.stop = stop


class AdapterHost:
    """Starts, restarts and stops in-process adapters as the registry changes."""

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        storage: Storage,
        options: AdapterOptions | None = None,
    ) -> None:
        """`options`: the adapters' timings (their defaults unless given)."""
        self._nc = nc
        self._settings = settings
        self._storage = storage
        self._options = options
        self._subjects = Subjects(settings.subject_prefix)
        self._running: dict[str, _Running] = {}

    @property
    def servers(self) -> list[str]:
        return sorted(self._running)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the registry until `stop`; then stop every adapter and wait for them."""
        kv = await self._nc.jetstream().key_value(self._subjects.servers_bucket)
        follow = asyncio.create_task(self._follow(kv))
        try:
            await stop.wait()
        finally:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow
            await asyncio.gather(*(self._stop(server_id) for server_id in list(self._running)))

    async def _follow(self, kv: KeyValue) -> None:
        watcher = await kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                if entry.operation is not None or entry.value is None:
                    await self._stop(entry.key)
                    continue
                try:
                    record = decode(entry.value, ServerRecord)
                except ContractError as exc:
                    log.warning("ignoring registry entry %s: %s", entry.key, exc)
                    continue
                running = self._running.get(record.server_id)
                if running is not None and _same_adapter(running.record, record):
                    running.record = record  # a new name, weight or labels: the registry's
                    continue
                await self._stop(record.server_id)
                self._start(record)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    def _start(self, record: ServerRecord) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_adapter(
                self._nc,
                self._settings,
                stop,
                server_id=record.server_id,
                address=record.address,
                capacity=record.capacity,
                weight=record.weight,
                labels=record.labels,
                storage=self._storage,
                options=self._options,
            ),
            name=f"adapter-{record.server_id}",
        )
        task.add_done_callback(lambda t: self._report_end(record.server_id, t))
        self._running[record.server_id] = _Running(record, task, stop)
        log.info("adapter for %s (%s) started", record.server_id, record.address)

    def _report_end(self, server_id: str, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("adapter for %s stopped", server_id, exc_info=task.exception())

    async def _stop(self, server_id: str) -> None:
        running = self._running.pop(server_id, None)
        if running is None:
            return
        running.stop.set()
        # An error was already reported by _report_end; stopping goes on regardless.
        await asyncio.gather(running.task, return_exceptions=True)
        log.info("adapter for %s stopped", server_id)


def _same_adapter(before: ServerRecord, after: ServerRecord) -> bool:
    """Whether the adapter of `before` serves `after` as it is (it need not restart).

    Name, weight and labels are read from the registry by the balancers; only the address and
    how many jobs the adapter takes at once are the adapter's own.
    """
    return (before.address, before.capacity) == (after.address, after.capacity)
