"""The durable pull consumer of every event, with requests kept ahead of the writer.

nats-py's `fetch` waits on each message with its own timeout, which caps it near 30k events/s
here; this keeps `prefetch` events requested at all times instead (as nats.go's Consume does),
so events stream into a buffer while the writer thread stores the previous batch, and hands out
batches of up to `batch_size`, lingering `linger_s` after the first event for more to arrive.
Events are acknowledged one by one (AckExplicit), and only after they are stored: with AckAll
a restarted sink acknowledging new events would also acknowledge those its predecessor had
received but not stored.

The consumer is made anew at each start, from just after the position the index records
(store.py): so events come in stream order from there, none left pending by a sink that died
and held back until its acknowledgement wait runs out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from gateway.bus.contract import Subjects
from gateway.bus.retry import through_election
from gateway.logsink.config import SinkConfig

log = logging.getLogger(__name__)

_STATUS: Final = "Status"
_HEARTBEAT: Final = "100"
_NO_LEADER: Final = "503"
_encoder: Final = msgspec.json.Encoder()


def consumer_config(subjects: Subjects, config: SinkConfig, after: int = 0) -> api.ConsumerConfig:
    """The sink's durable consumer: every event after stream sequence `after`, explicit acks,
    no expiry."""
    return api.ConsumerConfig(
        durable_name=config.durable,
        description="ComfyAutomate log sink: every event into JSONL files and the DuckDB index",
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if after else api.DeliverPolicy.ALL,
        opt_start_seq=after + 1 if after else None,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=config.ack_wait_s,
        max_deliver=-1,
        filter_subject=subjects.all_events,
        max_ack_pending=max(4 * config.prefetch, 4 * config.batch_size),
    )


class EventPuller:
    """Receives the consumer's events into a buffer and hands them out in batches."""

    def __init__(
        self, nc: Client, js: JetStreamContext, subjects: Subjects, config: SinkConfig
    ) -> None:
        self._nc = nc
        self._js = js
        self._subjects = subjects
        self._config = config
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{subjects.events_stream}.{config.durable}"
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._buffer: list[Msg] = []
        self._want = 1
        self._wake = asyncio.Event()
        # Open pull requests, oldest first: [expiry (monotonic), events still to come].
        self._requests: collections.deque[list[float]] = collections.deque()
        self._leaderless = False  # the last pull request was answered "no leader" (503)

    async def start(self, after: int) -> None:
        """Make the durable consumer anew, from just after stream sequence `after`, and start
        receiving."""
        stream = self._subjects.events_stream
        config = consumer_config(self._subjects, self._config, after)

        async def make() -> None:
            with contextlib.suppress(NotFoundError):
                await self._js.delete_consumer(stream, self._config.durable)
            await self._js.add_consumer(stream, config)

        await through_election(make, "creating the log sink's consumer")
        self._sub = await self._nc.subscribe(
            self._inbox,
            cb=self._on_message,
            pending_msgs_limit=4 * max(self._config.prefetch, self._config.batch_size),
            pending_bytes_limit=-1,
        )

    async def stop(self) -> list[Msg]:
        """Stop receiving; return what arrived but was not handed out yet."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        rest, self._buffer = self._buffer, []
        return rest

    async def _on_message(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and _STATUS in headers and not msg.data:
            self._on_status(headers)
            return
        self._leaderless = False
        self._buffer.append(msg)
        requests = self._requests
        if requests:
            requests[0][1] -= 1
            if requests[0][1] <= 0:
                requests.popleft()
        if len(self._buffer) >= self._want:
            self._wake.set()

    def _on_status(self, headers: dict[str, str]) -> None:
        code = headers.get(_STATUS)
        if code == _HEARTBEAT:
            return
        # 404/408: a request ended (no messages, or expired); 409: the server cut it short.
        if self._requests:
            self._requests.popleft()
        if code == _NO_LEADER:
            # The consumer is electing a leader (a broker node was lost): asking again at once
            # would spin. The loop asks again when its wait for events times out.
            if not self._leaderless:
                log.warning("event consumer: no leader now; asking again shortly")
            self._leaderless = True
            return
        self._leaderless = False
        if code not in ("404", "408"):
            log.warning(
                "event consumer: pull request ended with %s %s", code, headers.get("Description")
            )
        self._wake.set()

    async def _top_up(self) -> None:
        now = time.monotonic()
        while self._requests and self._requests[0][0] <= now:
            self._requests.popleft()
        outstanding = sum(int(remaining) for _, remaining in self._requests)
        outstanding += len(self._buffer)
        if outstanding > self._config.prefetch // 2:
            return
        batch = self._config.prefetch - outstanding
        expires = self._config.pull_expires_s
        request: dict[str, Any] = {"batch": batch, "expires": int(expires * 1e9)}
        await self._nc.publish(self._next, _encoder.encode(request), reply=self._inbox)
        # The server says when a request expires (408); the grace covers a notice lost to a
        # reconnect, after which the request is forgotten and a new one sent.
        self._requests.append([now + expires + 0.5, float(batch)])

    async def _wait(self, want: int, within: float) -> None:
        self._want = want
        if len(self._buffer) >= want:
            return
        self._wake.clear()
        try:
            async with asyncio.timeout(within):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def next_batch(self, stop: asyncio.Event) -> list[Msg]:
        """The next batch of events; an empty list once `stop` is set (or while none came)."""
        waker = asyncio.ensure_future(stop.wait())
        waker.add_done_callback(lambda _: self._wake.set())
        try:
            while not stop.is_set():
                await self._top_up()
                await self._wait(1, self._config.pull_expires_s / 2)
                if self._buffer:
                    await self._wait(self._config.batch_size, self._config.linger_s)
                    batch = self._buffer[: self._config.batch_size]
                    del self._buffer[: self._config.batch_size]
                    return batch
            return []
        finally:
            waker.cancel()
