"""Where each job stands in an event stream read in order: its server, its attempt, its times.

Events name their server and attempt only where their writer knew them (a `cancelled` from the
gateway names neither, a balancer's `failed` no server); a reader of the whole stream (the
metrics counter, a fleet event stream) keeps what earlier events said, so each event can be
told whole. The table is bounded: jobs whose end never comes (their end was before the reader
started, or is yet to come) are forgotten oldest first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

import msgspec

from gateway.bus.contract import (
    TERMINAL_EVENTS,
    Dispatched,
    Event,
    NodeCached,
    NodeOutput,
    NodeProgress,
    NodeStarted,
    Queued,
    Retried,
    Running,
)

# Signs that ComfyUI works on the prompt: the first of them is a job's "first event".
WORK_EVENTS: Final = (NodeStarted, NodeProgress, NodeCached, NodeOutput)
DEFAULT_LIMIT: Final = 20_000


class Trail(msgspec.Struct, kw_only=True):
    """What the events read so far say about one job (None: not told yet)."""

    server_id: str | None = None
    attempt: int | None = None
    submitted_at: float | None = None
    waiting_since: float | None = None  # its `queued`, or the `retried` that put it back
    running_since: float | None = None
    worked: bool = False  # a node event came


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One event read: the job's trail before it, and the server and attempt it concerns.

    `stale` marks a `running` or `retried` of an attempt the job has gone past (a server
    thought dead reporting late): it changes nothing, as it changes nothing in the record.
    """

    before: Trail
    server_id: str | None
    attempt: int | None
    stale: bool = False


class Trails:
    """The trails of the jobs a reader follows, at most `limit` of them."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self._limit = limit
        self._trails: OrderedDict[str, Trail] = OrderedDict()

    def __len__(self) -> int:
        return len(self._trails)

    def step(self, event: Event) -> Step:
        """Read `event`: what the job's trail was, and what the event concerns."""
        trail = self._trails.pop(event.job_id, None) or Trail()
        before = msgspec.structs.replace(trail)
        step = _apply(trail, event)
        if not isinstance(event, TERMINAL_EVENTS):
            self._trails[event.job_id] = trail
            while len(self._trails) > self._limit:
                self._trails.popitem(last=False)
        return Step(before=before, server_id=step.server_id, attempt=step.attempt, stale=step.stale)


class _Applied(msgspec.Struct, frozen=True):
    server_id: str | None
    attempt: int | None
    stale: bool = False


def _apply(trail: Trail, event: Event) -> _Applied:
    """Move `trail` by `event`; the server and attempt the event concerns."""
    server = event.server_id or trail.server_id
    match event:
        case Queued():
            trail.submitted_at = trail.waiting_since = event.ts
            return _Applied(None, None)
        case Dispatched(data=data):
            trail.server_id, trail.attempt = data.server_id, data.attempt
            return _Applied(data.server_id, data.attempt)
        case Running(data=data):
            if trail.attempt is not None and data.attempt < trail.attempt:
                return _Applied(server, data.attempt, stale=True)
            trail.server_id, trail.attempt = server, data.attempt
            trail.running_since, trail.waiting_since = event.ts, None
            return _Applied(server, data.attempt)
        case Retried(data=data):
            if trail.attempt is not None and data.attempt < trail.attempt:
                return _Applied(server, data.attempt, stale=True)
            # Back in the queue, on no server until the next dispatch.
            server = data.previous_server_id or server
            trail.server_id, trail.attempt = None, data.attempt
            trail.waiting_since, trail.running_since = event.ts, None
            return _Applied(server, data.attempt)
        case _ if isinstance(event, WORK_EVENTS):
            trail.server_id = server
            trail.worked = True
            return _Applied(server, trail.attempt)
        case _ if isinstance(event, TERMINAL_EVENTS):
            # An end written without its attempt (the gateway's cancel) says 0.
            return _Applied(server, event.data.attempt or trail.attempt)
    return _Applied(server, trail.attempt)
