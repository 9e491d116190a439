"""The leader's two indexes of open jobs: the pending ones in order, the bound ones per server."""

from __future__ import annotations

import heapq
import itertools

from gateway.bus.contract import JobRecord
from gateway.bus.jobstate import BOUND


class PendingQueue:
    """Pending jobs by priority (higher first), then age (older first).

    Removal is lazy: a heap entry counts only while it is its job's latest push, so a job
    discarded and pushed again (handed back) is never listed twice.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, str]] = []
        self._live: dict[str, int] = {}  # job id -> the token of its current heap entry
        self._pushes = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._live

    def push(self, record: JobRecord) -> None:
        if record.job_id not in self._live:
            token = next(self._pushes)
            self._live[record.job_id] = token
            entry = (-record.priority, record.submitted_at, token, record.job_id)
            heapq.heappush(self._heap, entry)

    def discard(self, job_id: str) -> None:
        self._live.pop(job_id, None)  # its heap entry is skipped lazily

    def _current(self, entry: tuple[int, float, int, str]) -> bool:
        return self._live.get(entry[3]) == entry[2]

    def head(self, n: int) -> list[str]:
        """The first `n` pending job ids in order, without removing them."""
        if len(self._heap) > 4 * len(self._live) + 64:
            self._heap = [entry for entry in self._heap if self._current(entry)]
            heapq.heapify(self._heap)
        # Popped and pushed back: n log N, where nsmallest would look at every waiting job.
        first: list[tuple[int, float, int, str]] = []
        while self._heap and len(first) < n:
            entry = heapq.heappop(self._heap)
            if self._current(entry):
                first.append(entry)
        for entry in first:
            heapq.heappush(self._heap, entry)
        return [entry[3] for entry in first]


class BoundJobs:
    """Which jobs each server holds (dispatched or running), kept up as records change.

    A dispatch round asks how many jobs each server holds, and which, many times a second;
    counting over every record would make it cost every job waiting in the queue.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, set[str]] = {}

    def change(self, before: JobRecord | None, after: JobRecord | None) -> None:
        """A job's record went from `before` to `after` (None: unknown, forgotten)."""
        if before is not None and before.server_id is not None:
            jobs = self._jobs.get(before.server_id)
            if jobs is not None:
                jobs.discard(before.job_id)
                if not jobs:
                    del self._jobs[before.server_id]
        if after is not None and after.status in BOUND and after.server_id is not None:
            self._jobs.setdefault(after.server_id, set()).add(after.job_id)

    def count(self, server_id: str) -> int:
        return len(self._jobs.get(server_id, ()))

    def of(self, server_id: str) -> list[str]:
        """The ids of the jobs the server holds."""
        return list(self._jobs.get(server_id, ()))

    def pairs(self) -> list[tuple[str, str]]:
        """(server id, job id) of every bound job, as a list: callers change records."""
        return [(server_id, job_id) for server_id, jobs in self._jobs.items() for job_id in jobs]
