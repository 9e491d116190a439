"""The dispatcher's queue of pending jobs (gateway/dispatcher.py)."""

from __future__ import annotations

from gateway.contract import JobRecord, JobStatus
from gateway.dispatcher import _Queue


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
    queue = _Queue()
    for job in (record("old", 1.0), record("new", 2.0), record("urgent", 3.0, priority=1)):
        queue.push(job)
    assert queue.head(10) == ["urgent", "old", "new"]


def test_a_job_handed_back_is_listed_once() -> None:
    queue = _Queue()
    queue.push(record("a", 1.0))
    queue.push(record("b", 2.0))
    for _ in range(3):  # bound, then handed back: discarded and pushed again
        queue.discard("a")
        queue.push(record("a", 1.0))
    assert queue.head(10) == ["a", "b"]
    assert len(queue) == 2
    queue.discard("a")
    assert queue.head(10) == ["b"] and "a" not in queue
