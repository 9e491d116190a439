"""The leader's two indexes of open jobs: the pending ones in order, the bound ones per server."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

from gateway.balancer.shares import Shares, caller_key
from gateway.bus.contract import JobRecord
from gateway.bus.jobstate import BOUND

# A job in its caller's heap: (-priority, submitted_at, push token, job id).
_Entry = tuple[int, float, int, str]


class _Caller:
    """One caller's waiting jobs, and its virtual start tag (its share of the bindings so far)."""

    __slots__ = ("heap", "live", "tag")

    def __init__(self) -> None:
        self.heap: list[_Entry] = []
        self.live = 0
        # Never bound a job (that this leader knows of): owed one, as far as the clock allows.
        self.tag = -math.inf


class PendingQueue:
    """Pending jobs: each caller's by priority (higher first), then age (older first); callers
    interleaved by weighted fair queuing.

    Across callers the order is by virtual finish tag (start-time fair queuing): each binding of
    a caller's job moves its tag on by 1/weight, and the queue's clock follows the tags of the
    jobs bound. A caller's tag is never below the clock by more than 1/weight: one that was idle,
    new, or whose jobs could not be placed while others' were, is owed at most one job, not the
    time it missed. So a caller's next job has at most 1 + w_other/w_own jobs of each other
    caller ahead of it, however many they queued, and every caller progresses, the lightest too.
    A caller's tag is kept while it is idle until the clock has passed it, so that emptying its
    queue and coming back at once earns it nothing.

    Removal is lazy: a heap entry counts only while it is its job's latest push, so a job
    discarded and pushed again (handed back) is never listed twice.
    """

    def __init__(self, shares: Shares | None = None) -> None:
        self.shares = shares or Shares()
        self._callers: dict[str, _Caller] = {}
        self._live: dict[str, tuple[int, str]] = {}  # job id -> (token of its entry, caller)
        self._pushes = itertools.count()
        self._clock = 0.0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._live

    def push(self, record: JobRecord) -> None:
        if record.job_id in self._live:
            return
        caller = caller_key(record.caller)
        state = self._callers.get(caller)
        if state is None:
            state = self._callers[caller] = _Caller()
        token = next(self._pushes)
        self._live[record.job_id] = (token, caller)
        heapq.heappush(state.heap, (-record.priority, record.submitted_at, token, record.job_id))
        state.live += 1

    def discard(self, job_id: str) -> None:
        """Take a job out without counting it as its caller's (cancelled, failed, ended)."""
        live = self._live.pop(job_id, None)
        if live is None:
            return
        state = self._callers[live[1]]
        state.live -= 1
        if not state.live:
            state.heap.clear()  # its tag stays (see `_prune`)
        elif len(state.heap) > 4 * state.live + 64:
            state.heap = [entry for entry in state.heap if self._current(entry)]
            heapq.heapify(state.heap)

    def bound(self, job_id: str) -> None:
        """Take a job out as bound to a server: its caller's share moves on by one job."""
        live = self._live.get(job_id)
        if live is None:
            return
        state = self._callers[live[1]]
        step = 1.0 / self.shares.weight(live[1])
        state.tag = max(state.tag, self._clock - step) + step
        self._clock = max(self._clock, state.tag)
        self.discard(job_id)

    def pending(self) -> dict[str, int]:
        """How many jobs each caller has waiting."""
        return {caller: state.live for caller, state in self._callers.items() if state.live}

    def _prune(self) -> None:
        """Forget idle callers whose tag the clock has passed: they are owed one job anyway."""
        gone = [
            caller
            for caller, state in self._callers.items()
            if not state.live and state.tag <= self._clock - 1.0 / self.shares.weight(caller)
        ]
        for caller in gone:
            del self._callers[caller]

    def _current(self, entry: _Entry) -> bool:
        live = self._live.get(entry[3])
        return live is not None and live[0] == entry[2]

    def _next(self, state: _Caller) -> _Entry | None:
        """Pop the caller's first current entry (stale ones are dropped on the way)."""
        while state.heap:
            entry = heapq.heappop(state.heap)
            if self._current(entry):
                return entry
        return None

    def head(self, n: int, room: Callable[[str], int | None] | None = None) -> list[str]:
        """The first `n` pending job ids in order, without removing them.

        `room(caller)` is how many more of a caller's jobs may be bound now (None: no limit):
        a caller at its cap is left out, and one with room for k shows at most k jobs, so that
        neither its jobs nor its place keep others' jobs out of a dispatch round's view.
        """
        self._prune()
        # Per caller: (finish tag of its next job, that job's age, caller), merged by a heap.
        fronts: list[tuple[float, float, str]] = []
        taken: dict[str, list[_Entry]] = {}
        starts: dict[str, tuple[float, float, int | None]] = {}
        for caller, state in self._callers.items():
            left = room(caller) if room is not None else None
            if left is not None and left <= 0:
                continue
            first = self._next(state)
            if first is None:
                continue
            step = 1.0 / self.shares.weight(caller)
            start = max(state.tag, self._clock - step)
            taken[caller] = [first]
            starts[caller] = (start, step, left)
            fronts.append((start + step, first[1], caller))
        heapq.heapify(fronts)
        order: list[str] = []
        # Popped and pushed back: n log N, where sorting would look at every waiting job.
        while fronts and len(order) < n:
            _, _, caller = heapq.heappop(fronts)
            entries = taken[caller]
            order.append(entries[-1][3])
            start, step, left = starts[caller]
            if left is not None and len(entries) >= left:
                continue
            following = self._next(self._callers[caller])
            if following is not None:
                entries.append(following)
                heapq.heappush(fronts, (start + step * len(entries), following[1], caller))
        for caller, entries in taken.items():
            heap = self._callers[caller].heap
            for entry in entries:
                heapq.heappush(heap, entry)
        return order


