"""The log sink as a whole: recovery, the consumer, the writer thread and the query service.

`run_logsink(settings, stop)` is what `comfyautomate logsink` and `comfyautomate up` run;
`LogSink` is the same as an async context manager on a connection the caller owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import duckdb
import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from gateway.bus.connection import connect, ensure_resources, resources_for
from gateway.bus.contract import Subjects, new_id
from gateway.bus.lease import hold_lease, lease_held
from gateway.bus.retry import through_election
from gateway.lifecycle import wait_event
from gateway.logsink.attempts import write_attempts
from gateway.logsink.config import SinkConfig
from gateway.logsink.consumer import EventPuller
from gateway.logsink.jsonl import JsonlError
from gateway.logsink.pools import QueryPool
from gateway.logsink.position import settle_position, stream_state
from gateway.logsink.rebuild import reconcile
from gateway.logsink.service import LogService
from gateway.logsink.store import BatchStats, LogStore
from gateway.logsink.tenancy import catalog_of
from gateway.logsink.upkeep import Upkeep
from gateway.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# A fetch of webhook attempts waits this long; a stopping sink waits out the one under way.
_ATTEMPTS_WAIT_S = 0.25


class LogSink:
    """A running log sink on `nc`. Use `async with LogSink(...) as sink:`.

    On exit it stops fetching, stores and acknowledges what it holds, finishes the queries in
    progress and closes the index.
    """

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        data_dir: str | Path,
        config: SinkConfig | None = None,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._subjects = subjects
        self.data_dir = Path(data_dir)
        self.config = config or SinkConfig()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="logsink-writer")
        self._stopping = asyncio.Event()
        self._store: LogStore | None = None
        self._service: LogService | None = None
        self.upkeep: Upkeep | None = None
        self._puller: EventPuller | None = None
        self._task: asyncio.Task[None] | None = None
        self._acked_upto = 0
        self._gave_up = False  # a batch was left unstored while stopping: store no more
        self._progress = asyncio.Condition()
        self.events_written = 0
        self.events_duplicate = 0

    async def _in_writer(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, work)

    async def __aenter__(self) -> LogSink:
        try:
            await self._start()
        except BaseException:
            await self._close_resources()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _start(self) -> None:
        config = self.config
        self._store = store = await self._in_writer(lambda: LogStore(self.data_dir, config))
        # Lines a crash left in the files but not in the index go in before any redelivery.
        await self._in_writer(lambda: reconcile(store))
        state = await stream_state(self._js, self._subjects, config.durable)
        upto = await self._in_writer(lambda: settle_position(store, state))
        self._service = LogService(
            self._nc,
            self._subjects,
            queries=QueryPool(
                "query",
                await self._cursors(config.query_workers),
                per_caller=config.queries_per_caller,
            ),
            reads=QueryPool("read", await self._cursors(config.read_workers), queue=True),
            catalog=await self._in_writer(lambda: _catalog(store)),
            data_dir=self.data_dir,
            config=config,
        )
        self.upkeep = Upkeep(store, config, self.data_dir, self._in_writer)
        self._puller = EventPuller(self._nc, self._js, self._subjects, config)
        await self._puller.start(after=upto)
        self._acked_upto = upto
        self._task = asyncio.create_task(self._run(), name="logsink")
        log.info("log sink running: data in %s", self.data_dir.resolve())

    async def _cursors(self, count: int) -> list[duckdb.DuckDBPyConnection]:
        store = self._store
        assert store is not None
        return [await self._in_writer(store.index.cursor) for _ in range(max(count, 1))]

    @property
    def queries(self) -> QueryPool:
        """The pool of people's SQL: what runs, what was cancelled (see PoolStats)."""
        assert self._service is not None, "the log sink is not running"
        return self._service.queries

    @property
    def reads(self) -> QueryPool:
        """The pool of the system's own reads (job logs, the job list)."""
        assert self._service is not None, "the log sink is not running"
        return self._service.reads

    async def _run(self) -> None:
        assert self._service is not None and self.upkeep is not None
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._consume())
            tasks.create_task(self._consume_attempts())
            tasks.create_task(self._service.run(self._stopping))
            tasks.create_task(self.upkeep.run(self._stopping))

    async def wait(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; raise if the sink fails first."""
        assert self._task is not None
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({stopper, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if self._task.done():
            self._task.result()

    async def close(self) -> None:
        """Stop gracefully (see the class docstring). Safe to call twice."""
        self._stopping.set()
        try:
            if self._task is not None:
                # A failure was raised by wait() already; here it is only logged.
                (outcome,) = await asyncio.gather(self._task, return_exceptions=True)
                if isinstance(outcome, BaseException) and not isinstance(
                    outcome, asyncio.CancelledError
                ):
                    log.error("the log sink stopped on an error: %r", outcome)
        finally:
            await self._close_resources()

    async def _close_resources(self) -> None:
        puller, self._puller = self._puller, None
        if puller is not None:
            # Normally stopped by the consumer already; this covers a failed start.
            await puller.stop()
        service, self._service = self._service, None
        if service is not None:
            await asyncio.get_running_loop().run_in_executor(None, service.close)
        store, self._store = self._store, None
        if store is not None:
            await self._in_writer(store.close)
        self._writer.shutdown(wait=True)

    async def wait_caught_up(self) -> None:
        """Wait until every event now in the stream is stored and acknowledged.

        Wakes on each acknowledged batch; bound it with asyncio.timeout.
        """
        info = await self._js.stream_info(self._subjects.events_stream)
        target = info.state.last_seq
        async with self._progress:
            await self._progress.wait_for(lambda: self._acked_upto >= target)

    # ---------------------------------------------------------------------------------------

    async def _consume(self) -> None:
        puller = self._puller
        assert puller is not None
        # The acks of one batch go out while the writer stores the next: each is acked only
        # after it is stored, and the writer does not wait on the loop.
        acking: asyncio.Task[None] | None = None
        try:
            while not self._stopping.is_set():
                batch = await puller.next_batch(self._stopping)
                if batch:
                    acking = await self._store_then_ack(batch, acking)
            held = await puller.stop()
            for start in range(0, len(held), self.config.batch_size):
                if self._gave_up:
                    # Once a batch is not stored, nothing after it may be, or the index's
                    # position would pass it; they all come again at the next start.
                    log.warning("stopping with %d more events not stored", len(held) - start)
                    break
                part = held[start : start + self.config.batch_size]
                acking = await self._store_then_ack(part, acking)
        finally:
            if acking is not None:
                await acking
        await self._nc.flush()

    async def _store_then_ack(
        self, batch: list[Msg], acking: asyncio.Task[None] | None
    ) -> asyncio.Task[None] | None:
        """Store `batch`; then start acking it once the previous batch's acks are out."""
        stats = await self._write(batch)
        if stats is not None and self._service is not None:
            self._service.note_stored()
        if acking is not None:
            await acking
        if stats is None:
            return None
        return asyncio.create_task(self._ack(batch, stats), name="logsink-ack")

    async def _write(self, batch: list[Msg]) -> BatchStats | None:
        store = self._store
        assert store is not None
        raws = [msg.data for msg in batch]
        seqs = [msg.metadata.sequence.stream for msg in batch]
        delay = self.config.retry_min_s
        while True:
            try:
                return await self._in_writer(lambda: store.write_batch(raws, seqs))
            except (JsonlError, duckdb.FatalException):
                raise
            except Exception:
                log.exception("storing %d events failed; trying again in %.1f s", len(raws), delay)
            if self._stopping.is_set():
                log.warning("stopping with %d events not stored; they come again", len(raws))
                self._gave_up = True
                return None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            delay = min(delay * 2, self.config.retry_max_s)

    async def _consume_attempts(self) -> None:
        """Webhook attempts into the job logs and `webhook_deliveries` (attempts.py)."""
        store = self._store
        assert store is not None
        sub = await self._js.pull_subscribe(
            self._subjects.all_webhook_attempts,
            durable=ATTEMPTS_CONSUMER,
            stream=self._subjects.webhooks_stream,
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.EXPLICIT, ack_wait=self.config.ack_wait_s, max_deliver=-1
            ),
        )
        try:
            while not self._stopping.is_set():
                try:
                    batch = await sub.fetch(self.config.batch_size, timeout=_ATTEMPTS_WAIT_S)
                except TimeoutError:  # nats-py's or asyncio's: nothing came
                    continue
                except nats.errors.Error as exc:  # the broker restarting, say
                    log.warning("fetching webhook attempts failed (%s); trying again", exc)
                    await wait_event(self._stopping, 1.0)
                    continue
                raws = [msg.data for msg in batch]
                try:
                    held = await self._in_writer(functools.partial(write_attempts, store, raws))
                except (JsonlError, duckdb.FatalException):
                    raise
                except Exception:
                    log.exception("storing %d webhook attempts failed; they come again", len(raws))
                    held = set(range(len(batch)))
                for position, msg in enumerate(batch):
                    await (msg.nak(delay=1.0) if position in held else msg.ack())
        finally:
            await sub.unsubscribe()

    async def _ack(self, batch: list[Msg], stats: BatchStats) -> None:
        for msg in batch:
            await msg.ack()
        self.events_written += stats.written
        self.events_duplicate += stats.duplicates
        last = batch[-1].metadata.sequence.stream
        async with self._progress:
            self._acked_upto = max(self._acked_upto, last)
            self._progress.notify_all()


