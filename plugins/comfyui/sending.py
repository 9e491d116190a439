"""Publishing one job's events from its adapter: progress without waiting, ends after it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.bus.contract import Event, EventData, now
from gateway.bus.events import EventPublisher, JobEnded


class JobEvents:
    """The events of one attempt, in the order they were emitted."""

    def __init__(
        self, publisher: EventPublisher, job_id: str, on_ended: Callable[[Event], None]
    ) -> None:
        self._publisher = publisher
        self._job_id = job_id
        self._on_ended = on_ended  # told once when the job's log turns out to have ended
        # Progress events on their way to the stream (see soon).
        self._sending: set[asyncio.Task[Event]] = set()
        self._failed: BaseException | None = None  # the first progress event lost

    def soon(self, data: EventData) -> None:
        """Publish a progress event without waiting for the broker's ack.

        Following the prompt and fetching its outputs go on meanwhile instead of waiting a
        round trip per event. Order is kept: the publisher stores one job's emits in the
        order they were called. The next `emit` waits for these first and raises what
        failed, so a job never ends in the log before its progress. The event is stamped
        now, when it happened, not when its turn to be stored comes: node timings in the
        log and the balancer's speed estimates read these stamps.
        """
        if self._failed is not None:
            return  # the run is failing: nothing goes out after a lost event
        task = asyncio.create_task(
            self._publisher.emit(self._job_id, data, ts=now()),
            name=f"event-{self._job_id}",
        )
        self._sending.add(task)
        task.add_done_callback(self._on_sent)

    def _on_sent(self, task: asyncio.Task[Event]) -> None:
        self._sending.discard(task)
        if task.cancelled() or self._failed is not None:
            return
        failed = task.exception()
        if failed is not None:
            self._failed = failed
            # Events after a lost one must not be stored: the log would skip a step.
            for later in self._sending:
                later.cancel()
            if isinstance(failed, JobEnded):
                self._on_ended(failed.end)

    async def sent(self) -> None:
        """Wait until the progress events emitted so far are stored; raise what failed."""
        if self._sending:
            # Each task's own callback (_on_sent) runs before `wait` returns.
            await asyncio.wait(set(self._sending))
        if self._failed is not None:
            raise self._failed

    async def emit(self, data: EventData) -> None:
        """Publish an event once every earlier one is stored."""
        await self.sent()
        await self._publisher.emit(self._job_id, data)

    def cancel(self) -> None:
        """Stop sending what is still on its way (the run is over)."""
        for sending in list(self._sending):
            sending.cancel()