class BoundJobs:
    """Which jobs each server holds (dispatched or running), kept up as records change.

    A dispatch round asks how many jobs each server holds, and which, many times a second;
    counting over every record would make it cost every job waiting in the queue.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, set[str]] = {}
        self._of_caller: dict[str, set[str]] = {}  # the same jobs by caller, for their caps

    def change(self, before: JobRecord | None, after: JobRecord | None) -> None:
        """A job's record went from `before` to `after` (None: unknown, forgotten)."""
        if before is not None:
            if before.server_id is not None:
                _drop(self._jobs, before.server_id, before.job_id)
            _drop(self._of_caller, caller_key(before.caller), before.job_id)
        if after is not None and after.status in BOUND and after.server_id is not None:
            self._jobs.setdefault(after.server_id, set()).add(after.job_id)
            self._of_caller.setdefault(caller_key(after.caller), set()).add(after.job_id)

    def count(self, server_id: str) -> int:
        return len(self._jobs.get(server_id, ()))

    def of_caller(self, caller: str) -> int:
        """How many of the caller's jobs are bound (dispatched or running)."""
        return len(self._of_caller.get(caller, ()))

    def callers(self) -> dict[str, int]:
        """How many jobs each caller has bound."""
        return {caller: len(jobs) for caller, jobs in self._of_caller.items()}

    def of(self, server_id: str) -> list[str]:
        """The ids of the jobs the server holds."""
        return list(self._jobs.get(server_id, ()))

    def pairs(self) -> list[tuple[str, str]]:
        """(server id, job id) of every bound job, as a list: callers change records."""
        return [(server_id, job_id) for server_id, jobs in self._jobs.items() for job_id in jobs]


def _drop(index: dict[str, set[str]], key: str, job_id: str) -> None:
    jobs = index.get(key)
    if jobs is not None:
        jobs.discard(job_id)
        if not jobs:
            del index[key]
