"""The submit path's bounds on waiting jobs (gateway/balancer/admission.py): what a replica
counts (the leader's backlog, its own admissions the backlog does not show yet, those under
way) and when it tells a refused client to come back."""

from __future__ import annotations

import pytest

from gateway.balancer.admission import (
    RETRY_CEILING_S,
    RETRY_FLOOR_S,
    Admission,
    QueueFull,
    check_room,
    retry_after,
)
from gateway.balancer.shares import Shares
from gateway.bus.contract import Backlog, CallerBacklog


def backlog(applied_seq: int = 0, **pending: int) -> Backlog:
    return Backlog(
        at=1.0,
        applied_seq=applied_seq,
        pending=sum(pending.values()),
        bound=0,
        ended_per_s=2.0,
        callers=[
            CallerBacklog(caller=c, pending=n, bound=0, ended_per_s=0.5) for c, n in pending.items()
        ],
    )


def test_retry_after_is_the_excess_over_the_drain_rate_within_bounds() -> None:
    assert retry_after(10, 2.0) == 5
    assert retry_after(1, 100.0) == RETRY_FLOOR_S
    assert retry_after(10_000, 1.0) == RETRY_CEILING_S
    assert retry_after(3, 0.0) == RETRY_CEILING_S  # nothing ended lately: the longest


def test_a_caller_at_its_cap_waits_for_its_own_jobs_to_end() -> None:
    shares = Shares(max_pending_per_caller=4, caller_max_running={"a": 1})
    full = Backlog(
        at=1.0,
        applied_seq=0,
        pending=4,
        bound=1,
        ended_per_s=10.0,
        callers=[CallerBacklog(caller="a", pending=4, bound=1, ended_per_s=0.25)],
    )
    with pytest.raises(QueueFull) as capped:
        check_room(shares, full, "a", 1)
    assert capped.value.retry_after == 4  # one job over, at its own 0.25 a second
    with pytest.raises(QueueFull) as uncapped:
        check_room(Shares(max_pending_per_caller=4), full, "a", 1)
    assert uncapped.value.retry_after == RETRY_FLOOR_S  # the fleet's 10 a second
    assert uncapped.value.error.details["reason"] == "max_pending_per_caller"


def test_the_bound_in_all_and_callers_the_backlog_does_not_list() -> None:
    with pytest.raises(QueueFull) as total:
        check_room(Shares(max_pending=5), backlog(a=3, b=2), "c", 1)
    assert total.value.error.details["reason"] == "max_pending"
    listed = backlog(a=9)
    listed.unlisted_pending = 9  # a thousand callers listed, "c" not among them
    with pytest.raises(QueueFull):
        check_room(Shares(max_pending_per_caller=10), listed, "c", 2)
    check_room(Shares(), backlog(a=10**6), "a", 10**6)  # no bound: anything goes


def test_a_replica_counts_its_own_jobs_until_the_backlog_does() -> None:
    latest: list[Backlog | None] = [None]
    admission = Admission(Shares(max_pending_per_caller=3), lambda: latest[0])
    for seq in (11, 12):
        admission.reserve("a").admitted(seq)
    under_way = admission.reserve("a")  # being admitted: counted too
    with pytest.raises(QueueFull):
        admission.reserve("a")
    under_way.release()  # refused further on: its room is free again
    admission.reserve("b").release()  # another caller is not held back
    latest[0] = backlog(applied_seq=11, a=1)  # counts job 11, not yet job 12
    admission.on_backlog(latest[0])
    admission.reserve("a").admitted(13)  # 1 counted + job 12 + this one
    with pytest.raises(QueueFull):
        admission.reserve("a")
    latest[0] = backlog(applied_seq=13, a=0)  # the leader bound them all
    admission.on_backlog(latest[0])
    for _ in range(3):
        admission.reserve("a").admitted(0)


def test_without_bounds_nothing_is_counted() -> None:
    admission = Admission(Shares(), lambda: None)
    for _ in range(1000):
        admission.reserve("a").admitted(0)
