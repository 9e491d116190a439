"""Bounds on the pending queue, checked on the submit path of every balancer replica.

Only the leader knows the queue; it writes its Backlog (jobs waiting per caller, how fast jobs
end) a few times a second. A replica adds to it what it admitted itself that the Backlog does not
count yet (by the EVENTS sequence of the job's `queued` event against the Backlog's
`applied_seq`), and what it is admitting right now. So a replica never lets a caller past its
bound by its own admissions, whatever the leader is doing; several replicas admitting at once
can each fill what the last Backlog left free, so a caller may briefly have up to that much more
per replica (in practice what the others admitted within the last quarter second).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Final

import msgspec

from gateway.balancer.requestchecks import Refused
from gateway.balancer.shares import Shares
from gateway.bus.contract import Backlog

# Retry-After bounds: never sooner than a second, never later than a minute (a client that
# comes back then gets a fresh estimate).
RETRY_FLOOR_S: Final = 1
RETRY_CEILING_S: Final = 60
# An admission the Backlog has not counted after this long is taken to be in it (the leader's
# floor can stall behind one event that fails to apply).
_OWN_HORIZON_S: Final = 30.0


class QueueFull(Refused):
    """429 `queue_full`: the caller's (or everyone's) waiting jobs are at their bound."""

    def __init__(self, message: str, retry_after: int, details: dict[str, object]) -> None:
        super().__init__("queue_full", message, {"retry_after_s": retry_after, **details})
        self.retry_after = retry_after


def retry_after(excess: int, per_s: float) -> int:
    """Seconds until `excess` jobs have left the queue at `per_s` a second, within bounds."""
    if per_s <= 0:
        return RETRY_CEILING_S
    return int(min(RETRY_CEILING_S, max(RETRY_FLOOR_S, math.ceil(excess / per_s))))


def check_room(
    shares: Shares,
    backlog: Backlog | None,
    caller: str,
    jobs: int,
    *,
    more_of_caller: int = 0,
    more_in_all: int = 0,
) -> None:
    """Raise QueueFull unless `jobs` more of the caller's may wait.

    `more_of_caller` and `more_in_all`: jobs admitted that `backlog` does not count yet.
    """
    listed = None
    if backlog is not None:
        listed = next((c for c in backlog.callers if c.caller == caller), None)
    limit = shares.max_pending_per_caller
    if limit:
        if listed is not None:
            waiting = listed.pending
        else:
            waiting = backlog.unlisted_pending if backlog is not None else 0
        waiting += more_of_caller
        if waiting + jobs > limit:
            cap = shares.cap(caller)
            at_cap = listed is not None and cap is not None and listed.bound >= cap
            # At its cap, its jobs leave the queue as fast as its own end; else as the fleet's.
            if listed is not None and at_cap:
                rate = listed.ended_per_s
            else:
                rate = backlog.ended_per_s if backlog is not None else 0.0
            wait = retry_after(waiting + jobs - limit, rate)
            raise QueueFull(
                f"this caller has {waiting} jobs waiting, the most it may "
                f"(max_pending_per_caller {limit}); retry in {wait} s",
                wait,
                {"reason": "max_pending_per_caller", "pending": waiting, "limit": limit},
            )
    limit = shares.max_pending
    if limit:
        waiting = (backlog.pending if backlog is not None else 0) + more_in_all
        if waiting + jobs > limit:
            wait = retry_after(waiting + jobs - limit, backlog.ended_per_s if backlog else 0.0)
            raise QueueFull(
                f"{waiting} jobs are waiting, the most the queue holds (max_pending {limit}); "
                f"retry in {wait} s",
                wait,
                {"reason": "max_pending", "pending": waiting, "limit": limit},
            )


class _Own(msgspec.Struct, frozen=True):
    caller: str
    jobs: int
    seq: int  # of the queued event; 0 when not known
    at: float  # monotonic


class Ticket:
    """Room held for jobs being admitted: `admitted` once made, else `release`."""

    def __init__(self, admission: Admission | None, caller: str, jobs: int) -> None:
        self._admission = admission  # None: nothing is counted
        self.caller = caller
        self.jobs = jobs

    def admitted(self, seq: int) -> None:
        """The jobs are made; the last `queued` event is at EVENTS sequence `seq` (0: unknown)."""
        if self._admission is not None:
            self._admission.made(self, seq)
            self._admission = None

    def release(self) -> None:
        """Nothing was made (refused, failed, or an existing job answered)."""
        if self._admission is not None:
            self._admission.unreserve(self)
            self._admission = None


class Admission:
    """This replica's check of the queue's bounds: the leader's Backlog, plus its own jobs.

    `latest` gives the newest Backlog heard (None before any); `on_backlog` is to be called
    with each one as it comes (gateway/balancer/backlogview.py does both).
    """

    def __init__(
        self,
        shares: Shares,
        latest: Callable[[], Backlog | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._shares = shares
        self._latest = latest
        self._clock = clock
        # Admitted here and not yet counted by the Backlog, listed and summed per caller.
        self._own: list[_Own] = []
        self._own_count: Counter[str] = Counter()
        self._reserved: Counter[str] = Counter()  # being admitted now

    def reserve(self, caller: str, jobs: int = 1) -> Ticket:
        """Hold room for `jobs` of the caller's jobs, or raise QueueFull."""
        if not self._shares.bounded:
            return Ticket(None, caller, jobs)
        check_room(
            self._shares,
            self._latest(),
            caller,
            jobs,
            more_of_caller=self._own_count[caller] + self._reserved[caller],
            more_in_all=self._own_count.total() + self._reserved.total(),
        )
        self._reserved[caller] += jobs
        return Ticket(self, caller, jobs)

    def made(self, ticket: Ticket, seq: int) -> None:
        self.unreserve(ticket)
        self._own.append(_Own(ticket.caller, ticket.jobs, seq, self._clock()))
        self._own_count[ticket.caller] += ticket.jobs

    def unreserve(self, ticket: Ticket) -> None:
        self._reserved[ticket.caller] -= ticket.jobs
        if self._reserved[ticket.caller] <= 0:
            del self._reserved[ticket.caller]

    def on_backlog(self, backlog: Backlog) -> None:
        """A new Backlog: forget the jobs of ours it counts."""
        heard = self._clock()
        self._own = [
            o
            for o in self._own
            if (o.seq == 0 or o.seq > backlog.applied_seq) and heard - o.at < _OWN_HORIZON_S
        ]
        self._own_count = Counter()
        for o in self._own:
            self._own_count[o.caller] += o.jobs
