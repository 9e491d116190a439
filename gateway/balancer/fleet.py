"""Keeping a ServerTable current from the bus: heartbeats, the registry, capabilities.

One FleetView per process, shared by the balancer and the REST API when they run together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.kv import KeyValue

from gateway.balancer.servers import ServerTable
from gateway.bus.contract import (
    ContractError,
    ControlReply,
    Describe,
    Heartbeat,
    ServerRecord,
    Subjects,
    decode,
    encode,
)

log = logging.getLogger(__name__)


class FleetView:
    """Feeds a ServerTable from the heartbeat subject and KV `comfy_servers`."""

    def __init__(self, nc: Client, servers_kv: KeyValue, subjects: Subjects) -> None:
        self.table = ServerTable()
        self._nc = nc
        self._kv = servers_kv
        self._subjects = subjects
        self._listeners: list[Callable[[str], None]] = []
        self._asking: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Set once every record the registry held at start is in the table: before that, a
        # server known from its heartbeat alone could look open for work while draining.
        self.registry_read = asyncio.Event()

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call `listener(server_id)` whenever a server's heartbeat or registration arrives."""
        self._listeners.append(listener)

    def _changed(self, server_id: str) -> None:
        for listener in self._listeners:
            listener(server_id)

    async def run(self) -> None:
        """Follow heartbeats and the registry until cancelled."""
        sub = await self._nc.subscribe(self._subjects.all_heartbeats, cb=self._on_heartbeat)
        try:
            await self._watch_registry()
        finally:
            await sub.unsubscribe()
            for task in self._tasks:
                task.cancel()

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = decode(msg.data, Heartbeat)
        except ContractError as exc:
            log.warning("ignoring a heartbeat on %s: %s", msg.subject, exc)
            return
        if self.table.on_heartbeat(beat) and beat.server_id not in self._asking:
            # The callback must stay quick: ask for the capabilities in a task of its own.
            self._asking.add(beat.server_id)
            task = asyncio.create_task(self._describe(beat.server_id, beat.capabilities_hash))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._changed(beat.server_id)

    async def _describe(self, server_id: str, digest: str) -> None:
        try:
            reply = await self._nc.request(
                self._subjects.control(server_id), encode(Describe()), timeout=5.0
            )
            answer = decode(reply.data, ControlReply)
            if answer.capabilities is not None:
                self.table.on_capabilities(server_id, answer.capabilities, digest)
                self._changed(server_id)
        except (NatsError, ContractError) as exc:  # the next heartbeat asks again
            log.warning("could not get the capabilities of %s: %s", server_id, exc)
        finally:
            self._asking.discard(server_id)

    async def _watch_registry(self) -> None:
        watcher = await self._kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    self.registry_read.set()
                    continue  # end of the initial values; keep watching
                revision = entry.revision or 0
                if entry.operation is not None or entry.value is None:
                    self.table.on_removed(entry.key, revision=revision)
                else:
                    try:
                        record = decode(entry.value, ServerRecord)
                        self.table.on_registered(record, revision=revision)
                    except ContractError as exc:
                        log.warning("ignoring registry entry %s: %s", entry.key, exc)
                        continue
                self._changed(entry.key)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