def _catalog(store: LogStore) -> str:
    cursor = store.index.cursor()
    try:
        return catalog_of(cursor)
    finally:
        cursor.close()


# The durable consumer of webhook attempts (stream WEBHOOKS).
ATTEMPTS_CONSUMER = "logsink-webhooks"
# The log sink's lease, in the bucket of leases that the balancer's is in.
LEASE_KEY = "logsink"


async def run_logsink(
    settings: Settings,
    stop: asyncio.Event,
    *,
    nc: Client | None = None,
    config: SinkConfig | None = None,
) -> None:
    """Run the log sink until `stop` is set (what `comfyautomate logsink` and `up` call).

    Exactly one sink consumes a system's events: this one runs while it holds the log sink's
    lease, and a second one waits as a standby until the lease is free (its holder stopped or
    died), so that two sinks never split the stream between two sets of files. Uses `nc`
    when given (`up` shares its connection), else connects to settings.nats_url.
    """
    subjects = Subjects(settings.subject_prefix)
    if settings.logs_retention_s > 0:
        config = msgspec.structs.replace(
            config or SinkConfig(), retention_s=settings.logs_retention_s
        )
    own = nc is None
    client = nc if nc is not None else await _connect(settings)
    try:
        sizing = resources_for(client, settings.nats_replicas)
        await through_election(
            lambda: ensure_resources(client.jetstream(), subjects, sizing),
            "creating the streams and buckets",
        )
        leases = await client.jetstream().key_value(subjects.balancer_bucket)

        async def sink() -> None:
            async with LogSink(client, subjects, settings.data_path, config) as running:
                await running.wait(stop)

        if await lease_held(client.jetstream(), subjects.balancer_bucket, LEASE_KEY):
            log.warning("another log sink holds the lease: standing by until it stops")
        holder = f"logsink-{socket.gethostname()}-{os.getpid()}-{new_id()[:8]}"
        await hold_lease(leases, holder, sink, stop, key=LEASE_KEY, drain_s=60.0)
    finally:
        if own:
            await client.drain()


async def _connect(settings: Settings) -> Client:
    options = {}
    if settings.nats_user:
        options = {"user": settings.nats_user, "password": settings.nats_password or ""}
    return await connect(settings.nats_url, "logsink", **options)
