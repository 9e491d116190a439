"""The leader tells every balancer and gateway how long the queue is, caller by caller.

The submit path runs on every balancer replica, and gateways answer why a job waits, but only
the leader knows the queue. So the leader writes a `Backlog` (pending and bound jobs per caller,
how fast jobs end) to KV `comfy_balancer` under `backlog`: a few times a second while it changes,
and every second regardless, so a reader can tell a live figure from the last one of a leader
that stopped (the bucket's keys expire 5 s after their last write).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

import nats.errors

from gateway.balancer.lead import Lead
from gateway.bus.contract import BACKLOG_KEY, encode

log = logging.getLogger(__name__)

# At most this often while the queue changes (each write is one KV put, replicated).
MIN_INTERVAL_S: Final = 0.25
# At least this often: readers see the leader's figures are current.
MAX_INTERVAL_S: Final = 1.0


class BacklogWriter:
    """Writes the leader's Backlog when it changed, not more often than MIN_INTERVAL_S.

    A task of its own beside the dispatch loop: a write waiting out an election never holds
    up a binding.
    """

    def __init__(self, lead: Lead, consumer: str) -> None:
        self._lead = lead
        self._consumer = consumer
        self._subject = backlog_subject(lead.subjects.balancer_bucket)
        self._last: tuple[int, int, int, tuple[tuple[str, int, int], ...]] | None = None
        self._last_at = -MAX_INTERVAL_S

    async def run(self) -> None:
        """Write while leading (until cancelled)."""
        while True:
            await self.write()
            await asyncio.sleep(MIN_INTERVAL_S)  # the pace of the writes

    async def write(self) -> None:
        """Write the backlog if it is due; a failure is logged and tried again next time."""
        moment = time.monotonic()
        if moment - self._last_at < MIN_INTERVAL_S:
            return
        try:
            # Read first: every event up to the floor is applied, so the counts taken after
            # hold each of them; a submitter stops counting its own jobs up to it.
            info = await self._lead.js.consumer_info(
                self._lead.subjects.events_stream, self._consumer
            )
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("cannot read how far the events are applied: %s", exc)
            return
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        backlog = self._lead.book.backlog(applied_seq=floor)
        shape = (
            floor,
            backlog.pending,
            backlog.bound,
            tuple((c.caller, c.pending, c.bound) for c in backlog.callers),
        )
        if shape == self._last and moment - self._last_at < MAX_INTERVAL_S:
            return
        try:
            await self._lead.js.publish(self._subject, encode(backlog), timeout=2.0)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("cannot write the backlog: %s", exc)
            return
        self._last, self._last_at = shape, moment


def backlog_subject(bucket: str) -> str:
    """The subject a Backlog is written on (its KV key's), for readers that follow it."""
    return f"$KV.{bucket}.{BACKLOG_KEY}"
