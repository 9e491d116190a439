"""The leader's latest Backlog as one process sees it: read at start, then followed live.

A plain subscription to the KV key's subject, not a watcher (a JetStream consumer per process):
the leader writes the key every second, so an update missed during a reconnection is made up
for within one. When no leader writes, the last figures stay: the queue does not drain then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError

from gateway.balancer.backlog import backlog_subject
from gateway.bus.contract import Backlog, ContractError, Subjects, decode

log = logging.getLogger(__name__)


class BacklogView:
    """The newest Backlog heard of (None before any), and when it was heard (monotonic)."""

    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self._nc = nc
        self._subjects = subjects
        self._subject = backlog_subject(subjects.balancer_bucket)
        self._sub: Subscription | None = None
        self.latest: Backlog | None = None
        self.heard_at = 0.0
        self._listeners: list[Callable[[Backlog], None]] = []

    def on_backlog(self, listener: Callable[[Backlog], None]) -> None:
        """Call `listener` with each newer Backlog."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Follow the key, then read its value: nothing written in between is missed."""
        self._sub = await self._nc.subscribe(self._subject, cb=self._on_message)
        try:
            raw = await self._nc.jetstream().get_last_msg(
                f"KV_{self._subjects.balancer_bucket}", self._subject
            )
        except NotFoundError:
            return  # no leader has written one (or not for 5 s)
        except (NatsError, TimeoutError) as exc:
            log.warning("cannot read the queue's backlog now (%s): the next write brings it", exc)
            return
        if raw.data:
            self._take(raw.data)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_message(self, msg: Msg) -> None:
        if msg.data:  # a delete or purge marker has none
            self._take(msg.data)

    def _take(self, data: bytes) -> None:
        try:
            backlog = decode(data, Backlog)
        except ContractError as exc:
            log.warning("ignoring a backlog that does not decode: %s", exc)
            return
        latest = self.latest
        # Only the start's read can bring an older one than heard; older by both marks, since
        # two leaders' clocks may disagree.
        if (
            latest is not None
            and backlog.at < latest.at
            and backlog.applied_seq <= latest.applied_seq
        ):
            return
        self.latest, self.heard_at = backlog, time.monotonic()
        for listener in self._listeners:
            listener(backlog)
