"""The leader's index of open jobs pinned to a server, by server.

A removed server dooms the jobs waiting for it. Looking them up here each dispatch round costs
the servers jobs are pinned to, not every open job, so the rule can be checked every round
rather than once per removal: a job that reaches the queue after the removal was noticed (a late
`queued` event, a record adopted later, a hand-back) is found all the same.
"""

from __future__ import annotations


class PinnedJobs:
    """Which open jobs are pinned to each server (whatever their status)."""

    def __init__(self) -> None:
        self._jobs: dict[str, set[str]] = {}
        self._server_of: dict[str, str] = {}

    def add(self, server_id: str, job_id: str) -> None:
        self._server_of[job_id] = server_id
        self._jobs.setdefault(server_id, set()).add(job_id)

    def forget(self, job_id: str) -> None:
        """Drop a job that ended (or is not held any more)."""
        server_id = self._server_of.pop(job_id, None)
        if server_id is None:
            return
        jobs = self._jobs[server_id]
        jobs.discard(job_id)
        if not jobs:
            del self._jobs[server_id]

    def servers(self) -> list[str]:
        """The servers some open job is pinned to."""
        return list(self._jobs)

    def of(self, server_id: str) -> list[str]:
        """The ids of the open jobs pinned to the server, as a list: callers change records."""
        return list(self._jobs.get(server_id, ()))
