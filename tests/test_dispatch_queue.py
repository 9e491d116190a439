"""The queue of pending jobs and the index of bound jobs (gateway/balancer/queue.py)."""

from __future__ import annotations

import msgspec

from gateway.balancer.queue import BoundJobs, PendingQueue
from gateway.bus.contract import JobRecord, JobStatus


def record(job_id: str, submitted_at: float, priority: int = 0) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        status=JobStatus.QUEUED,
        submitted_at=submitted_at,
        updated_at=submitted_at,
        log_file_path="",
        priority=priority,
    )


def test_priority_first_then_age() -> None:
    queue = PendingQueue()
    for job in (record("old", 1.0), record("new", 2.0), record("urgent", 3.0, priority=1)):
        queue.push(job)
    assert queue.head(10) == ["urgent", "old", "new"]


def test_a_job_handed_back_is_listed_once() -> None:
    queue = PendingQueue()
    queue.push(record("a", 1.0))
    queue.push(record("b", 2.0))
    for _ in range(3):  # bound, then handed back: discarded and pushed again
        queue.discard("a")
        queue.push(record("a", 1.0))
    assert queue.head(10) == ["a", "b"]
    assert len(queue) == 2
    queue.discard("a")
    assert queue.head(10) == ["b"] and "a" not in queue


def test_head_lists_the_first_jobs_and_keeps_the_rest() -> None:
    queue = PendingQueue()
    for k in range(100):
        queue.push(record(f"j{k:03}", float(k)))
    for k in range(0, 100, 2):
        queue.discard(f"j{k:03}")  # leaves stale heap entries behind
    first = queue.head(5)
    assert first == ["j001", "j003", "j005", "j007", "j009"]
    assert queue.head(5) == first  # looking does not take
    assert len(queue.head(1000)) == len(queue) == 50


def _bound_to(job_id: str, server_id: str | None, status: JobStatus) -> JobRecord:
    return msgspec.structs.replace(record(job_id, 1.0), server_id=server_id, status=status)


def test_bound_jobs_follow_their_records() -> None:
    bound = BoundJobs()
    queued = record("a", 1.0)
    on_s1 = _bound_to("a", "s1", JobStatus.DISPATCHED)
    running = _bound_to("a", "s1", JobStatus.RUNNING)
    bound.change(None, queued)
    assert bound.count("s1") == 0
    bound.change(queued, on_s1)
    bound.change(on_s1, running)
    bound.change(None, _bound_to("b", "s1", JobStatus.DISPATCHED))
    assert bound.count("s1") == 2
    assert sorted(bound.pairs()) == [("s1", "a"), ("s1", "b")]
    handed_back = _bound_to("a", None, JobStatus.QUEUED)
    bound.change(running, handed_back)
    again = _bound_to("a", "s2", JobStatus.DISPATCHED)
    bound.change(handed_back, again)
    assert (bound.count("s1"), bound.count("s2")) == (1, 1)
    bound.change(again, _bound_to("a", "s2", JobStatus.SUCCEEDED))
    bound.change(_bound_to("b", "s1", JobStatus.DISPATCHED), None)  # forgotten
    assert bound.pairs() == [] and bound.count("s2") == 0
